package timing

import (
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

var testHandlers = []Handler{
	{Reason: "io", Name: "uart.data"},
	{Reason: "io", Name: "disk.submit"},
	{Reason: "io", Name: "idle", Waits: true},
}

func TestExitsHistogramAndSlowList(t *testing.T) {
	rec := New(nil, slog.New(slog.NewTextHandler(io.Discard, nil)), 100*time.Millisecond)
	e := NewExits(testHandlers, 2, rec)
	now := time.Now()
	for i := 0; i < 98; i++ {
		e.Exit(0, 0, now, 3*time.Microsecond)
	}
	e.Exit(0, 1, now, 40*time.Microsecond)
	e.Exit(0, 1, now, 40*time.Microsecond)
	e.Exit(1, 1, now, 400*time.Millisecond) // a stalled disk submit
	e.Exit(2, 0, now, 900*time.Millisecond) // idle: waits on purpose
	e.Exit(7, 0, now, time.Hour)            // no such handler: ignored
	e.Outside(1, 2*time.Microsecond)
	e.Outside(9, time.Second) // no such vCPU: ignored

	slow := rec.SlowPhases()
	if len(slow) != 1 || slow[0].Name != "vcpu-exit io disk.submit (vcpu 1)" || slow[0].Duration != 400*time.Millisecond {
		t.Fatalf("slow list %+v, want only the 400ms disk.submit on vcpu 1", slow)
	}
	st := e.Stats()
	if len(st) != 3 {
		t.Fatalf("stats for %d handlers, want 3: %v", len(st), st)
	}
	// Highest p99 first: idle (<= 1s), disk (<= 1s... 400ms is in the 1s bucket), uart.
	var uart HandlerStats
	for _, s := range st {
		if s.Name == "uart.data" {
			uart = s
		}
	}
	if uart.Count != 100 || uart.P50 != 5*time.Microsecond || uart.P99 != 50*time.Microsecond {
		t.Fatalf("uart stats %v, want 100 exits, p50 <= 5µs, p99 <= 50µs", uart)
	}
	if st[len(st)-1].Name != "uart.data" {
		t.Fatalf("stats not sorted by p99: %v", st)
	}
}

func TestExitsCollector(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := NewExits(testHandlers, 2, nil)
	reg.MustRegister(e)
	e.Exit(0, 0, time.Now(), time.Microsecond)
	e.Exit(1, 0, time.Now(), time.Millisecond)
	e.Outside(0, time.Microsecond)
	if n := testutil.CollectAndCount(reg, "tandem_vcpu_exit_seconds"); n != 2 {
		t.Fatalf("%d exit series, want 2 (handlers that ran)", n)
	}
	want := `
# HELP tandem_vcpu_outside_seconds Time a vCPU spends outside the guest: from the hypervisor returning to the next entry.
# TYPE tandem_vcpu_outside_seconds histogram
`
	err := testutil.CollectAndCompare(e, strings.NewReader(want+outsideSample), "tandem_vcpu_outside_seconds")
	if err != nil {
		t.Fatal(err)
	}
}

// outsideSample is one 1µs observation on vcpu 0.
var outsideSample = func() string {
	var b strings.Builder
	for _, le := range []string{"1e-06", "2.5e-06", "5e-06", "1e-05", "2.5e-05", "5e-05", "0.0001", "0.00025", "0.0005",
		"0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "1", "5", "+Inf"} {
		b.WriteString(`tandem_vcpu_outside_seconds_bucket{vcpu="0",le="` + le + `"} 1` + "\n")
	}
	b.WriteString(`tandem_vcpu_outside_seconds_sum{vcpu="0"} 1e-06` + "\n")
	b.WriteString(`tandem_vcpu_outside_seconds_count{vcpu="0"} 1` + "\n")
	return b.String()
}()

func TestExitsConcurrent(t *testing.T) {
	e := NewExits(testHandlers, 4, nil)
	var wg sync.WaitGroup
	for v := 0; v < 4; v++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 1000; i++ {
				e.Exit(i%2, v, time.Time{}, time.Duration(i)*time.Microsecond)
				e.Outside(v, time.Microsecond)
			}
		}()
	}
	wg.Wait()
	var total uint64
	for _, s := range e.Stats() {
		total += s.Count
	}
	if total != 4000 {
		t.Fatalf("%d exits counted, want 4000", total)
	}
}

func TestNilExits(t *testing.T) {
	var e *Exits
	e.Exit(0, 0, time.Now(), time.Second)
	e.Outside(0, time.Second)
	if e.Stats() != nil {
		t.Fatal("nil Exits has stats")
	}
}

func BenchmarkExitObserve(b *testing.B) {
	e := NewExits(testHandlers, 1, nil)
	for i := 0; i < b.N; i++ {
		e.Exit(0, 0, time.Time{}, time.Duration(i&1023)*time.Microsecond)
	}
}

// BenchmarkExitObserveWithClock is the whole cost on the exit path: two
// clock reads and the observation, beside BenchmarkClockPair (the reads
// alone).
func BenchmarkExitObserveWithClock(b *testing.B) {
	e := NewExits(testHandlers, 1, nil)
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		e.Exit(0, 0, t0, time.Since(t0))
	}
}

func BenchmarkClockPair(b *testing.B) {
	var d time.Duration
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		d += time.Since(t0)
	}
	_ = d
}

func TestBucketCount(t *testing.T) {
	if nBuckets != len(exitBounds)+1 {
		t.Fatalf("nBuckets %d, want len(exitBounds)+1 = %d", nBuckets, len(exitBounds)+1)
	}
}
