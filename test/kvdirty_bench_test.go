package test

import (
	"fmt"
	"os"
	"strconv"
	"sync/atomic"
	"testing"
)

// BenchmarkFTKVDirty: issue 17's dirtying guest with a synchronous
// client. A 1 GiB kv guest with two vCPUs: vCPU 0 serves the console,
// vCPU 1 dirties 10,000 random pages a second over the top 256 MiB
// ($TANDEM_KV_DIRTY_RATE overrides the rate). Two protected pairs side by
// side, clock and output-triggered epochs, take turns under one
// synchronous client (kvRounds rounds, the order reversed each round, as
// BenchmarkFTKV). Reported per trigger (medians over the rounds): req/s,
// the output delay, epochs/s, the pause p99, and the paused time per
// second, all of it and the part that held guest work (what
// --max-pause-fraction, default 10 %, bounds), and the page writes the
// guest achieved.
func BenchmarkFTKVDirty(b *testing.B) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			skipUnlessKind(b, kind)
			for i := 0; i < b.N; i++ {
				benchKVDirty(b, kind)
			}
		})
	}
}

// kvDirtyRuns counts benchKVDirty's runs (the pairs' start order alternates).
var kvDirtyRuns atomic.Int64

func benchKVDirty(b *testing.B, kind string) {
	window := ftBenchWindow() / 2
	rate := 10000
	if n, err := strconv.Atoi(os.Getenv("TANDEM_KV_DIRTY_RATE")); err == nil && n > 0 {
		rate = n
	}
	guestArgs := []string{"--vcpus", "2", "--touch", "256MiB", "--dirty-rate", strconv.Itoa(rate), "--dirty-pattern", "random"}
	triggers := []string{"clock", "output"}
	start := triggers // alternating from run to run, as BenchmarkFTKV's
	if kvDirtyRuns.Add(1)%2 == 0 {
		start = []string{"output", "clock"}
	}
	pairs := map[string][2]*node{}
	for _, trig := range start {
		pri, sec, _ := startPair(b, kind, primaryOpts{memory: "1GiB", extra: append([]string{"--epoch-trigger", trig}, guestArgs...)})
		defer pri.kill()
		defer sec.kill()
		pairs[trig] = [2]*node{pri, sec}
	}
	one := map[string][]kvFigures{}
	for r := range kvRounds() {
		order := triggers
		if r%2 == 1 {
			order = []string{triggers[1], triggers[0]}
		}
		for _, trig := range order {
			p := pairs[trig]
			one[trig] = append(one[trig], measureKV(b, p[0], p[1], fmt.Sprintf("%s sync dirtying #%d", trig, r+1), 1, 1, window))
		}
	}
	for _, trig := range triggers {
		fs := one[trig]
		pooled := pooledSync(fs)
		med := func(f func(kvFigures) float64) float64 { return medianOf(fs, f) }
		rps, eps := medianRate(fs), med(func(f kvFigures) float64 { return f.eps })
		p99, paused, held := med(func(f kvFigures) float64 { return f.pauseP99 }), med(func(f kvFigures) float64 { return f.pausedMsPerS }), med(func(f kvFigures) float64 { return f.heldMsPerS })
		writes := med(func(f kvFigures) float64 { return f.writesPerS })
		b.ReportMetric(rps, trig+"-sync-req/s")
		b.ReportMetric(eps, trig+"-epochs/s")
		b.ReportMetric(p99, trig+"-pause-p99-ms")
		b.ReportMetric(paused, trig+"-paused-ms/s")
		b.ReportMetric(held, trig+"-held-ms/s")
		b.ReportMetric(pooled.delayP99, trig+"-output-delay-p99-bound-ms")
		b.ReportMetric(writes, trig+"-guest-page-writes/s")
		b.Logf("%s %s, dirtying %d pages/s, one synchronous client, medians of %d rounds: %.0f req/s, %.1f epochs/s, pause p99 %.2f ms, paused %.1f ms/s of which held guest work %.1f ms/s (bound 100), guest page writes %.0f/s; all rounds' releases: output delay p50 <= %.2f p99 <= %.2f ms (%.1f%% within 5 ms), round trip p50 %.2f p99 %.2f ms; load average %s",
			kind, trig, rate, len(fs), rps, eps, p99, paused, held, writes, pooled.delayP50, pooled.delayP99, 100*pooled.within5, pooled.rttP50, pooled.rttP99, loadAverage())
		for _, f := range fs {
			b.Logf("%s %s: %s", kind, f.name, f)
		}
	}
}
