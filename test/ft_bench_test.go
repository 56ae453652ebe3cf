package test

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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
				plainKV := kvLoad(b, pri, kvClients(), depth, window)
				pri.kill()
				pri, _, _ = startPair(b, kind, primaryOpts{memory: "1GiB", pki: pki})
				tlsKV := kvLoad(b, pri, kvClients(), depth, window)
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
	t0 := time.Now()
	b.ResetTimer()
	time.Sleep(ftBenchWindow())
	b.StopTimer()
	s1 := mustFT(b, pri, false)
	m1, err := metricSums(pri.api)
	if err != nil {
		b.Fatal(err)
	}
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
	b.Logf("%s: %.1f epochs/s (interval asks 40), pause p50 %.2f p99 %.2f max %.2f ms; mean per epoch: pause %.3f, flush %.3f, dirty_sync %.3f, state_save %.3f, copy %.3f, resume %.3f ms; raw %.1f MB/s, wire %.2f MB/s (%.1f%%), %.0f raw pages/epoch; ack p50 %.1f p99 %.1f ms; stalls %d, flush aborts %d",
		kind, epochs/secs, s1.PauseP50Ms, s1.PauseP99Ms, s1.PauseMaxMs,
		mean("pause"), mean("flush"), mean("dirty_sync"), mean("state_save"), mean("copy"), mean("resume"),
		raw/secs/1e6, wire/secs/1e6, 100*wire/raw, raw/4096/epochs, s1.AckLatencyP50Ms, s1.AckLatencyP99Ms,
		s1.BackpressureStalls-s0.BackpressureStalls, s1.FlushAborts-s0.FlushAborts)
	return fig
}

// BenchmarkFTKV: kv requests/s through the console of a 1 GiB kv guest,
// protected (`tandem primary` with a secondary, 25 ms epochs) against the
// same guest unprotected (`tandem run`), measured in the same run. Two
// loads: kvClients clients each keeping kvDepth requests outstanding, SETs
// spread over a 1,000,000-key working set (throughput: output commit adds
// an epoch of latency to every reply, so by Little's law the load needs
// about rate x output delay requests in flight, 300,000 req/s x 40 ms =
// 12,000, to saturate the protected guest), and one client waiting for
// each reply (latency-bound). Where the protected run's time goes is
// reported beside it: the guest's paused time, the epochs' page copy, and
// the CPU the primary and the secondary processes took on the shared host.
func BenchmarkFTKV(b *testing.B) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			skipUnlessKind(b, kind)
			for i := 0; i < b.N; i++ {
				benchKV(b, kind)
			}
		})
	}
}

// kvClients is the pipelined load's clients. Every reply goes to every
// client (the console is one serial line), so more clients multiply the
// bridge's work alike in both runs. $TANDEM_KV_CLIENTS overrides it.
func kvClients() int {
	if n, err := strconv.Atoi(os.Getenv("TANDEM_KV_CLIENTS")); err == nil && n > 0 {
		return n
	}
	return 4
}

// kvDepth is a client's requests in flight, per guest kind: with
// kvClients of them, 32,000 in flight on kvm (its unprotected rate was
// highest at 20,000 to 40,000 with one client, and the protected run
// needs ~12,000 for its output delay) and 8,000 on synth (whose
// unprotected bridge drops a client with more than ~4,096 replies queued
// per chunk). $TANDEM_KV_DEPTH overrides both.
func kvDepth(kind string) int {
	if d, err := strconv.Atoi(os.Getenv("TANDEM_KV_DEPTH")); err == nil && d > 0 {
		return d
	}
	if kind == "kvm" {
		return 8000
	}
	return 2000
}

