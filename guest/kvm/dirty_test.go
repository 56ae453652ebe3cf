package kvm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/block"
)

func dirtyConfig(mem, touch, rate uint64, pattern string, vcpus int) guest.Config {
	return guest.Config{Memory: mem, VCPUs: vcpus, Workload: guest.Workload{Kind: guest.WorkloadDirty,
		Touch: touch, DirtyRate: rate, Pattern: pattern, Seed: 1}}
}

func waitProgress(t testing.TB, g *Guest, phase uint32) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for g.Progress() < phase {
		if err := g.Err(); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("workload did not reach phase %d within 10s", phase)
		}
		time.Sleep(time.Millisecond)
	}
}

// The touch phase writes every page of the touched range exactly once: the
// bitmap must hold at least those pages, on every dirty-log method, and a
// second sync with the guest idle must report none of them again. The
// touch is 2,048 pages over 2 vCPUs against rings of 256 entries, so the
// ring method also goes through ring-full exits.
func TestDirtyLogHoldsTouchedPages(t *testing.T) {
	skipWithoutKVM(t)
	for _, m := range []DirtyMethod{DirtyManualClear, DirtyGetLog, DirtyRing} {
		t.Run(m.String(), func(t *testing.T) {
			const touch = 8 << 20
			g, err := NewWithOptions(dirtyConfig(64<<20, touch, 0, guest.PatternSeq, 2), Options{DirtyMethod: m, DirtyRingEntries: 256})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			if g.DirtyMethod() != m {
				t.Fatalf("asked for %v, got %v", m, g.DirtyMethod())
			}
			mustResume(t, g)
			waitProgress(t, g, 1)
			mustPause(t, g)
			log := newWordLog()
			if _, err := g.SyncDirty(log); err != nil {
				t.Fatal(err)
			}
			first := uint64(dataGPA) >> guest.PageShift
			for p := first; p < first+touch>>guest.PageShift; p++ {
				if !log.has(p) {
					t.Fatalf("touched page %d (GPA %#x) missing from the dirty log", p, p<<guest.PageShift)
				}
			}
			// boot writes by Tandem itself are in the log too
			if !log.has(bootGPA>>guest.PageShift) || !log.has(imageGPA>>guest.PageShift) {
				t.Fatal("pages Tandem wrote at boot are missing from the dirty log")
			}
			if m == DirtyRing && g.ringFulls.Load() == 0 {
				t.Fatal("2,048 pages on 256-entry rings caused no ring-full exit")
			}
			t.Logf("%d dirty 64-page words in the first sync, %d ring-full exits", len(log.words), g.ringFulls.Load())
			again := newWordLog()
			n, err := g.SyncDirty(again)
			if err != nil {
				t.Fatal(err)
			}
			if n != 0 {
				t.Fatalf("second sync of a paused guest reported %d pages", n)
			}
			g.MarkDirty(first+5, 3)
			n, _ = g.SyncDirty(again)
			if n != 3 || !again.has(first+7) {
				t.Fatalf("MarkDirty(5,3) gave %d pages", n)
			}
		})
	}
}

// A running dirty workload keeps producing pages across syncs; the rate
// the log shows is near the configured one. With the ring, SyncDirty runs
// while the vCPU pushes entries, and the ring (1,024 entries) is smaller
// than what 300 ms at 20,000 pages/s dirties, so ring-full exits happen
// while the vCPU runs.
func TestDirtyRate(t *testing.T) {
	skipWithoutKVM(t)
	for _, m := range []DirtyMethod{DirtyGetLog, DirtyRing} {
		t.Run(m.String(), func(t *testing.T) { testDirtyRate(t, m) })
	}
}

func testDirtyRate(t *testing.T, m DirtyMethod) {
	g, err := NewWithOptions(dirtyConfig(128<<20, 64<<20, 20000, guest.PatternSeq, 1), Options{DirtyMethod: m, DirtyRingEntries: 1024})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	mustResume(t, g)
	waitProgress(t, g, 1)
	if _, err := g.SyncDirty(newWordLog()); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	time.Sleep(300 * time.Millisecond)
	log := newWordLog()
	n, err := g.SyncDirty(log)
	if err != nil {
		t.Fatal(err)
	}
	rate := float64(n) / time.Since(start).Seconds()
	if rate < 6000 || rate > 30000 { // lenient: the 2-core host is shared
		t.Fatalf("dirty rate %.0f pages/s, configured 20000", rate)
	}
}

