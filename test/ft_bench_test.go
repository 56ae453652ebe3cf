package test

import (
	"fmt"
	"testing"
	"time"
)

// Benchmarks of continuous micro-checkpointing (issue 6). Each runs real
// processes and measures over a fixed window, so one iteration is the
// measurement: run with -benchtime 1x (make bench's 1s gives one
// iteration too, as every window is longer). Figures are reported with
// their baseline from the same run; docs/PERFORMANCE.md has the table.

// ftBenchWindow is how long each figure is measured.
func ftBenchWindow() time.Duration {
	if longRun {
		return 30 * time.Second
	}
	return 10 * time.Second
}

// BenchmarkFTEpochs: a 1 GiB guest dirtying random pages over 512 MiB,
// protected at 25 ms epochs, per write profile (ftProfiles: the old best
// case, whole-page random rewrites of random memory at 10,000 to 100,000
// pages/s, and the mixed profile). Reports epochs/s (baseline: the 40/s
// the interval asks for), the pause (baseline: the bare pause+resume of
// the same epochs), ack latency, wire bytes against the raw dirty bytes
// captured, and the write rate the guest achieved protected beside the
// rate the same guest achieves unprotected (`tandem run`) in the same run.
func BenchmarkFTEpochs(b *testing.B) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			skipUnlessKind(b, kind)
			for _, p := range ftProfiles {
				b.Run(p.name, func(b *testing.B) {
					for i := 0; i < b.N; i++ {
						plain := unprotectedWriteRate(b, kind, p)
						// The join's catch-up of a guest rewriting 100,000
						// pages/s runs its 30 rounds before the first epoch.
						o := primaryOpts{dirtyRate: p.rate, extra: p.args, protectWait: 3 * time.Minute}
						fig := benchEpochsWith(b, kind, o, true)
						b.ReportMetric(plain, "unprotected-writes/s")
						b.ReportMetric(fig.writes, "protected-writes/s")
						b.ReportMetric(100*fig.writes/plain, "protected/unprotected-writes-%")
						b.ReportMetric(float64(fig.throttle), "throttle-%")
						b.Logf("%s %s: asked %d pages/s; achieved unprotected %.0f, protected %.0f (%.1f%%); throttle %d%%",
							kind, p.name, p.rate, plain, fig.writes, 100*fig.writes/plain, fig.throttle)
					}
				})
			}
		})
	}
}

// The phase histograms benchEpochsWith reads around its window
// (failover.PhasePause, failover.PhaseAck).
const (
	failoverPhasePause = "epoch_pause"
	failoverPhaseAck   = "epoch_ack"
)

// windowHists reads the pause and ack histograms' buckets of a node.
func windowHists(b *testing.B, api string) map[string]map[float64]float64 {
	out := map[string]map[float64]float64{}
	for _, ph := range []string{failoverPhasePause, failoverPhaseAck} {
		h, err := phaseBuckets(api, ph)
		if err != nil {
			b.Fatal(err)
		}
		out[ph] = h
	}
	return out
}

// ftProfile is one workload of BenchmarkFTEpochs.
type ftProfile struct {
	name string
	rate int      // --dirty-rate
	args []string // the content and write profile flags
}

// ftProfiles: best is the figure docs/PERFORMANCE.md had before issue 11
// (zero pages with one word set, 8-byte counter writes); worst rewrites
// whole pages of random memory with fresh random data (nothing to
// compress, nothing for a delta to find); mixed is the measured Linux
// page mix with 256-byte text writes (the profile TestFTProfiles runs).
var ftProfiles = []ftProfile{
	{"best-10k", 10000, nil},
	{"worst-10k", 10000, worstProfile},
	{"worst-25k", 25000, worstProfile},
	{"worst-100k", 100000, worstProfile},
	{"mixed-25k", 25000, []string{"--fill", "mixed", "--write-bytes", "256", "--write-data", "text"}},
}

var worstProfile = []string{"--fill", "random", "--write-bytes", "4096", "--write-data", "random"}

// unprotectedWriteRate runs the profile's guest alone (`tandem run`) and
// returns the page writes per second it achieves over the window, by its
// own count.
func unprotectedWriteRate(b *testing.B, kind string, p ftProfile) float64 {
	n := startWithPorts(b, "run-"+kind, false, profileArgs(kind, "1GiB", "512MiB", fmt.Sprint(p.rate), p.args...)...)
	defer n.kill()
	w0 := waitWriting(b, n)
	t0 := time.Now()
	time.Sleep(ftBenchWindow() / 2)
	w1 := mustFT(b, n, false).PageWrites
	return float64(w1-w0) / time.Since(t0).Seconds()
}

// waitWriting waits (bounded) until n's guest has touched its range and
// writes, and returns its page writes then.
func waitWriting(b *testing.B, n *node) uint64 {
	waitFT(b, n, 120*time.Second, "the dirty workload writing", func(s ftStatus) bool { return s.PageWrites > 0 })
	time.Sleep(time.Second)
	return mustFT(b, n, false).PageWrites
}

