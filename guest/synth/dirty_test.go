package synth

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

func dirtyConfig(pattern string) guest.Config {
	return guest.Config{Memory: 64 << 20, VCPUs: 2, Workload: guest.Workload{
		Kind: guest.WorkloadDirty, Touch: 4 << 20, DirtyRate: 50_000, Pattern: pattern, Seed: 7}}
}

func TestConfigErrors(t *testing.T) {
	bad := []guest.Config{
		{},
		{Memory: 1000, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}},
		{Memory: 1 << 20, VCPUs: 0, Workload: guest.Workload{Kind: guest.WorkloadKV}},
		{Memory: 1 << 20, VCPUs: 1, Workload: guest.Workload{Kind: "mine"}},
		{Memory: 1 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadDirty, Pattern: "zigzag"}},
		{Memory: 1 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadDirty, Pattern: "seq", Touch: 2 << 20}},
		{Memory: 32 << 10, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}},
		{Memory: 1 << 20, VCPUs: 1, Image: "x.bin", Workload: guest.Workload{Kind: guest.WorkloadKV}},
		{Memory: 1 << 20, VCPUs: 1, Disk: "/nonexistent-dir/disk.img", Workload: guest.Workload{Kind: guest.WorkloadKV}},
	}
	for _, cfg := range bad {
		g, err := New(cfg)
		if err == nil {
			g.Close()
			t.Errorf("New(%+v) accepted", cfg)
			continue
		}
		if !errors.Is(err, guest.ErrConfig) || strings.Contains(err.Error(), "\n") {
			t.Errorf("New(%+v): %q, want one line wrapping ErrConfig", cfg, err)
		}
	}
}

// Every page the workload changes between two syncs is in the second sync;
// every touched page is in the first.
func TestDirtyPagesInSyncDirty(t *testing.T) {
	for _, pattern := range []string{guest.PatternSeq, guest.PatternRandom, guest.PatternHot} {
		t.Run(pattern, func(t *testing.T) {
			cfg := dirtyConfig(pattern)
			g := mustNew(t, cfg)
			pages := cfg.Memory >> guest.PageShift
			touched := cfg.Workload.Touch >> guest.PageShift
			mustResume(t, g)
			// Wait for the touch phase to end.
			deadline := time.Now().Add(10 * time.Second)
			for {
				time.Sleep(20 * time.Millisecond)
				mustPause(t, g)
				if g.vcpus[0].st.Phase == phaseDirty && g.vcpus[1].st.Phase == phaseDirty {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("touch phase did not finish")
				}
				mustResume(t, g)
			}
			first := newBitmap(pages)
			g.SyncDirty(first)
			for p := range touched {
				if !first.has(p) {
					t.Fatalf("touched page %d not reported", p)
				}
			}
			if n := first.count(); uint64(n) != touched {
				t.Fatalf("%d pages reported, %d touched", n, touched)
			}
			snap := bytes.Clone(g.Regions()[0].Mem[:touched<<guest.PageShift])
			mustResume(t, g)
			time.Sleep(50 * time.Millisecond)
			mustPause(t, g)
			second := newBitmap(pages)
			n, _ := g.SyncDirty(second)
			mem := g.Regions()[0].Mem
			changed := 0
			for p := range touched {
				if !bytes.Equal(snap[p<<guest.PageShift:(p+1)<<guest.PageShift], mem[p<<guest.PageShift:(p+1)<<guest.PageShift]) {
					changed++
					if !second.has(p) {
						t.Fatalf("page %d changed but was not reported", p)
					}
				}
			}
			if changed == 0 || n == 0 {
				t.Fatalf("no page changed in 50ms at 50000 pages/s (reported %d)", n)
			}
			// A sync right after reports nothing new while paused.
			if n, _ := g.SyncDirty(newBitmap(pages)); n != 0 {
				t.Fatalf("second sync while paused reported %d pages", n)
			}
		})
	}
}

