package test

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// migRun is one migration's figures.
type migRun struct {
	total, downtime, wire float64
	rounds, throttle      int
	srcCPU, dstCPU        float64 // ms of CPU over the migration
	attempts              []attemptReport
	// The destination over the afterRun after it resumed: its CPU (ms
	// per second) and its guest's page writes per second. A receiver
	// that leaves work for later (first touches of memory the guest
	// writes) shows it here.
	afterCPU, afterWrites float64
}

// afterRun is how long honestMigrate watches the destination after the
// switch.
const afterRun = 2 * time.Second

// honestMigrate starts a source with the given guest arguments and a
// receiver, waits settle for the guest's fill, migrates with extra flags
// (to through a shaped link when linkBps > 0) and returns the figures; it
// fails the benchmark unless the migration completed with equal digests.
func honestMigrate(b *testing.B, kind string, guestArgs []string, touch uint64, settle time.Duration, linkBps uint64, extra ...string) migRun {
	b.Helper()
	b.StopTimer()
	src := startWithPorts(b, "source-"+kind, false, guestArgs...)
	dst := startReceiver(b)
	defer src.kill()
	defer dst.kill()
	to := dst.data
	if linkBps > 0 {
		to = startProxy(b, dst.data, linkBps).Addr()
	}
	waitWorkload(b, src, touch)
	time.Sleep(settle)
	// CPU of both processes over the migration (the source's includes its
	// guest's vCPUs, the destination's its guest's first moments).
	srcCPU0, dstCPU0 := procCPU(src.Pid()), procCPU(dst.Pid())
	b.StartTimer()
	r, st := migrate(b, src, to, extra...)
	b.StopTimer()
	srcCPU, dstCPU := procCPU(src.Pid())-srcCPU0, procCPU(dst.Pid())-dstCPU0
	if r.code != 0 || st.Status != "completed" {
		after := mustStatus(b, src)
		b.Fatalf("migrate exit %d, status %q (%d syncs, %.1f MiB sent, %.1f MiB remaining, throttle %d%%)\n%s", r.code, st.Status,
			after.DirtySyncCount, float64(after.TransferredBytes)/(1<<20), float64(after.RemainingBytes)/(1<<20), ptrInt(after.ThrottlePercent), r.stderr)
	}
	if st.SwitchoverDigest == "" || st.SwitchoverDigest != st.DestinationDigest {
		b.Fatalf("switchover digests differ: %q vs %q", st.SwitchoverDigest, st.DestinationDigest)
	}
	cpu0, w0, t0 := procCPU(dst.Pid()), mustStatus(b, dst).PageWrites, time.Now()
	time.Sleep(afterRun)
	cpu1, w1 := procCPU(dst.Pid()), mustStatus(b, dst).PageWrites
	secs := time.Since(t0).Seconds()
	var full struct {
		Attempts []attemptReport `json:"attempts"`
	}
	if j := strings.Index(r.stdout, "\n{"); j >= 0 {
		_ = json.Unmarshal([]byte(r.stdout[j+1:]), &full)
	}
	return migRun{total: float64(st.TotalTimeMs), downtime: float64(st.DowntimeMs), wire: float64(st.TransferredBytes),
		rounds: int(st.DirtySyncCount), throttle: ptrInt(st.ThrottlePercent), attempts: full.Attempts,
		srcCPU: srcCPU * 1000, dstCPU: dstCPU * 1000,
		afterCPU: (cpu1 - cpu0) * 1000 / secs, afterWrites: float64(w1-w0) / secs}
}