// BenchmarkFTVerifyCost: the same protected guest as BenchmarkFTEpochs
// with per-epoch verification (the default: digests plus a 2 MiB slice
// of memory re-read at every pause) and without it (the baseline),
// measured one after the other in the same run.
func BenchmarkFTVerifyCost(b *testing.B) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			skipUnlessKind(b, kind)
			for i := 0; i < b.N; i++ {
				off := benchEpochsWith(b, kind, primaryOpts{noVerify: true}, false)
				on := benchEpochsWith(b, kind, primaryOpts{}, false)
				b.ReportMetric(off.p50, "off-pause-p50-ms")
				b.ReportMetric(off.p99, "off-pause-p99-ms")
				b.ReportMetric(on.p50, "on-pause-p50-ms")
				b.ReportMetric(on.p99, "on-pause-p99-ms")
				b.ReportMetric(on.p99-off.p99, "verify-p99-cost-ms")
				b.ReportMetric(on.eps, "on-epochs/s")
				b.Logf("%s: verification off: pause p50 %.2f p99 %.2f ms, %.1f epochs/s; on: p50 %.2f p99 %.2f ms, %.1f epochs/s, %d epochs verified, %d mismatches",
					kind, off.p50, off.p99, off.eps, on.p50, on.p99, on.eps, on.verified, on.mismatches)
				if on.mismatches != 0 || on.verified == 0 {
					b.Errorf("verification: %d verified, %d mismatches", on.verified, on.mismatches)
				}
			}
		})
	}
}

// epochFigures are one benchEpochsWith window's results.
type epochFigures struct {
	eps, p50, p99        float64
	ackP50, ackP99       float64
	ackMean              float64 // over the window, from the metrics
	verified, mismatches uint64
	writes               float64 // the guest's page writes per second
	throttle             int     // the epoch loop's throttle at the end
}

// BenchmarkFTTLSCost: what mutual TLS on the data channel (and on the
// console the kv clients use) costs, each figure with its plaintext
// baseline from the same run, one after the other: the 1 GiB dirtying
// guest of BenchmarkFTEpochs (epochs/s, pause p99, ack latency p99) and
// the protected 1 GiB kv guest of BenchmarkFTKV (pipelined req/s).
func BenchmarkFTTLSCost(b *testing.B) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			skipUnlessKind(b, kind)
			for i := 0; i < b.N; i++ {
				pki := newPKI(b, "a", "b", operator)
				plain := benchEpochsWith(b, kind, primaryOpts{}, false)
				tlsOn := benchEpochsWith(b, kind, primaryOpts{pki: pki}, false)
				window, depth := ftBenchWindow()/2, kvDepth(kind)
				pri, _, _ := startPair(b, kind, primaryOpts{memory: "1GiB"})
				plainKV := kvLoad(b, pri, kvClients(), depth, window, nil)
				pri.kill()
				pri, _, _ = startPair(b, kind, primaryOpts{memory: "1GiB", pki: pki})
				tlsKV := kvLoad(b, pri, kvClients(), depth, window, nil)
				pri.kill()
				b.ReportMetric(plain.eps, "plain-epochs/s")
				b.ReportMetric(tlsOn.eps, "tls-epochs/s")
				b.ReportMetric(plain.p99, "plain-pause-p99-ms")
				b.ReportMetric(tlsOn.p99, "tls-pause-p99-ms")
				b.ReportMetric(plain.ackMean, "plain-ack-mean-ms")
				b.ReportMetric(tlsOn.ackMean, "tls-ack-mean-ms")
				b.ReportMetric(plain.ackP50, "plain-ack-p50-ms")
				b.ReportMetric(tlsOn.ackP50, "tls-ack-p50-ms")
				b.ReportMetric(plain.ackP99, "plain-ack-p99-ms")
				b.ReportMetric(tlsOn.ackP99, "tls-ack-p99-ms")
				b.ReportMetric(plainKV, "plain-protected-req/s")
				b.ReportMetric(tlsKV, "tls-protected-req/s")
				b.ReportMetric(100*tlsKV/plainKV, "tls/plain-kv-%")
				b.Logf("%s: plaintext: %.1f epochs/s, pause p50 %.2f p99 %.2f ms, ack p50 %.2f p99 %.1f ms, protected kv %.0f req/s; TLS: %.1f epochs/s, pause p50 %.2f p99 %.2f ms, ack p50 %.2f p99 %.1f ms, protected kv %.0f req/s (%.1f%% of plaintext); ack cost p50 %+.2f p99 %+.1f ms; window mean ack %.2f / %.2f ms (%+.2f)",
					kind, plain.eps, plain.p50, plain.p99, plain.ackP50, plain.ackP99, plainKV, tlsOn.eps, tlsOn.p50, tlsOn.p99, tlsOn.ackP50, tlsOn.ackP99, tlsKV, 100*tlsKV/plainKV, tlsOn.ackP50-plain.ackP50, tlsOn.ackP99-plain.ackP99, plain.ackMean, tlsOn.ackMean, tlsOn.ackMean-plain.ackMean)
			}
		})
	}
}