func TestHotPatternConcentrates(t *testing.T) {
	cfg := dirtyConfig(guest.PatternHot)
	cfg.VCPUs = 1
	g := mustNew(t, cfg)
	v := g.vcpus[0]
	hot := v.n / 10
	inHot := 0
	for range 10000 {
		if v.nextPage() < hot {
			inHot++
		}
	}
	if inHot < 8500 || inHot > 9500 {
		t.Fatalf("%d of 10000 writes in the hot 10%%, want about 9000", inHot)
	}
}

func TestMarkDirtyAndRegions(t *testing.T) {
	g := mustNew(t, dirtyConfig(guest.PatternSeq))
	rs := g.Regions()
	if len(rs) != 1 || rs[0].GPA != 0 || uint64(len(rs[0].Mem)) != 64<<20 {
		t.Fatalf("regions %v", rs)
	}
	g.MarkDirty(3, 130)
	g.MarkDirty(16383, 10) // clamped at the end
	b := newBitmap(16384)
	if n, err := g.SyncDirty(b); err != nil || n != 131 {
		t.Fatalf("SyncDirty: %d, %v; want 131", n, err)
	}
	if b.has(2) || !b.has(3) || !b.has(132) || b.has(133) || !b.has(16383) {
		t.Fatal("wrong pages marked")
	}
}

func TestThrottleSlowsDirtying(t *testing.T) {
	cfg := dirtyConfig(guest.PatternRandom)
	cfg.Workload.Touch = 64 << 10
	g := mustNew(t, cfg)
	mustResume(t, g)
	time.Sleep(50 * time.Millisecond)
	count := func() uint64 {
		mustPause(t, g)
		defer mustResume(t, g)
		return g.vcpus[0].st.Counter + g.vcpus[1].st.Counter
	}
	c0 := count()
	time.Sleep(200 * time.Millisecond)
	free := count() - c0
	g.SetThrottle(80)
	c1 := count()
	time.Sleep(200 * time.Millisecond)
	throttled := count() - c1
	if free == 0 || throttled*2 > free {
		t.Fatalf("throttle 80%%: %d writes vs %d unthrottled", throttled, free)
	}
}

// pauseLatencies pauses and resumes a 2-vCPU dirty guest n times.
func pauseLatencies(tb testing.TB, n int) []time.Duration {
	cfg := dirtyConfig(guest.PatternRandom)
	cfg.Workload.DirtyRate = 200_000
	g, err := New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	defer g.Close()
	g.Resume()
	time.Sleep(20 * time.Millisecond)
	c, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ds := make([]time.Duration, 0, n)
	for range n {
		d, err := g.Pause(c)
		if err != nil {
			tb.Fatal(err)
		}
		ds = append(ds, d)
		g.Resume()
		time.Sleep(200 * time.Microsecond)
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	return ds
}

func percentile(ds []time.Duration, p float64) time.Duration {
	return ds[int(float64(len(ds)-1)*p)]
}

func TestPauseLatency(t *testing.T) {
	ds := pauseLatencies(t, 300)
	p50, p99 := percentile(ds, 0.5), percentile(ds, 0.99)
	t.Logf("pause with 2 vCPUs: p50 %v p99 %v max %v", p50, p99, ds[len(ds)-1])
	limit := time.Millisecond
	if raceEnabled {
		limit = 10 * time.Millisecond // the race detector slows every unit
	}
	if p99 > limit {
		t.Fatalf("pause p99 %v, want under %v", p99, limit)
	}
}

func BenchmarkPause(b *testing.B) {
	ds := pauseLatencies(b, max(b.N, 50))
	b.ReportMetric(float64(percentile(ds, 0.5).Microseconds()), "p50-µs")
	b.ReportMetric(float64(percentile(ds, 0.99).Microseconds()), "p99-µs")
}

func TestPauseResumeIdempotentAndClose(t *testing.T) {
	g := mustNew(t, dirtyConfig(guest.PatternSeq))
	if !g.Paused() {
		t.Fatal("new guest not paused")
	}
	if d, err := g.Pause(ctx(t)); d != 0 || err != nil {
		t.Fatalf("pausing a paused guest: %v %v", d, err)
	}
	if _, err := g.SaveState(); err != nil {
		t.Fatal(err)
	}
	mustResume(t, g)
	if _, err := g.SaveState(); !errors.Is(err, guest.ErrNotPaused) {
		t.Fatalf("SaveState while running: %v", err)
	}
	if err := g.LoadState(guest.MachineState{Kind: Kind}); !errors.Is(err, guest.ErrNotPaused) {
		t.Fatalf("LoadState while running: %v", err)
	}
	mustResume(t, g)
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Pause(ctx(t)); !errors.Is(err, guest.ErrClosed) {
		t.Fatalf("Pause after close: %v", err)
	}
	if _, err := g.SyncDirty(newBitmap(1)); !errors.Is(err, guest.ErrClosed) {
		t.Fatalf("SyncDirty after close: %v", err)
	}
	if g.Regions() != nil {
		t.Fatal("regions after close")
	}
	if err := g.Console().Input([]byte("x")); !errors.Is(err, guest.ErrClosed) {
		t.Fatalf("Input after close: %v", err)
	}
}

// Pause, SyncDirty, console input and output run concurrently with the
// vCPUs; run under -race.
func TestConcurrentUse(t *testing.T) {
	cfg := kvConfig()
	g, out := startKV(t, cfg)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() { // a client on another goroutine
		defer wg.Done()
		for i := 1; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			g.Console().Input(fmt.Appendf(nil, "c:%d SET k%d v\n", i, i%50))
			time.Sleep(100 * time.Microsecond)
		}
	}()
	b := newBitmap(cfg.Memory >> guest.PageShift)
	for range 50 {
		if _, err := g.SyncDirty(b); err != nil {
			t.Fatal(err)
		}
		mustPause(t, g)
		if _, err := g.SaveState(); err != nil {
			t.Fatal(err)
		}
		mustResume(t, g)
		out.take()
	}
	close(stop)
	wg.Wait()
}

