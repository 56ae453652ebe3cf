package ft

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/timing"
)

// exitTimer is a guest that can time its vCPU exits by handler (the KVM
// backend).
type exitTimer interface {
	TimeExits(rec *timing.Recorder) *timing.Exits
}

// exitMetrics exports the vCPU-exit timings of whichever guest the node
// runs now: registered once, it follows Attach and detach.
type exitMetrics struct {
	cur atomic.Pointer[timing.Exits]
}

// follow starts timing g's exits (slow ones go to the node's slow list),
// or stops exporting when g cannot time them or is nil.
func (m *exitMetrics) follow(g guest.Guest, rec *timing.Recorder) {
	if et, ok := g.(exitTimer); ok && g != nil {
		m.cur.Store(et.TimeExits(rec))
		return
	}
	m.cur.Store(nil)
}

// Describe implements prometheus.Collector: unchecked (the series come
// and go with the guest).
func (m *exitMetrics) Describe(chan<- *prometheus.Desc) {}

// Collect implements prometheus.Collector.
func (m *exitMetrics) Collect(ch chan<- prometheus.Metric) {
	if e := m.cur.Load(); e != nil {
		e.Collect(ch)
	}
}