func (r migRun) String() string {
	var atts []string
	for _, a := range r.attempts {
		atts = append(atts, fmt.Sprintf("[exp %.0f; final %d pages exp %.0f; actual %.0f, send %.0f; %s]",
			a.ExpectedDowntimeMs, a.FinalPages, a.FinalExpectedMs, a.ActualDowntimeMs, a.FinalSendMs, a.Outcome))
	}
	return fmt.Sprintf("total %.0f ms, downtime %.0f ms, wire %.1f MiB, %d syncs, throttle %d%%, CPU source %.0f ms, destination %.0f ms, attempts %s; after: destination CPU %.0f ms/s, guest %.0f writes/s",
		r.total, r.downtime, r.wire/(1<<20), r.rounds, r.throttle, r.srcCPU, r.dstCPU, strings.Join(atts, " "), r.afterCPU, r.afterWrites)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// honestSettle is how long a generated fill of touch bytes may take
// beyond waitWorkload's wait: the micro-guest fills at about 110 MB/s
// behind write faults on kvm-pvm (docs/PERFORMANCE.md).
func honestSettle(kind string, touch uint64) time.Duration {
	if kind == "kvm" {
		return time.Duration(touch/(100<<20))*time.Second + time.Second
	}
	return time.Second
}

// BenchmarkMigrateHonest: issue 11 items 2 and 3 on the workload:
// a 1 GiB guest, 512 MiB touched with random (incompressible) pages,
// 25,000 random pages/s of 8-byte writes, loopback, no cap, the 300 ms
// limit; with compression none and default, one stream and several
// ($TANDEM_STREAMS), other fills ($TANDEM_FILLS), rates
// ($TANDEM_DIRTY_RATE), write sizes ($TANDEM_WRITE_BYTES), patterns
// ($TANDEM_DIRTY_PATTERN) and compressions ($TANDEM_COMPRESSIONS).
// Reports the median total time and downtime over b.N runs (use
// -benchtime 5x) and logs every run's attempts. QEMU 7.2 on the machine
// of issue 11: total 2,210 ms, downtime 31 ms; targets: downtime median
// <= 35 ms, total <= 0.5x QEMU's multifd (680 ms there). QEMU on the
// machine at hand: docs/qemu-migration-baseline.sh.
func BenchmarkMigrateHonest(b *testing.B) {
	streams := []string{"1"}
	if s := os.Getenv("TANDEM_STREAMS"); s != "" {
		streams = strings.Split(s, ",")
	}
	fills := []string{"random"}
	if s := os.Getenv("TANDEM_FILLS"); s != "" {
		fills = strings.Split(s, ",")
	}
	rate := "25000"
	if s := os.Getenv("TANDEM_DIRTY_RATE"); s != "" {
		rate = s
	}
	// $TANDEM_WRITE_BYTES=4096 rewrites whole pages with fresh random
	// data (the default is the 8-byte writes).
	var writes []string
	if s := os.Getenv("TANDEM_WRITE_BYTES"); s != "" {
		writes = []string{"--write-bytes", s, "--write-data", "random"}
	}
	// $TANDEM_DIRTY_PATTERN=seq writes the pages in order, as the guest
	// of docs/qemu-migration-baseline.sh does (the last flag wins).
	if s := os.Getenv("TANDEM_DIRTY_PATTERN"); s != "" {
		writes = append(writes, "--dirty-pattern", s)
	}
	comps := []string{"none", "default"}
	if s := os.Getenv("TANDEM_COMPRESSIONS"); s != "" {
		comps = strings.Split(s, ",")
	}
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			skipUnlessKind(b, kind)
			for _, fill := range fills {
				for _, comp := range comps {
					for _, ns := range streams {
						b.Run(fmt.Sprintf("%s/%s/streams=%s", fill, comp, ns), func(b *testing.B) {
							var totals, downs, srcCPU, dstCPU, afterCPU []float64
							for i := 0; i < b.N; i++ {
								args := profileArgs(kind, "1GiB", "512MiB", rate, append([]string{"--fill", fill}, writes...)...)
								flags := []string{"--downtime-limit", downtimeFlag, "--compression", comp, "--max-time", "2m"}
								if ns != "1" {
									flags = append(flags, "--streams", ns)
								}
								r := honestMigrate(b, kind, args, 512<<20, honestSettle(kind, 512<<20), 0, flags...)
								b.Logf("%s %s %s streams %s: %v", kind, fill, comp, ns, r)
								totals = append(totals, r.total)
								downs = append(downs, r.downtime)
								srcCPU = append(srcCPU, r.srcCPU)
								dstCPU = append(dstCPU, r.dstCPU)
								afterCPU = append(afterCPU, r.afterCPU)
							}
							b.ReportMetric(median(afterCPU), "dst-cpu-after-ms/s")
							b.ReportMetric(median(srcCPU), "src-cpu-ms")
							b.ReportMetric(median(dstCPU), "dst-cpu-ms")
							b.ReportMetric(median(totals), "total-ms")
							b.ReportMetric(median(downs), "downtime-ms")
							b.ReportMetric(slices.Max(downs), "max-downtime-ms")
						})
					}
				}
			}
		})
	}
}