func benchKV(b *testing.B, kind string) {
	window := ftBenchWindow() / 2
	plain := startSource(b, kind, guestOpts{memory: "1GiB", workload: "kv"})
	depth, clients := kvDepth(kind), kvClients()
	plainPipe := kvLoad(b, plain, clients, depth, window)
	plainSync := kvLoad(b, plain, 1, 1, window/2)
	plain.kill()
	// The two triggers take turns going first from one run to the next
	// (-count), so neither always gets the host as the other left it.
	var clock, output kvTriggerFigures
	if kvRuns.Add(1)%2 == 1 {
		clock = protectedKV(b, kind, "clock", depth, window)
		output = protectedKV(b, kind, "output", depth, window)
	} else {
		output = protectedKV(b, kind, "output", depth, window)
		clock = protectedKV(b, kind, "clock", depth, window)
	}
	b.ReportMetric(plainPipe, "unprotected-req/s")
	b.ReportMetric(clock.pipe.rate, "protected-req/s")
	b.ReportMetric(output.pipe.rate, "output-protected-req/s")
	b.ReportMetric(100*clock.pipe.rate/plainPipe, "protected/unprotected-%")
	b.ReportMetric(100*output.pipe.rate/clock.pipe.rate, "output/clock-pipelined-%")
	b.ReportMetric(plainSync, "sync-unprotected-req/s")
	b.ReportMetric(clock.sync.rate, "sync-protected-req/s")
	b.ReportMetric(output.sync.rate, "sync-output-protected-req/s")
	b.ReportMetric(output.sync.delayP50, "sync-output-delay-p50-bound-ms")
	b.ReportMetric(output.sync.delayP99, "sync-output-delay-p99-bound-ms")
	b.ReportMetric(100*output.sync.within2, "sync-output-within-2ms-%")
	b.ReportMetric(100*output.sync.within5, "sync-output-within-5ms-%")
	b.ReportMetric(output.sync.pauseMean, "sync-output-pause-mean-ms")
	b.Logf("%s: pipelined %dx%d: unprotected %.0f req/s, clock %.0f req/s (%.1f%%), output %.0f req/s (%.1f%% of clock); one synchronous client: unprotected %.0f, clock %.0f, output %.0f req/s (output delay p50 <= %.2f p99 <= %.2f ms)",
		kind, clients, depth, plainPipe, clock.pipe.rate, 100*clock.pipe.rate/plainPipe, output.pipe.rate, 100*output.pipe.rate/clock.pipe.rate,
		plainSync, clock.sync.rate, output.sync.rate, output.sync.delayP50, output.sync.delayP99)
	for _, f := range []kvFigures{clock.pipe, output.pipe, clock.sync, output.sync} {
		b.Logf("%s %s: %s", kind, f.name, f)
	}
}

// kvRuns counts benchKV's runs (the order of the triggers alternates).
var kvRuns atomic.Int64

// kvTriggerFigures are one trigger's protected kv figures: pipelined and
// synchronous.
type kvTriggerFigures struct{ pipe, sync kvFigures }

// kvFigures are one kv load on a protected primary, over its window.
type kvFigures struct {
	name              string
	rate              float64 // replies/s
	eps               float64 // epochs/s
	byOutput, byClock uint64
	stalls            uint64
	pausedMsPerS      float64 // from the pause histogram's sum
	pauseMean         float64 // ms
	phases            map[string]float64
	// delayP50, delayP99: upper bounds on the console output delay's
	// quantiles over this load's releases alone (the histogram's bucket
	// that holds them; status's own p50/p99 mix in the loads before);
	// within2, within5: the share of releases within 2 and 5 ms.
	delayP50, delayP99 float64
	within2, within5   float64
	priCPU, secCPU     float64 // CPU seconds per second of the two processes
	bound              string
}