func benchEpochsWith(b *testing.B, kind string, o primaryOpts, report bool) epochFigures {
	o.memory, o.workload, o.touch, o.epoch = "1GiB", "dirty", "512MiB", "25ms"
	if o.dirtyRate == 0 {
		o.dirtyRate = 10000
	}
	pri, sec, _ := startPair(b, kind, o)
	defer sec.kill()
	defer pri.kill()
	waitWriting(b, pri)
	// Let the first epochs after the catch-up pass.
	time.Sleep(2 * time.Second)
	s0 := mustFT(b, pri, false)
	m0, err := metricSums(pri.api)
	if err != nil {
		b.Fatal(err)
	}
	w0 := windowHists(b, pri.api)
	t0 := time.Now()
	b.ResetTimer()
	time.Sleep(ftBenchWindow())
	b.StopTimer()
	s1 := mustFT(b, pri, false)
	m1, err := metricSums(pri.api)
	if err != nil {
		b.Fatal(err)
	}
	w1 := windowHists(b, pri.api)
	secs := time.Since(t0).Seconds()
	epochs := float64(s1.Epochs - s0.Epochs)
	raw := float64(s1.EpochRawBytes - s0.EpochRawBytes)
	wire := float64(s1.EpochWireBytes - s0.EpochWireBytes)
	if epochs == 0 || raw == 0 {
		b.Fatalf("no epochs or no dirty bytes in the window: %+v -> %+v", s0, s1)
	}
	mean := func(phase string) float64 {
		n := m1[phase][1] - m0[phase][1]
		if n == 0 {
			return 0
		}
		return (m1[phase][0] - m0[phase][0]) / n * 1000
	}
	fig := epochFigures{eps: epochs / secs, p50: s1.PauseP50Ms, p99: s1.PauseP99Ms, ackP50: s1.AckLatencyP50Ms, ackP99: s1.AckLatencyP99Ms, ackMean: mean("epoch_ack"),
		verified: s1.VerifiedEpochs - s0.VerifiedEpochs, mismatches: s1.DigestMismatches,
		writes: float64(s1.PageWrites-s0.PageWrites) / secs, throttle: s1.ThrottlePercent}
	if !report {
		return fig
	}
	b.ReportMetric(epochs/secs, "epochs/s")
	b.ReportMetric(s1.PauseP50Ms, "pause-p50-ms")
	b.ReportMetric(s1.PauseP99Ms, "pause-p99-ms")
	b.ReportMetric(s1.PauseMaxMs, "pause-max-ms")
	b.ReportMetric(mean("pause")+mean("resume"), "bare-pause+resume-ms")
	b.ReportMetric(100*wire/raw, "wire/raw-%")
	b.ReportMetric(raw/secs/1e6, "raw-MB/s")
	b.ReportMetric(wire/secs/1e6, "wire-MB/s")
	b.ReportMetric(s1.AckLatencyP99Ms, "ack-p99-ms")
	b.ReportMetric(s1.AckLatencyP50Ms, "ack-p50-ms")
	b.ReportMetric(epochs/secs*raw/epochs/4096, "raw-pages/s")
	// The status's quantiles cover its last 2,048 epochs, so they include
	// the first, large epochs after the join; the window's own come from
	// the histograms (bucket bounds: an upper bound on each quantile).
	pauseWin, _ := delayBound(w0[failoverPhasePause], w1[failoverPhasePause], 0.99)
	ackWin, _ := delayBound(w0[failoverPhaseAck], w1[failoverPhaseAck], 0.99)
	b.ReportMetric(pauseWin, "window-pause-p99-bound-ms")
	b.ReportMetric(ackWin, "window-ack-p99-bound-ms")
	if len(w1[failoverPhasePause]) == 0 {
		b.Logf("%s: the binary has no epoch_pause histogram (older than this benchmark): the window's figures are not measured", kind)
	} else {
		b.Logf("%s: in the window, pause p99 <= %.1f ms, ack p99 <= %.0f ms (histogram bounds)", kind, pauseWin, ackWin)
	}
	b.Logf("%s: %.1f epochs/s (interval asks 40), pause p50 %.2f p99 %.2f max %.2f ms; mean per epoch: pause %.3f, flush %.3f, dirty_sync %.3f, state_save %.3f, copy %.3f, resume %.3f ms; raw %.1f MB/s, wire %.2f MB/s (%.1f%%), %.0f raw pages/epoch; ack p50 %.1f p99 %.1f ms; stalls %d, flush aborts %d",
		kind, epochs/secs, s1.PauseP50Ms, s1.PauseP99Ms, s1.PauseMaxMs,
		mean("pause"), mean("flush"), mean("dirty_sync"), mean("state_save"), mean("copy"), mean("resume"),
		raw/secs/1e6, wire/secs/1e6, 100*wire/raw, raw/4096/epochs, s1.AckLatencyP50Ms, s1.AckLatencyP99Ms,
		s1.BackpressureStalls-s0.BackpressureStalls, s1.FlushAborts-s0.FlushAborts)
	return fig
}