func TestDiskStalledFlushAndApply(t *testing.T) {
	dir := t.TempDir()
	cfg := dirtyConfig(guest.PatternRandom)
	cfg.Disk = filepath.Join(dir, "primary.img")
	g := mustNew(t, cfg)
	mustResume(t, g)
	time.Sleep(100 * time.Millisecond)
	mustPause(t, g)
	if err := g.Flush(ctx(t)); err != nil {
		t.Fatal(err)
	}
	ws := g.TakeDiskWrites()
	if len(ws) == 0 {
		t.Fatal("dirty workload with a disk wrote nothing")
	}

	// A replica applies them and its disk matches.
	rcfg := cfg
	rcfg.Disk = filepath.Join(dir, "replica.img")
	r := mustNew(t, rcfg)
	if err := r.ApplyDiskWrites(ws); err != nil {
		t.Fatal(err)
	}
	for _, w := range ws[len(ws)-5:] {
		got := make([]byte, len(w.Data))
		r.BlockDisk().ReadAt(got, int64(w.Offset))
		want := make([]byte, len(w.Data))
		g.BlockDisk().ReadAt(want, int64(w.Offset))
		if !bytes.Equal(got, want) {
			t.Fatalf("replica disk differs at %d", w.Offset)
		}
	}

	// A stalled flush returns at its deadline; the guest keeps running;
	// a later flush completes.
	mustResume(t, g)
	time.Sleep(20 * time.Millisecond)
	g.BlockDisk().StallFlush(300 * time.Millisecond)
	mustPause(t, g)
	c, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := g.Flush(c)
	if !errors.Is(err, guest.ErrFlushDeadline) || time.Since(start) > 200*time.Millisecond {
		t.Fatalf("stalled flush: %v after %v", err, time.Since(start))
	}
	mustResume(t, g)
	if err := g.Flush(ctx(t)); err != nil {
		t.Fatalf("later flush: %v", err)
	}
	if time.Since(start) < 250*time.Millisecond {
		t.Fatal("later flush did not wait for the stalled one")
	}
}

