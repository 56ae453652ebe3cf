package test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
	"github.com/tandemvm/tandem/internal/netlab"
)

// netBenchMode is what runs the guest in BenchmarkGuestNetUDP.
type netBenchMode struct {
	name      string
	protected bool     // a pair (primary and secondary) instead of tandem run
	extra     []string // the primary's flags
}

// netBenchModes are measured in this order: the unprotected baseline
// first, so the protected cases report their rate as a ratio to it.
var netBenchModes = []netBenchMode{
	{name: "unprotected"},
	{name: "protected", protected: true, extra: []string{"--epoch-trigger", "clock"}},
	{name: "protected-output-trigger", protected: true, extra: []string{"--epoch-trigger", "output"}},
}

// netBenchClients: one synchronous client, and many at once (each
// synchronous, so up to that many requests are in flight).
var netBenchClients = []int{1, 16}

// BenchmarkGuestNetUDP measures the kv service over the guest's network
// card from the lab's client namespace: requests per second and the
// client's round trip (p50, p99), for `tandem run` (unprotected) and a
// protected pair with the same --net, in the same run, per guest. For a
// protected primary it also reports the output gate's figures from its
// status: frames released per committed epoch (every frame is held until
// its epoch is acknowledged) and the gate's output delay p50/p99.
func BenchmarkGuestNetUDP(b *testing.B) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			skipUnlessKind(b, kind)
			l := netlab.New(b)
			baseline := map[int]float64{}
			for _, m := range netBenchModes {
				pri := startNetBench(b, l, kind, m)
				for _, clients := range netBenchClients {
					b.Run(fmt.Sprintf("%s/clients=%d", m.name, clients), func(b *testing.B) {
						before := mustTrioStat(b, pri)
						f := udpBench(b, l, clients)
						after := mustTrioStat(b, pri)
						b.ReportMetric(f.rate, "req/s")
						b.ReportMetric(f.p50, "p50-ms")
						b.ReportMetric(f.p99, "p99-ms")
						if !m.protected {
							baseline[clients] = f.rate
							return
						}
						if base := baseline[clients]; base > 0 {
							b.ReportMetric(f.rate/base, "rate/unprotected")
						}
						reportGate(b, before, after)
					})
				}
				pri.kill()
			}
		})
	}
}

// startNetBench starts mode m's guest with its card at guestNetAddr on
// a fresh TAP of l (a pair: the secondary with a TAP of its own) and
// returns the node that runs it, once a request is answered.
func startNetBench(b *testing.B, l *netlab.Lab, kind string, m netBenchMode) *node {
	b.Helper()
	card := []string{"--guest-ip", guestNetAddr + "/24", "--net", "tap:" + l.TapName() + ",bridge=" + l.Bridge}
	var pri *node
	if m.protected {
		var sec *node
		pri, sec, _ = startPair(b, kind, primaryOpts{memory: "128MiB", extra: append(card, m.extra...)},
			"--net", "tap:"+l.TapName()+",bridge="+l.Bridge)
		b.Cleanup(func() { sec.kill() })
	} else {
		pri = startWithPorts(b, "run-"+kind, false, append(guestOpts{memory: "128MiB", workload: "kv"}.args(kind), card...)...)
	}
	w := &e2e.UDPKV{Conn: l.DialUDP(guestNetAddr + ":7000"), Client: "warm-" + m.name}
	// Closed here, not only when the lab's test ends: the lab outlives
	// every mode and every b.N round of the benchmark.
	defer w.Conn.Close()
	if _, err := w.Do(context.Background(), "GET warm", 20*time.Second); err != nil {
		b.Fatalf("%s: %v", m.name, err)
	}
	return pri
}

// udpFigures are one udpBench run's: requests per second and the round
// trip's percentiles in milliseconds.
type udpFigures struct{ rate, p50, p99 float64 }

// benchClientIDs keeps every benchmark client's id unique, so no request
// is answered from an earlier client's record.
var benchClientIDs atomic.Int64

// udpBench sends b.N SETs over UDP from clients synchronous clients at
// once, each from its own socket and id, resent after 500 ms without a
// reply (a lost datagram; the same id, so never applied twice).
func udpBench(b *testing.B, l *netlab.Lab, clients int) udpFigures {
	b.Helper()
	conns := make([]*e2e.UDPKV, clients)
	for i := range conns {
		conns[i] = &e2e.UDPKV{Conn: l.DialUDP(guestNetAddr + ":7000"), Retry: 500 * time.Millisecond,
			Client: fmt.Sprintf("bench%d", benchClientIDs.Add(1))}
	}
	// Each b.N round opens clients sockets; close them with the round (the
	// lab's cleanup, at the benchmark's end, would keep them all open).
	defer func() {
		for _, w := range conns {
			w.Conn.Close()
		}
	}()
	var next atomic.Int64
	rtts := make([][]time.Duration, clients)
	errs := make([]error, clients)
	var wg sync.WaitGroup
	b.ResetTimer()
	t0 := time.Now()
	for i, w := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := next.Add(1); n <= int64(b.N); n = next.Add(1) {
				s := time.Now()
				got, err := w.Do(context.Background(), fmt.Sprintf("SET bk%d v%d", n, n), 10*time.Second)
				if err == nil && got != "OK" {
					err = fmt.Errorf("SET bk%d: %q", n, got)
				}
				if err != nil {
					errs[i] = err
					return
				}
				rtts[i] = append(rtts[i], time.Since(s))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0)
	b.StopTimer()
	for _, err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	all := slices.Concat(rtts...)
	slices.Sort(all)
	ms := func(p float64) float64 {
		return float64(all[min(len(all)-1, int(p*float64(len(all))))]) / float64(time.Millisecond)
	}
	return udpFigures{rate: float64(len(all)) / elapsed.Seconds(), p50: ms(0.50), p99: ms(0.99)}
}

// reportGate reports a protected primary's output gate over a run:
// frames released per committed epoch, and its output delay p50/p99 as
// status gives them at the end.
func reportGate(b *testing.B, before, after trioStatus) {
	if before.Net == nil || after.Net == nil || before.Net.FramesReleased == nil || after.Net.FramesReleased == nil {
		b.Fatalf("the protected primary's status has no released frames: %+v", after.Net)
	}
	frames := *after.Net.FramesReleased - *before.Net.FramesReleased
	if epochs := after.LastCommittedEpoch() - before.LastCommittedEpoch(); epochs > 0 {
		b.ReportMetric(float64(frames)/float64(epochs), "frames/epoch")
	}
	ep := e2e.Epochs(after)
	b.ReportMetric(ep.OutputDelayP50Ms, "gate-p50-ms")
	b.ReportMetric(ep.OutputDelayP99Ms, "gate-p99-ms")
}

// mustTrioStat is n's status (api.Status), or the benchmark fails.
func mustTrioStat(b *testing.B, n *node) trioStatus {
	b.Helper()
	st, err := trioStat(n.api)
	if err != nil {
		b.Fatal(err)
	}
	return st
}
