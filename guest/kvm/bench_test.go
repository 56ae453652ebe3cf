package kvm

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// BenchmarkStartToFirstReply: New + Resume until the first kv reply.
func BenchmarkStartToFirstReply(b *testing.B) {
	skipWithoutKVM(b)
	for b.Loop() {
		g, err := New(kvConfig(64<<20, 1))
		if err != nil {
			b.Fatal(err)
		}
		lr := newLineReader()
		g.Console().SetOutput(lr.sink)
		mustResume(b, g)
		expect(b, ask(b, g, lr, "s:1 GET x"), "s:1 NOTFOUND")
		b.StopTimer()
		g.Close()
		b.StartTimer()
	}
}

// BenchmarkKVRequests: one request/reply round trip over the console,
// sequential (the ratio against a bare Input+sink round trip is the cost
// of the guest and its exits).
func BenchmarkKVRequests(b *testing.B) {
	skipWithoutKVM(b)
	g, err := New(kvConfig(64<<20, 1))
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	lr := newLineReader()
	g.Console().SetOutput(lr.sink)
	mustResume(b, g)
	i := 0
	for b.Loop() {
		i++
		ask(b, g, lr, fmt.Sprintf("b:%d SET k%d v%d", i, i%1000, i))
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
}

// BenchmarkPause measures Pause with vCPUs busy in the guest (the dirty
// workload at a rate that keeps them in KVM_RUN) and reports p50/p99.
func BenchmarkPause(b *testing.B) {
	skipWithoutKVM(b)
	for _, n := range []int{1, 2} {
		b.Run(fmt.Sprintf("vcpus=%d", n), func(b *testing.B) {
			g, err := New(dirtyConfig(128<<20, 64<<20, 50_000_000, guest.PatternRandom, n))
			if err != nil {
				b.Fatal(err)
			}
			defer g.Close()
			mustResume(b, g)
			waitProgress(b, g, 1)
			var ds []time.Duration
			for b.Loop() {
				b.StopTimer()
				mustResume(b, g)
				time.Sleep(2 * time.Millisecond)
				b.StartTimer()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				d, err := g.Pause(ctx)
				cancel()
				if err != nil {
					b.Fatal(err)
				}
				ds = append(ds, d)
			}
			slices.Sort(ds)
			b.ReportMetric(float64(ds[len(ds)/2].Microseconds()), "p50-us")
			b.ReportMetric(float64(ds[len(ds)*99/100].Microseconds()), "p99-us")
		})
	}
}

// BenchmarkSyncDirty: SyncDirty of a paused guest after the guest dirtied
// 1,000 pages, per method and memory size. Plain GET_DIRTY_LOG is the
// baseline the choice is made against.
func BenchmarkSyncDirty(b *testing.B) {
	skipWithoutKVM(b)
	for _, mem := range []uint64{1 << 30, 16 << 30} {
		for _, m := range []DirtyMethod{DirtyGetLog, DirtyManualClear, DirtyRing} {
			b.Run(fmt.Sprintf("%s/%s", guest.FormatSize(mem), m), func(b *testing.B) {
				// 1,000 pages touched, then rewritten in seq order at
				// 1M pages/s: every page is dirty again after 1 ms.
				g, err := NewWithOptions(dirtyConfig(mem, 1000*guest.PageSize, 1_000_000, guest.PatternSeq, 1), Options{DirtyMethod: m, DirtyRingEntries: 4096})
				if err != nil {
					b.Fatal(err)
				}
				defer g.Close()
				mustResume(b, g)
				waitProgress(b, g, 1)
				var pages uint64
				for b.Loop() {
					b.StopTimer()
					mustResume(b, g)
					time.Sleep(3 * time.Millisecond)
					mustPause(b, g)
					b.StartTimer()
					n, err := g.SyncDirty(newWordLog())
					if err != nil {
						b.Fatal(err)
					}
					pages += n
				}
				b.ReportMetric(float64(pages)/float64(b.N), "pages/sync")
			})
		}
	}
}

// BenchmarkSyncDirtyRandom: SyncDirty of a paused guest that writes
// 25,000 random pages/s over 256 MiB, synced every 25 ms as an epoch loop
// does: some 600 pages scattered over 65,536, so the clear method's
// CLEAR_DIRTY_LOG calls (one per span of dirty words) are many unless
// spans bridge the gaps between them.
func BenchmarkSyncDirtyRandom(b *testing.B) {
	skipWithoutKVM(b)
	for _, m := range []DirtyMethod{DirtyGetLog, DirtyManualClear} {
		b.Run(m.String(), func(b *testing.B) {
			g, err := NewWithOptions(dirtyConfig(1<<30, 256<<20, 25000, guest.PatternRandom, 1), Options{DirtyMethod: m})
			if err != nil {
				b.Fatal(err)
			}
			defer g.Close()
			mustResume(b, g)
			waitProgress(b, g, 1)
			var pages uint64
			for b.Loop() {
				b.StopTimer()
				mustResume(b, g)
				time.Sleep(25 * time.Millisecond)
				mustPause(b, g)
				b.StartTimer()
				n, err := g.SyncDirty(newWordLog())
				if err != nil {
					b.Fatal(err)
				}
				pages += n
			}
			b.ReportMetric(float64(pages)/float64(b.N), "pages/sync")
		})
	}
}

// BenchmarkSyncDirtyHeavy: like BenchmarkSyncDirty on 1 GiB, but the guest
// rewrites a 64 MiB range (16,384 pages) as fast as it can, so each sync
// finds thousands of pages: where the ring's per-page cost meets the
// bitmap's per-RAM cost. Rings hold 16,384 entries.
func BenchmarkSyncDirtyHeavy(b *testing.B) {
	skipWithoutKVM(b)
	for _, m := range []DirtyMethod{DirtyGetLog, DirtyManualClear, DirtyRing} {
		b.Run(m.String(), func(b *testing.B) {
			g, err := NewWithOptions(dirtyConfig(1<<30, 64<<20, 100_000_000, guest.PatternSeq, 1), Options{DirtyMethod: m, DirtyRingEntries: 16384})
			if err != nil {
				b.Fatal(err)
			}
			defer g.Close()
			mustResume(b, g)
			waitProgress(b, g, 1)
			var pages uint64
			for b.Loop() {
				b.StopTimer()
				mustResume(b, g)
				time.Sleep(10 * time.Millisecond)
				mustPause(b, g)
				b.StartTimer()
				n, err := g.SyncDirty(newWordLog())
				if err != nil {
					b.Fatal(err)
				}
				pages += n
			}
			b.ReportMetric(float64(pages)/float64(b.N), "pages/sync")
			b.ReportMetric(float64(g.ringFulls.Load())/float64(b.N), "ring-full/sync")
		})
	}
}

// BenchmarkSaveRestore: SaveState and LoadState of a paused 2-vCPU guest.
func BenchmarkSaveRestore(b *testing.B) {
	skipWithoutKVM(b)
	g, err := New(kvConfig(64<<20, 2))
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	b.Run("save", func(b *testing.B) {
		for b.Loop() {
			if _, err := g.SaveState(); err != nil {
				b.Fatal(err)
			}
		}
	})
	st, err := g.SaveState()
	if err != nil {
		b.Fatal(err)
	}
	size := 0
	for _, d := range st.Devices {
		size += len(d.Fields)
	}
	b.Run("load", func(b *testing.B) {
		for b.Loop() {
			if err := g.LoadState(st); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(size), "state-bytes")
	})
}

// BenchmarkPauseIdle: the pause of a small epoch on a kv guest waiting for
// its next request (a synchronous client's): a request, 0.5 ms, then
// Pause, SyncDirty, SaveState and Resume, each reported at p50 and p99.
func BenchmarkPauseIdle(b *testing.B) {
	skipWithoutKVM(b)
	g, err := New(kvConfig(1<<30, 1))
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	lr := newLineReader()
	g.Console().SetOutput(lr.sink)
	mustResume(b, g)
	var pause, sync, save, resume []time.Duration
	i := 0
	for b.Loop() {
		b.StopTimer()
		i++
		ask(b, g, lr, fmt.Sprintf("s:%d SET k%d v%d", i, i, i))
		time.Sleep(500 * time.Microsecond)
		b.StartTimer()
		p := mustPause(b, g)
		t0 := time.Now()
		if _, err := g.SyncDirty(newWordLog()); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := g.SaveState(); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		r, err := g.Resume()
		if err != nil {
			b.Fatal(err)
		}
		pause, sync, save, resume = append(pause, p), append(sync, t1.Sub(t0)), append(save, t2.Sub(t1)), append(resume, r)
	}
	for _, m := range []struct {
		name string
		ds   []time.Duration
	}{{"pause", pause}, {"dirty-sync", sync}, {"state-save", save}, {"resume", resume}} {
		slices.Sort(m.ds)
		b.ReportMetric(float64(m.ds[len(m.ds)/2].Nanoseconds())/1000, m.name+"-p50-us")
		b.ReportMetric(float64(m.ds[len(m.ds)*99/100].Nanoseconds())/1000, m.name+"-p99-us")
	}
}