func (f kvFigures) String() string {
	s := fmt.Sprintf("%.0f req/s, %.1f epochs/s (%d by output, %d by clock), %d stalls, paused %.1f ms/s, pause mean %.3f ms, output delay p50 <= %.2f p99 <= %.2f ms (%.1f%% within 2 ms, %.1f%% within 5 ms), cpu primary %.2f secondary %.2f, bound %s; mean ms:",
		f.rate, f.eps, f.byOutput, f.byClock, f.stalls, f.pausedMsPerS, f.pauseMean, f.delayP50, f.delayP99, 100*f.within2, 100*f.within5, f.priCPU, f.secCPU, f.bound)
	for _, p := range []string{"pause", "flush", "dirty_sync", "state_save", "copy", "hook", "resume", "epoch_output_wait", "epoch_capture", "epoch_queue", "epoch_encode", "epoch_send", "epoch_apply", "epoch_ack", "epoch_release"} {
		if v, ok := f.phases[p]; ok {
			s += fmt.Sprintf(" %s %.3f", p, v)
		}
	}
	return s
}

// protectedKV starts a pair with --epoch-trigger trigger and measures
// the pipelined load, then one synchronous client.
func protectedKV(b *testing.B, kind, trigger string, depth int, window time.Duration) kvTriggerFigures {
	pri, sec, _ := startPair(b, kind, primaryOpts{memory: "1GiB", extra: []string{"--epoch-trigger", trigger}})
	defer pri.kill()
	defer sec.kill()
	var f kvTriggerFigures
	f.pipe = measureKV(b, pri, sec, trigger+" pipelined", kvClients(), depth, window)
	f.sync = measureKV(b, pri, sec, trigger+" sync", 1, 1, window/2)
	return f
}

// measureKV runs kvLoad on a protected primary and gathers its figures
// over the same window.
func measureKV(b *testing.B, pri, sec *node, name string, clients, depth int, d time.Duration) kvFigures {
	s0 := mustFT(b, pri, false)
	m0, err := metricSums(pri.api)
	if err != nil {
		b.Fatal(err)
	}
	h0, err := outputDelayBuckets(pri.api)
	if err != nil {
		b.Fatal(err)
	}
	p0, q0 := procCPU(pri.Pid()), procCPU(sec.Pid())
	stopPerf := perfRecord(b, pri, name, d)
	t0 := time.Now()
	f := kvFigures{name: name, rate: kvLoad(b, pri, clients, depth, d)}
	stopPerf()
	secs := time.Since(t0).Seconds()
	p1, q1 := procCPU(pri.Pid()), procCPU(sec.Pid())
	s1 := mustFT(b, pri, false)
	m1, err := metricSums(pri.api)
	if err != nil {
		b.Fatal(err)
	}
	f.eps = float64(s1.Epochs-s0.Epochs) / secs
	f.byOutput, f.byClock = s1.EpochsByOutput-s0.EpochsByOutput, s1.EpochsByClock-s0.EpochsByClock
	f.stalls = s1.BackpressureStalls - s0.BackpressureStalls
	h1, err := outputDelayBuckets(pri.api)
	if err != nil {
		b.Fatal(err)
	}
	f.delayP50, _ = delayBound(h0, h1, 0.5)
	var share map[float64]float64
	f.delayP99, share = delayBound(h0, h1, 0.99)
	f.within2, f.within5 = share[0.002], share[0.005]
	f.priCPU, f.secCPU = (p1-p0)/secs, (q1-q0)/secs
	f.bound = s1.EpochBound
	f.phases = map[string]float64{}
	for phase, v := range m1 {
		if n := v[1] - m0[phase][1]; n > 0 {
			f.phases[phase] = (v[0] - m0[phase][0]) / n * 1000
		}
	}
	var paused float64
	for _, p := range []string{"pause", "flush", "dirty_sync", "state_save", "copy", "resume"} {
		paused += m1[p][0] - m0[p][0]
	}
	f.pausedMsPerS = 1000 * paused / secs
	if n := m1["pause"][1] - m0["pause"][1]; n > 0 {
		f.pauseMean = 1000 * paused / n
	}
	return f
}

