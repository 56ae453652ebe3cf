package timing

import (
	"fmt"
	"sort"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Handler names one kind of vCPU exit and the code that serves it: Reason
// is the exit's cause as the hypervisor gives it ("io", "mmio", "hlt",
// "intr", ...), Name the device and register that served it
// ("uart.data", "disk.submit", "progress"). Waits marks a handler whose
// purpose is to block (the guest's idle call): it is timed, but never
// reported slow.
type Handler struct {
	Reason string
	Name   string
	Waits  bool
}

// exitBounds are the histogram's upper bounds in seconds: vCPU exits live
// between a microsecond and, when something is wrong, seconds.
var exitBounds = []float64{1e-6, 2.5e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
	1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1, 5}

// exitBoundsNs is exitBounds in nanoseconds, for the hot path.
var exitBoundsNs = func() []int64 {
	out := make([]int64, len(exitBounds))
	for i, b := range exitBounds {
		out[i] = int64(b * 1e9)
	}
	return out
}()

// nBuckets is len(exitBounds)+1: the last bucket is +Inf.
const nBuckets = 20

// hist is a lock-free histogram: one atomic add for the bucket, one for
// the sum; the count is the buckets' total.
type hist struct {
	sumNs   atomic.Int64
	buckets [nBuckets]atomic.Uint64
}

func (h *hist) observe(d time.Duration) {
	ns := int64(d)
	i := sort.Search(len(exitBoundsNs), func(i int) bool { return exitBoundsNs[i] >= ns })
	h.buckets[i].Add(1)
	h.sumNs.Add(ns)
}

// snapshot returns the count, the sum in seconds and the cumulative counts
// per upper bound, as Prometheus wants them.
func (h *hist) snapshot() (count uint64, sum float64, cum map[float64]uint64) {
	cum = make(map[float64]uint64, len(exitBounds))
	for i, b := range exitBounds {
		count += h.buckets[i].Load()
		cum[b] = count
	}
	count += h.buckets[len(exitBounds)].Load()
	return count, float64(h.sumNs.Load()) / 1e9, cum
}

// quantile estimates the q-quantile (0 < q <= 1) as the upper bound of the
// bucket it falls in; +Inf for the overflow bucket, 0 with no samples.
func (h *hist) quantile(q float64) (time.Duration, uint64) {
	var counts [nBuckets]uint64
	var total uint64
	for i := range counts {
		counts[i] = h.buckets[i].Load()
		total += counts[i]
	}
	if total == 0 {
		return 0, 0
	}
	rank := uint64(q*float64(total) + 0.5)
	rank = max(rank, 1)
	var seen uint64
	for i, c := range counts {
		seen += c
		if seen >= rank {
			if i == len(exitBounds) {
				return time.Duration(1<<63 - 1), total
			}
			return time.Duration(exitBoundsNs[i]), total
		}
	}
	return time.Duration(1<<63 - 1), total
}

// Exits times vCPU exits by handler and the time each vCPU spends outside
// the guest (from the hypervisor's return to the next entry). Observe is
// safe from every vCPU thread at once and costs a binary search over 19
// bounds and two atomic adds: no lock, no allocation. It is a Prometheus
// collector of tandem_vcpu_exit_seconds{reason,handler} and
// tandem_vcpu_outside_seconds{vcpu}.
type Exits struct {
	handlers []Handler
	exits    []hist
	outside  []hist
	slow     *Recorder
	thresh   time.Duration

	exitDesc, outsideDesc *prometheus.Desc
}

// NewExits returns an Exits for the handlers (indexed as given) and vcpus
// vCPUs. Exits and handlers at or over rec's threshold go to rec's slow
// list by name; rec may be nil (no slow list).
func NewExits(handlers []Handler, vcpus int, rec *Recorder) *Exits {
	return &Exits{
		handlers: handlers,
		exits:    make([]hist, len(handlers)),
		outside:  make([]hist, max(vcpus, 0)),
		slow:     rec,
		thresh:   rec.Threshold(),
		exitDesc: prometheus.NewDesc("tandem_vcpu_exit_seconds",
			"Time to serve one vCPU exit, by exit reason and the handler (device and register) that served it.",
			[]string{"reason", "handler"}, nil),
		outsideDesc: prometheus.NewDesc("tandem_vcpu_outside_seconds",
			"Time a vCPU spends outside the guest: from the hypervisor returning to the next entry.",
			[]string{"vcpu"}, nil),
	}
}

// Exit records that vCPU vcpu spent d, from start, in handler h. A handler
// index out of range is ignored.
func (e *Exits) Exit(h, vcpu int, start time.Time, d time.Duration) {
	if e == nil || h < 0 || h >= len(e.exits) {
		return
	}
	e.exits[h].observe(d)
	if d >= e.thresh && !e.handlers[h].Waits {
		e.slow.Slow(e.slowName(h, vcpu), start, d)
	}
}

// Outside records that vCPU vcpu spent d outside the guest.
func (e *Exits) Outside(vcpu int, d time.Duration) {
	if e == nil || vcpu < 0 || vcpu >= len(e.outside) {
		return
	}
	e.outside[vcpu].observe(d)
}

func (e *Exits) slowName(h, vcpu int) string {
	hd := e.handlers[h]
	name := "vcpu-exit " + hd.Reason
	if hd.Name != "" {
		name += " " + hd.Name
	}
	return name + " (vcpu " + strconv.Itoa(vcpu) + ")"
}

// Describe implements prometheus.Collector.
func (e *Exits) Describe(ch chan<- *prometheus.Desc) {
	ch <- e.exitDesc
	ch <- e.outsideDesc
}

// Collect implements prometheus.Collector. Handlers that never ran are
// left out.
func (e *Exits) Collect(ch chan<- prometheus.Metric) {
	for i := range e.exits {
		n, sum, cum := e.exits[i].snapshot()
		if n == 0 {
			continue
		}
		ch <- prometheus.MustNewConstHistogram(e.exitDesc, n, sum, cum, e.handlers[i].Reason, e.handlers[i].Name)
	}
	for v := range e.outside {
		n, sum, cum := e.outside[v].snapshot()
		if n == 0 {
			continue
		}
		ch <- prometheus.MustNewConstHistogram(e.outsideDesc, n, sum, cum, strconv.Itoa(v))
	}
}

// HandlerStats is one handler's figures since the start.
type HandlerStats struct {
	Reason string        `json:"reason"`
	Name   string        `json:"handler"`
	Count  uint64        `json:"count"`
	Mean   time.Duration `json:"mean_ns"`
	P50    time.Duration `json:"p50_ns"` // upper bound of the median's bucket
	P99    time.Duration `json:"p99_ns"` // upper bound of the 99th percentile's bucket
}

func (s HandlerStats) String() string {
	return fmt.Sprintf("%s %s: %d exits, mean %v, p50 <= %v, p99 <= %v", s.Reason, s.Name, s.Count, s.Mean, s.P50, s.P99)
}

// Stats returns the figures of every handler that ran, highest p99 first.
func (e *Exits) Stats() []HandlerStats {
	if e == nil {
		return nil
	}
	var out []HandlerStats
	for i := range e.exits {
		p50, n := e.exits[i].quantile(0.5)
		if n == 0 {
			continue
		}
		p99, _ := e.exits[i].quantile(0.99)
		out = append(out, HandlerStats{
			Reason: e.handlers[i].Reason, Name: e.handlers[i].Name, Count: n,
			Mean: time.Duration(e.exits[i].sumNs.Load() / int64(n)), P50: p50, P99: p99,
		})
	}
	sort.SliceStable(out, func(a, b int) bool { return out[a].P99 > out[b].P99 })
	return out
}
