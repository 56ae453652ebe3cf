package kvm

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/tandemvm/tandem/internal/timing"
)

// TestExitTimingNamesHandlers: kv requests over the console make the
// micro-guest exit for console input and output and for its progress and
// idle calls; each is timed under its name and exported.
func TestExitTimingNamesHandlers(t *testing.T) {
	skipWithoutKVM(t)
	g, err := New(kvConfig(64<<20, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	rec := timing.New(nil, slog.New(slog.NewTextHandler(io.Discard, nil)), time.Second)
	e := g.TimeExits(rec)
	lr := newLineReader()
	g.Console().SetOutput(lr.sink)
	mustResume(t, g)
	for i := 0; i < 50; i++ {
		expect(t, ask(t, g, lr, fmt.Sprintf("c:%d SET k%d v", i+1, i)), fmt.Sprintf("c:%d OK", i+1))
	}
	// Paused, so no exit lands between the stats and the export below.
	if _, err := g.Pause(context.Background()); err != nil {
		t.Fatal(err)
	}
	counts := map[string]uint64{}
	for _, s := range e.Stats() {
		counts[s.Reason+" "+s.Name] = s.Count
		if s.Count > 0 && (s.P99 <= 0 || s.Mean <= 0) {
			t.Errorf("%v: timed at zero", s)
		}
	}
	if counts["io console.bulk-rx"] == 0 && counts["io uart.in"] == 0 {
		t.Errorf("no console input exits timed: %v", counts)
	}
	if counts["io console.bulk-tx"] == 0 && counts["io uart.out"] == 0 {
		t.Errorf("no console output exits timed: %v", counts)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(e)
	if n := testutil.CollectAndCount(reg, "tandem_vcpu_exit_seconds"); n != len(counts) {
		t.Errorf("%d exit series exported, want %d (%v)", n, len(counts), counts)
	}
	if n := testutil.CollectAndCount(reg, "tandem_vcpu_outside_seconds"); n != 1 {
		t.Errorf("%d outside series for one vCPU, want 1", n)
	}
	if slow := rec.SlowPhases(); len(slow) != 0 {
		t.Errorf("slow exits on an idle kv guest with a 1 s threshold: %+v", slow)
	}
}

// BenchmarkKVExitTiming: pipelined kv requests (batches of 64 in one
// console input) with exit timing off and on, in the same run: the ratio
// of req/s is the instrumentation's cost on the exit path.
func BenchmarkKVExitTiming(b *testing.B) {
	skipWithoutKVM(b)
	for _, on := range []bool{false, true} {
		b.Run(fmt.Sprintf("timing=%v", on), func(b *testing.B) {
			g, err := New(kvConfig(64<<20, 1))
			if err != nil {
				b.Fatal(err)
			}
			defer g.Close()
			var e *timing.Exits
			if on {
				e = g.TimeExits(nil)
			}
			lr := newLineReader()
			g.Console().SetOutput(lr.sink)
			mustResume(b, g)
			const batch = 64
			var req []byte
			seq := 0
			for b.Loop() {
				req = req[:0]
				for k := 0; k < batch; k++ {
					seq++
					req = fmt.Appendf(req, "b:%d SET k%d v%d\n", seq, seq%1000, seq)
				}
				if err := g.Console().Input(req); err != nil {
					b.Fatal(err)
				}
				for k := 0; k < batch; k++ {
					lr.next(b, 10*time.Second)
				}
			}
			b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "req/s")
			if e != nil {
				var exits uint64
				for _, s := range e.Stats() {
					exits += s.Count
				}
				b.ReportMetric(float64(exits)/float64(b.N*batch), "exits/req")
			}
		})
	}
}