// perfRecord, with $TANDEM_PERF_DIR set, records the primary's CPU
// profile (perf record -g) over the next d into that directory, one file
// per load; the returned function waits for it. Without it, nothing.
func perfRecord(b *testing.B, pri *node, name string, d time.Duration) func() {
	dir := os.Getenv("TANDEM_PERF_DIR")
	if dir == "" {
		return func() {}
	}
	out := filepath.Join(dir, fmt.Sprintf("%s-%d.perf", strings.ReplaceAll(name, " ", "-"), time.Now().UnixNano()))
	cmd := exec.Command("perf", "record", "-g", "-q", "-o", out, "-p", strconv.Itoa(pri.Pid()), "--", "sleep", fmt.Sprint(d.Seconds()))
	if err := cmd.Start(); err != nil {
		b.Logf("perf: %v", err)
		return func() {}
	}
	return func() {
		cmd.Wait()
		b.Logf("perf profile of %s: %s", name, out)
	}
}

// procCPU is a process's CPU time so far (user and system), in seconds;
// 0 if it cannot be read.
func procCPU(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (u + st) / 100 // USER_HZ
}

// kvLoad runs clients connections, each keeping depth SET requests
// outstanding, for d, and returns the replies per second.
func kvLoad(b *testing.B, n *node, clients, depth int, d time.Duration) float64 {
	var total atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	stopAt := time.Now().Add(d)
	start := time.Now()
	for c := 0; c < clients; c++ {
		conn, err := dialAddr(n.console, 5*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		id := fmt.Sprintf("b%d%d", c, time.Now().UnixNano()%1e6)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conn.Close()
			errs <- pipeClient(conn, id, depth, stopAt, &total)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	return float64(total.Load()) / time.Since(start).Seconds()
}

// kvKeys is the working set the kv load writes over (issue 11: at least
// 1,000,000 keys, so protected throughput is measured with writes spread
// over hundreds of MiB of table, not a few hot pages); kvStride, odd and
// prime to it, walks the keys in an order that jumps across the table.
const (
	kvKeys   = 1_000_000
	kvStride = 7_919
)

// kvKeyCount is kvKeys, or $TANDEM_KV_KEYS (a few hundred hot keys: the
// figures measured before issue 11, where the guest's first touch of
// table pages does not bound the rate).
var kvKeyCount = func() uint64 {
	if n, err := strconv.ParseUint(os.Getenv("TANDEM_KV_KEYS"), 10, 64); err == nil && n > 0 {
		return n
	}
	return kvKeys
}()

// pipeClient sends SETs keeping depth outstanding until stopAt, then
// waits (bounded) for the outstanding replies.
func pipeClient(conn net.Conn, id string, depth int, stopAt time.Time, total *atomic.Int64) error {
	slots := make(chan struct{}, depth)
	readErr := make(chan error, 1)
	var sent atomic.Int64
	go func() {
		r := bufio.NewReader(conn)
		prefix := id + ":"
		var got int64
		for {
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			line, err := r.ReadString('\n')
			if err != nil {
				readErr <- fmt.Errorf("client %s after %d replies: %w", id, got, err)
				return
			}
			if !strings.HasPrefix(line, prefix) {
				continue
			}
			if !strings.HasSuffix(strings.TrimRight(line, "\r\n"), " OK") {
				readErr <- fmt.Errorf("client %s: reply %q", id, line)
				return
			}
			got++
			if time.Now().Before(stopAt) {
				total.Add(1)
			}
			<-slots
			if time.Now().After(stopAt) && got == sent.Load() {
				readErr <- nil
				return
			}
		}
	}()
	w := bufio.NewWriter(conn)
	for seq := 1; time.Now().Before(stopAt); seq++ {
		select {
		case slots <- struct{}{}:
		case err := <-readErr:
			return err
		}
		sent.Add(1)
		conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(w, "%s:%d SET key%d value%d\n", id, seq, uint64(seq)*kvStride%kvKeyCount, seq)
		if len(slots) == depth || len(slots) == 1 {
			if err := w.Flush(); err != nil {
				return err
			}
		}
	}
	w.Flush()
	select {
	case err := <-readErr:
		return err
	case <-time.After(15 * time.Second):
		return fmt.Errorf("client %s: outstanding replies not back 15 s after the window", id)
	}
}