func TestBadInput(t *testing.T) {
	skipWithoutKVM(t)
	dir := t.TempDir()
	cfg := kvConfig(64<<20, 1)
	t.Run("missing image", func(t *testing.T) {
		c := cfg
		c.Image = filepath.Join(dir, "nope.bin")
		if _, err := New(c); !errors.Is(err, ErrImage) || !strings.Contains(err.Error(), "make guest-image") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("corrupt image", func(t *testing.T) {
		good, err := DefaultImage()
		if err != nil {
			t.Fatal(err)
		}
		data, _ := os.ReadFile(good)
		for name, b := range map[string][]byte{
			"empty":     {},
			"magic":     append([]byte("XXXXXXXX"), data[8:]...),
			"truncated": data[:40],
			"entry":     func() []byte { d := append([]byte(nil), data...); d[16] = 0xff; d[19] = 0x7f; return d }(),
		} {
			p := filepath.Join(dir, name+".bin")
			os.WriteFile(p, b, 0o644)
			c := cfg
			c.Image = p
			if _, err := New(c); !errors.Is(err, ErrImage) {
				t.Errorf("%s: got %v, want ErrImage", name, err)
			}
		}
	})
	t.Run("too little memory", func(t *testing.T) {
		if _, err := New(kvConfig(16<<20, 1)); !errors.Is(err, guest.ErrConfig) {
			t.Fatalf("got %v", err)
		}
		if _, err := New(kvConfig(128<<30, 1)); !errors.Is(err, guest.ErrConfig) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("exception in guest", func(t *testing.T) {
		g, err := NewWithOptions(cfg, Options{faultTest: true})
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		mustResume(t, g)
		select {
		case <-g.Failed():
		case <-time.After(10 * time.Second):
			t.Fatal("guest exception not reported within 10s")
		}
		if err := g.Err(); err == nil || !strings.Contains(err.Error(), "#UD") {
			t.Fatalf("got %v", err)
		}
		// Pause and Close still return.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if _, err := g.Pause(ctx); err != nil {
			t.Fatal(err)
		}
	})
}

// A stalled disk flush misses its deadline with ErrFlushDeadline; the guest
// keeps running and the writes it made show up in TakeDiskWrites.
func TestDiskFlushStall(t *testing.T) {
	skipWithoutKVM(t)
	d, err := block.Open(filepath.Join(t.TempDir(), "disk.img"), block.Options{})
	if err != nil {
		t.Fatal(err)
	}
	g, err := NewWithOptions(dirtyConfig(64<<20, 4<<20, 20000, guest.PatternSeq, 1), Options{Disk: d})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	mustResume(t, g)
	waitProgress(t, g, 1)
	time.Sleep(200 * time.Millisecond)
	mustPause(t, g)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	if err := g.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	cancel()
	ws := g.TakeDiskWrites()
	if len(ws) < 10 {
		t.Fatalf("%d disk writes after 200ms at 20000 pages/s (one per 64 pages)", len(ws))
	}
	for _, w := range ws {
		if len(w.Data) != guest.PageSize || w.Offset%guest.PageSize != 0 || w.Offset >= diskBytes {
			t.Fatalf("odd disk write: %d bytes at %d", len(w.Data), w.Offset)
		}
	}
	// State carries the disk; a restore keeps the counters.
	st, err := g.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.LoadState(st); err != nil {
		t.Fatal(err)
	}
	mustResume(t, g)
	time.Sleep(50 * time.Millisecond)
	mustPause(t, g)
	d.StallFlush(2 * time.Second)
	ctx, cancel = context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = g.Flush(ctx)
	if !errors.Is(err, guest.ErrFlushDeadline) {
		t.Fatalf("stalled flush: got %v", err)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("stalled flush took %v to give up", el)
	}
	mustResume(t, g)
	if err := g.Err(); err != nil {
		t.Fatal(err)
	}
}

func TestThrottle(t *testing.T) {
	skipWithoutKVM(t)
	g, err := New(dirtyConfig(128<<20, 64<<20, 40000, guest.PatternSeq, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	mustResume(t, g)
	waitProgress(t, g, 1)
	measure := func() float64 {
		g.SyncDirty(newWordLog())
		start := time.Now()
		time.Sleep(200 * time.Millisecond)
		n, _ := g.SyncDirty(newWordLog())
		return float64(n) / time.Since(start).Seconds()
	}
	free := measure()
	g.SetThrottle(90)
	slow := measure()
	g.SetThrottle(0)
	t.Logf("dirty pages/s: unthrottled %.0f, throttled 90%% %.0f", free, slow)
	if slow > free*0.6 {
		t.Fatalf("throttle 90%% left the rate at %.0f of %.0f pages/s", slow, free)
	}
}

// Lazy tracking (guest.LazyDirtyLog, the clear method only): after
// DiscardDirty nothing is write-protected; TrackDirty protects just the
// pages given, so a paused guest's next sync reports the untracked
// touched pages (conservatively) and none of the tracked ones, and once
// the guest runs again its writes to tracked pages are logged (they
// fault: a write to a page left writable would not be).
func TestLazyDirtyLog(t *testing.T) {
	skipWithoutKVM(t)
	g, err := NewWithOptions(dirtyConfig(64<<20, 8<<20, 20000, guest.PatternSeq, 1), Options{DirtyMethod: DirtyManualClear})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	mustResume(t, g)
	waitProgress(t, g, 1)
	mustPause(t, g)
	if ok, err := g.DiscardDirty(); !ok || err != nil {
		t.Fatalf("DiscardDirty on the clear method: %v, %v", ok, err)
	}
	first := uint64(dataGPA) >> guest.PageShift
	const touched = (8 << 20) >> guest.PageShift
	// Tracked: pages 3 to 1,099 of the touch (an unaligned start and end).
	if err := g.TrackDirty(first+3, 1097); err != nil {
		t.Fatal(err)
	}
	log := newWordLog()
	if _, err := g.SyncDirty(log); err != nil {
		t.Fatal(err)
	}
	for p := first; p < first+touched; p++ {
		tracked := p >= first+3 && p < first+1100
		if log.has(p) == tracked {
			t.Fatalf("page %d of the touch (tracked %v): reported %v", p-first, tracked, log.has(p))
		}
	}
	// Everything is tracked now: the guest's writes must reach the log.
	mustResume(t, g)
	time.Sleep(100 * time.Millisecond)
	mustPause(t, g)
	again := newWordLog()
	n, err := g.SyncDirty(again)
	if err != nil {
		t.Fatal(err)
	}
	if n < 500 {
		t.Fatalf("100 ms at 20,000 pages/s after tracking: %d pages logged", n)
	}

	other, err := NewWithOptions(dirtyConfig(64<<20, 0, 0, guest.PatternSeq, 1), Options{DirtyMethod: DirtyGetLog})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if ok, err := other.DiscardDirty(); ok || err != nil {
		t.Fatalf("DiscardDirty on the get method: %v, %v (want false, nil)", ok, err)
	}
}

// TrackDirty over ranges that cross the 32-bit hole (two slots), start
// and end off a 64-page boundary and reach a slot's end: KVM refuses a
// CLEAR_DIRTY_LOG whose range is not word-aligned or runs past its slot.
func TestTrackDirtyAcrossSlots(t *testing.T) {
	skipWithoutKVM(t)
	g, err := NewWithOptions(dirtyConfig(5<<30, 0, 0, guest.PatternSeq, 1), Options{DirtyMethod: DirtyManualClear})
	if err != nil {
		t.Skipf("a 5 GiB guest: %v", err)
	}
	defer g.Close()
	if len(g.slots) < 2 {
		t.Fatalf("%d memory slots for 5 GiB, want 2", len(g.slots))
	}
	if ok, err := g.DiscardDirty(); !ok || err != nil {
		t.Fatalf("DiscardDirty: %v, %v", ok, err)
	}
	end0 := (g.slots[0].gpa + uint64(len(g.slots[0].mem))) >> guest.PageShift
	first1 := g.slots[1].gpa >> guest.PageShift
	last := first1 + uint64(len(g.slots[1].mem))>>guest.PageShift
	for _, r := range [][2]uint64{{0, end0}, {end0 - 3, first1 - end0 + 70}, {3, 1}, {last - 5, 5}, {0, last}} {
		if err := g.TrackDirty(r[0], r[1]); err != nil {
			t.Fatalf("TrackDirty(%d, %d): %v", r[0], r[1], err)
		}
	}
}
