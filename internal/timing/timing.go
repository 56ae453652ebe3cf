// Package timing times named phases: every phase of a migration or epoch
// and every device handler gets a name, its durations go into a Prometheus
// histogram labelled with that name, and anything slower than a threshold
// is logged through slog and kept in a bounded list served at /debug/slow.
// A person chasing a 40-second pause should find the culprit by name in one
// look.
//
// It must never block the caller on I/O beyond one slog call for a slow
// phase; the hot path (a fast phase) costs one histogram observation.
package timing

import (
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// DefaultSlowThreshold is the duration above which a phase is reported.
const DefaultSlowThreshold = 100 * time.Millisecond

// slowKeep bounds the slow list.
const slowKeep = 256

// Slow is one phase that took longer than the threshold.
type Slow struct {
	Name     string        `json:"name"`
	Start    time.Time     `json:"start"`
	Duration time.Duration `json:"duration_ns"`
	Millis   float64       `json:"duration_ms"`
}

// Recorder collects named timings. The zero value is not usable; use New.
type Recorder struct {
	hist      *prometheus.HistogramVec
	devices   *prometheus.HistogramVec
	log       *slog.Logger
	threshold time.Duration

	// mu guards slow.
	mu   sync.Mutex
	slow []Slow
}

// New makes a Recorder registering its histogram in reg (nil: not
// registered) and logging slow phases to log (nil: slog.Default()).
func New(reg prometheus.Registerer, log *slog.Logger, threshold time.Duration) *Recorder {
	if log == nil {
		log = slog.Default()
	}
	if threshold <= 0 {
		threshold = DefaultSlowThreshold
	}
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "tandem",
		Name:      "phase_seconds",
		Help:      "Duration of named phases (pause, flush, dirty sync, state save, send, device handlers).",
		Buckets:   []float64{50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1, 5, 30, 120},
	}, []string{"phase"})
	dev := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "tandem",
		Name:      "device_seconds",
		Help:      "Duration of device operations (the disk's writes, flushes and reads; the console's deliveries), by device and operation.",
		Buckets:   []float64{10e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1, 5, 30, 120},
	}, []string{"device", "op"})
	if reg != nil {
		h = register(reg, h)
		dev = register(reg, dev)
	}
	return &Recorder{hist: h, devices: dev, log: log, threshold: threshold}
}

// register registers h in reg; a second Recorder on the same registry
// (tests) reuses the first one's collector instead of failing.
func register(reg prometheus.Registerer, h *prometheus.HistogramVec) *prometheus.HistogramVec {
	if err := reg.Register(h); err != nil {
		if are, ok := err.(prometheus.AlreadyRegisteredError); ok {
			return are.ExistingCollector.(*prometheus.HistogramVec)
		}
	}
	return h
}

// Device records one operation op of device (tandem_device_seconds); one
// at or over the threshold is slow, named "device DEVICE.OP".
func (r *Recorder) Device(device, op string, start time.Time, d time.Duration) {
	if r == nil {
		return
	}
	r.devices.WithLabelValues(device, op).Observe(d.Seconds())
	if d >= r.threshold {
		r.Slow("device "+device+"."+op, start, d)
	}
}

// Start begins timing name; the returned function ends it and returns the
// duration. Use as `defer r.Start("flush")()` or keep the duration.
func (r *Recorder) Start(name string) func() time.Duration {
	t0 := time.Now()
	return func() time.Duration {
		d := time.Since(t0)
		r.Observe(name, t0, d)
		return d
	}
}

// Observe records that name started at start and took d.
func (r *Recorder) Observe(name string, start time.Time, d time.Duration) {
	if r == nil {
		return
	}
	r.hist.WithLabelValues(name).Observe(d.Seconds())
	if d < r.threshold {
		return
	}
	r.Slow(name, start, d)
}

// Threshold is the duration from which a timing is slow.
func (r *Recorder) Threshold() time.Duration {
	if r == nil {
		return DefaultSlowThreshold
	}
	return r.threshold
}

// Slow logs a timing the caller found slow and keeps it in the slow list,
// without a histogram observation (the caller keeps its own: vCPU exits).
func (r *Recorder) Slow(name string, start time.Time, d time.Duration) {
	if r == nil {
		return
	}
	r.log.Warn("slow phase", "phase", name, "duration", d.String(), "start", start.Format(time.RFC3339Nano))
	r.mu.Lock()
	if len(r.slow) >= slowKeep {
		copy(r.slow, r.slow[1:])
		r.slow = r.slow[:slowKeep-1]
	}
	r.slow = append(r.slow, Slow{Name: name, Start: start, Duration: d, Millis: float64(d) / 1e6})
	r.mu.Unlock()
}

// SlowPhases returns the kept slow phases, oldest first.
func (r *Recorder) SlowPhases() []Slow {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Slow(nil), r.slow...)
}