// BenchmarkMigrateSlowLinkWholePages is BenchmarkMigrateSlowLink with
// every write a whole page of fresh random data: the delta cache gains
// nothing, and precopy is not expected to converge in the 90 s (it is the
// baseline of postcopy's BenchmarkPostcopySlowLink/4KiB-random, see
// docs/POSTCOPY.md). It reports how the migration ended instead of
// failing on it: the total, and the memory still dirty at the end.
func BenchmarkMigrateSlowLinkWholePages(b *testing.B) {
	skipUnlessKind(b, "synth")
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		src := startWithPorts(b, "source-synth", false, profileArgs("synth", "1GiB", "512MiB", "25000",
			"--fill", "random", "--write-bytes", "4096", "--write-data", "random")...)
		dst := startReceiver(b)
		waitWorkload(b, src, 512<<20)
		time.Sleep(honestSettle("synth", 512<<20))
		b.StartTimer()
		r, st := migrate(b, src, dst.data, "--downtime-limit", downtimeFlag, "--max-bandwidth", "100Mbit", "--max-time", "90s")
		b.StopTimer()
		after := mustStatus(b, src)
		b.Logf("synth whole random pages 100Mbit: exit %d, status %s, total %d ms, downtime %d ms, %d syncs, %.1f MiB sent, %.1f MiB still dirty, throttle %d%%",
			r.code, st.Status, st.TotalTimeMs, st.DowntimeMs, after.DirtySyncCount, float64(after.TransferredBytes)/(1<<20),
			float64(after.RemainingBytes)/(1<<20), ptrInt(after.ThrottlePercent))
		b.ReportMetric(float64(st.TotalTimeMs), "total-ms")
		b.ReportMetric(float64(after.RemainingBytes)/(1<<20), "dirty-MiB")
		src.kill()
		dst.kill()
	}
}

// BenchmarkMigrateSlowLink: issue 11 item 4, a 1 GiB guest with 512 MiB
// of random (incompressible) pages dirtying 25,000 random pages/s of
// 8-byte writes, over a link capped at 100 Mbit/s (--max-bandwidth, on
// loopback), default compression: it must converge within 90 s (round 0
// alone is about 45 s at that rate) with the downtime under the 300 ms
// limit. Long: run it alone, -benchtime 1x.
func BenchmarkMigrateSlowLink(b *testing.B) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			skipUnlessKind(b, kind)
			var totals, downs []float64
			for i := 0; i < b.N; i++ {
				args := profileArgs(kind, "1GiB", "512MiB", "25000", "--fill", "random")
				r := honestMigrate(b, kind, args, 512<<20, honestSettle(kind, 512<<20), 0,
					"--downtime-limit", downtimeFlag, "--max-bandwidth", "100Mbit", "--max-time", "90s")
				b.Logf("%s random 100Mbit: %v", kind, r)
				totals = append(totals, r.total)
				downs = append(downs, r.downtime)
			}
			b.ReportMetric(median(totals), "total-ms")
			b.ReportMetric(median(downs), "downtime-ms")
		})
	}
}
