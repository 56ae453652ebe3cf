package postcopy

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/precopy"
)

// slowLinkResult is one post-copy migration over a capped link.
type slowLinkResult struct {
	resume, total, blocktime time.Duration
	vcpuBlockMs              []int64
	owed, requests, pushed   uint64
	writeRate                float64 // page writes/s the destination guest made during post-copy
}

// postcopySlowLink migrates a running synth guest post-copy at once
// (nothing sent before the switch, as --postcopy-after-rounds 0) over
// loopback capped at rate bytes/s, and times it: resume is the source's
// pause to the destination guest's resume, total the pause to the last
// page's arrival (the source's guest is paused from then on).
func postcopySlowLink(tb testing.TB, k kind, cfg guest.Config, rate uint64) slowLinkResult {
	src, err := k.new(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	defer src.Close()
	dst, err := k.new(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	defer dst.Close()
	writes := func(g guest.Guest) uint64 { return g.(guest.PageWriteCounter).PageWrites() }
	if _, err := src.Resume(); err != nil {
		tb.Fatal(err)
	}
	// The touch fills the range first; the dirty phase counts writes.
	for deadline := time.Now().Add(5 * time.Minute); writes(src) < cfg.Workload.DirtyRate; {
		if time.Now().After(deadline) {
			tb.Fatalf("the workload made %d writes in 5 minutes", writes(src))
		}
		time.Sleep(50 * time.Millisecond)
	}
	var r slowLinkResult
	t0 := time.Now()
	if _, err := src.Pause(context.Background()); err != nil {
		tb.Fatal(err)
	}
	missing := precopy.NewBitmap(cfg.Memory >> guest.PageShift)
	for _, reg := range src.Regions() {
		guest.Populated(reg, func(first, n uint64) error {
			for p := first; p < first+n; p++ {
				missing.Set(reg.FirstPage() + p)
			}
			return nil
		})
	}
	src.SyncDirty(precopy.NewBitmap(missing.Len()))
	state, err := src.SaveState()
	if err != nil {
		tb.Fatal(err)
	}
	if err := dst.LoadState(state); err != nil {
		tb.Fatal(err)
	}
	r.owed = missing.Count()
	tg, err := NewTarget(TargetConfig{Regions: dst.Regions(), Missing: missing, State: state, VCPUs: cfg.VCPUs, VCPUOf: k.vcpuOf(dst)})
	if err != nil {
		tb.Fatal(err)
	}
	defer tg.Close()
	k.setPostcopy(dst, true)
	if _, err := dst.Resume(); err != nil {
		tb.Fatal(err)
	}
	r.resume = time.Since(t0)
	l := newLinksTB(tb)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var srcErr, dstErr error
	var wg sync.WaitGroup
	wg.Go(func() { dstErr = tg.Run(ctx, l.dstUrgent, l.dstBulk) })
	// The source's digest needs a scan of its paused memory: it is not on
	// the destination's path, so it runs after the resume, as the
	// precopy switch-over's does.
	digest := guest.CombineDigest(guest.ScanMemory(src.Regions()).Sum(), state)
	source := NewSource(src.Regions(), digest)
	source.Limiter = precopy.NewLimiter(rate, 0, nil)
	wg.Go(func() { srcErr = source.Run(ctx, l.srcUrgent, l.srcBulk) })
	// The KVM guest keeps its write counters in guest memory: reading
	// them may itself wait for a page, so only once the runs are going.
	writesFrom, writes0 := time.Now(), writes(dst)
	wg.Wait()
	r.total = time.Since(t0)
	k.setPostcopy(dst, false)
	if srcErr != nil || dstErr != nil {
		tb.Fatalf("source: %v; destination: %v", srcErr, dstErr)
	}
	st, ss := tg.Stats(), source.Stats()
	r.blocktime, r.vcpuBlockMs, r.requests, r.pushed = st.Blocktime, st.BlocktimeMs, ss.Requests, ss.Pushed
	r.writeRate = float64(writes(dst)-writes0) / time.Since(writesFrom).Seconds()
	if st.Digest != digest.String() {
		tb.Fatalf("destination digest %s, source %s", st.Digest, digest)
	}
	return r
}

// BenchmarkPostcopySlowLink is the case: a 1 GiB guest with
// 512 MiB of random content writing 25,000 random pages/s, migrated
// post-copy at once over 100 Mbit/s; with the 8-byte counter writes of
// BenchmarkMigrateSlowLink (precopy converges there thanks to the delta
// cache) and with whole pages of fresh random data (it does not). The
// synth guest; BenchmarkPostcopySlowLinkKVM is the KVM guest's.
func BenchmarkPostcopySlowLink(b *testing.B) { benchSlowLink(b, synthKind) }

// BenchmarkPostcopySlowLinkKVM is BenchmarkPostcopySlowLink on the KVM
// guest (its vCPUs wait for pages inside KVM_RUN).
func BenchmarkPostcopySlowLinkKVM(b *testing.B) {
	if err := kvm.Available(); err != nil {
		b.Skipf("no usable KVM: %v", err)
	}
	if _, err := kvm.DefaultImage(); err != nil {
		b.Skipf("no micro-guest image (make guest-image): %v", err)
	}
	benchSlowLink(b, kvmKind)
}

func benchSlowLink(b *testing.B, k kind) {
	for _, w := range []struct {
		name  string
		bytes int
		data  string
	}{{"8B-counter", 8, guest.WriteCounter}, {"4KiB-random", 4096, guest.WriteRandom}} {
		b.Run(w.name, func(b *testing.B) {
			cfg := guest.Config{Memory: 1 << 30, VCPUs: 2, Workload: guest.Workload{
				Kind: guest.WorkloadDirty, Touch: 512 << 20, DirtyRate: 25000, Pattern: guest.PatternRandom,
				Fill: guest.FillRandom, Seed: 1, WriteBytes: w.bytes, WriteData: w.data}}
			var resumes, totals, blocks []float64
			for range b.N {
				r := postcopySlowLink(b, k, cfg, 100e6/8)
				b.Logf("resume %v, total %v, %d pages owed: %d requested, %d pushed; blocked %v (per vCPU ms %v); %.0f page writes/s during post-copy",
					r.resume.Round(time.Millisecond), r.total.Round(time.Millisecond), r.owed, r.requests, r.pushed, r.blocktime.Round(time.Millisecond), r.vcpuBlockMs, r.writeRate)
				resumes = append(resumes, float64(r.resume.Microseconds())/1000)
				totals = append(totals, float64(r.total.Milliseconds()))
				blocks = append(blocks, float64(r.blocktime.Milliseconds()))
			}
			b.ReportMetric(median(resumes), "resume-ms")
			b.ReportMetric(median(totals), "total-ms")
			b.ReportMetric(median(blocks), "blocktime-ms")
		})
	}
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}