func TestLoadStateRejects(t *testing.T) {
	g := mustNew(t, dirtyConfig(guest.PatternSeq))
	mustResume(t, g)
	time.Sleep(10 * time.Millisecond)
	mustPause(t, g)
	good, err := g.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	edit := func(f func(*guest.MachineState)) guest.MachineState {
		s := guest.MachineState{Kind: good.Kind, Devices: slices.Clone(good.Devices)}
		f(&s)
		return s
	}
	other := mustNew(t, guest.Config{Memory: 64 << 20, VCPUs: 2, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	otherState, _ := other.SaveState()
	bad := map[string]guest.MachineState{
		"kind":     edit(func(s *guest.MachineState) { s.Kind = "kvm" }),
		"version":  edit(func(s *guest.MachineState) { s.Devices[1].Version = 99 }),
		"unknown":  edit(func(s *guest.MachineState) { s.Devices = append(s.Devices, guest.DeviceState{Name: "gpu", Version: 1}) }),
		"garbage":  edit(func(s *guest.MachineState) { s.Devices[1].Fields = []byte{0xc1, 0xff} }),
		"no vcpu":  edit(func(s *guest.MachineState) { s.Devices = slices.Delete(s.Devices, 2, 3) }),
		"instance": edit(func(s *guest.MachineState) { s.Devices[2].Instance = 7 }),
		"shape":    otherState,
		"empty":    {Kind: Kind},
	}
	// Mutate the guest so "unchanged" is visible.
	mustResume(t, g)
	time.Sleep(10 * time.Millisecond)
	mustPause(t, g)
	cur, _ := g.SaveState()
	for name, s := range bad {
		err := g.LoadState(s)
		if !errors.Is(err, guest.ErrState) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: %v, want one line wrapping ErrState", name, err)
		}
		after, _ := g.SaveState()
		if guest.StateDigest(after) != guest.StateDigest(cur) {
			t.Fatalf("%s: a refused LoadState changed the state", name)
		}
	}
	if err := g.LoadState(good); err != nil {
		t.Fatal(err)
	}
	back, _ := g.SaveState()
	if guest.StateDigest(back) != guest.StateDigest(good) {
		t.Fatal("LoadState then SaveState differs")
	}
}

// A dirty guest restored from its image continues its workload: its
// counters go on from the saved ones and the memory matched at the cut.
func TestDirtyRestoreContinues(t *testing.T) {
	cfg := dirtyConfig(guest.PatternSeq)
	g := mustNew(t, cfg)
	mustResume(t, g)
	time.Sleep(30 * time.Millisecond)
	mustPause(t, g)
	img := capture(t, g)
	want := guest.CombineDigest(guest.ScanMemory(g.Regions()).Sum(), img.state)
	saved := g.vcpus[0].st
	g.Close()
	r := img.restore(t, cfg)
	st, _ := r.SaveState()
	if guest.CombineDigest(guest.ScanMemory(r.Regions()).Sum(), st) != want {
		t.Fatal("restored guest's digest differs")
	}
	mustResume(t, r)
	time.Sleep(30 * time.Millisecond)
	mustPause(t, r)
	if r.vcpus[0].st.Counter <= saved.Counter || r.vcpus[0].st.RNG != saved.RNG {
		t.Fatalf("restored vCPU did not continue: %+v after %+v", r.vcpus[0].st, saved)
	}
}

// TestPageWrites: PageWrites, read while the guest runs, follows the
// vCPUs' own counters, and a restored guest goes on from the saved count.
func TestPageWrites(t *testing.T) {
	cfg := dirtyConfig(guest.PatternRandom)
	cfg.Workload.Touch = 64 << 10
	g := mustNew(t, cfg)
	mustResume(t, g)
	deadline := time.Now().Add(5 * time.Second)
	for g.PageWrites() < 1000 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	mustPause(t, g)
	want := g.vcpus[0].st.Counter + g.vcpus[1].st.Counter
	if got := g.PageWrites(); got != want || got == 0 {
		t.Fatalf("PageWrites %d, the vCPUs counted %d", got, want)
	}
	r := capture(t, g).restore(t, cfg)
	if got := r.PageWrites(); got != want {
		t.Fatalf("restored guest: PageWrites %d, want %d", got, want)
	}
}
