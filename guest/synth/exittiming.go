package synth

import (
	"time"

	"github.com/tandemvm/tandem/internal/timing"
)

// The synth guest has no hypervisor exits; it times the work that stands
// for them, under the KVM backend's names where they mean the same thing
// (guest/kvm/exittiming.go): console output, disk submission, waiting for
// input, and a vCPU's wait while paused.
const (
	hConsTx = iota
	hDiskSubmit
	hIdle
	hPark
)

var exitHandlers = []timing.Handler{
	hConsTx:     {Reason: "io", Name: "console.bulk-tx"},
	hDiskSubmit: {Reason: "io", Name: "disk.submit"},
	hIdle:       {Reason: "io", Name: "idle", Waits: true},
	hPark:       {Reason: "pause", Name: "park", Waits: true},
}

// TimeExits starts timing the guest's handler equivalents by name, slow
// ones (over rec's threshold) in rec's slow list, and returns the table
// (a Prometheus collector). Calling it again replaces the table.
func (g *Guest) TimeExits(rec *timing.Recorder) *timing.Exits {
	e := timing.NewExits(exitHandlers, len(g.vcpus), rec)
	g.exitTimes.Store(e)
	return e
}

// timed runs f as handler h of vCPU v, timed when timing is on.
func (v *vcpu) timed(h int, f func()) {
	e := v.g.exitTimes.Load()
	if e == nil {
		f()
		return
	}
	start := time.Now()
	f()
	e.Exit(h, v.index, start, time.Since(start))
}
