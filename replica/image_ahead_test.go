package replica

import (
	"bytes"
	"slices"
	"testing"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// TestAheadRunsBounds: a peer's hint is clipped to the guest's memory,
// split where it crosses regions, capped at MaxResidentRuns, and runs
// that are empty, wrap around, overlap or go backwards are dropped.
func TestAheadRunsBounds(t *testing.T) {
	regions := []guest.Region{
		{GPA: 0, Mem: make([]byte, 100*guest.PageSize)},
		{GPA: 200 * guest.PageSize, Mem: make([]byte, 50*guest.PageSize)},
	}
	for _, c := range []struct {
		name string
		hint [][2]uint64
		want [][2]uint64
	}{
		{"inside", [][2]uint64{{10, 20}}, [][2]uint64{{10, 20}}},
		{"clipped at the end", [][2]uint64{{90, 20}}, [][2]uint64{{90, 10}}},
		{"across the hole", [][2]uint64{{90, 130}}, [][2]uint64{{90, 10}, {200, 20}}},
		{"past memory", [][2]uint64{{1 << 40, 1 << 20}}, nil},
		{"empty", [][2]uint64{{5, 0}}, nil},
		{"wraps", [][2]uint64{{1<<64 - 10, 20}}, nil},
		{"backwards", [][2]uint64{{50, 10}, {10, 5}}, [][2]uint64{{50, 10}}},
		{"overlapping", [][2]uint64{{10, 20}, {25, 5}, {30, 5}}, [][2]uint64{{10, 20}, {30, 5}}},
	} {
		if got := aheadRuns(c.hint, regions); !slices.Equal(got, c.want) {
			t.Errorf("%s: aheadRuns(%v) = %v, want %v", c.name, c.hint, got, c.want)
		}
	}
	many := make([][2]uint64, 3*MaxResidentRuns)
	for i := range many {
		many[i] = [2]uint64{uint64(i) * 2, 1}
	}
	got := aheadRuns(many, []guest.Region{{GPA: 0, Mem: make([]byte, 8192*guest.PageSize)}})
	if len(got) != MaxResidentRuns {
		t.Errorf("%d runs hinted: %d kept, want at most %d", len(many), len(got), MaxResidentRuns)
	}
}

// TestAheadFrom: the receiving goroutine skips the part of a run the
// goroutine has populated, only when the run lies inside one hinted run.
func TestAheadFrom(t *testing.T) {
	a := &ahead{runs: [][2]uint64{{100, 1000}, {2000, 600}}, kick: make(chan struct{}, 1)}
	a.done.Store(600)
	for _, c := range []struct{ first, n, want uint64 }{
		{100, 100, 200},   // all done
		{550, 100, 600},   // half done
		{700, 100, 700},   // not reached
		{1050, 100, 1050}, // crosses the first run's end
		{50, 100, 50},     // starts before any run
		{2000, 10, 2000},  // second run, not reached
	} {
		if got := a.from(c.first, c.n); got != c.want {
			t.Errorf("from(%d, %d) with done 600 = %d, want %d", c.first, c.n, got, c.want)
		}
	}
	if got := a.reach.Load(); got != 2010 {
		t.Errorf("reach = %d after runs up to 2010, want 2010", got)
	}
}

// aheadGuest is a 64 MiB synth guest, its region and the pages of it
// mapped before the test touched anything.
func aheadGuest(t *testing.T) (guest.Guest, guest.Region, map[uint64]bool) {
	t.Helper()
	if !guest.PrefaultSupported() {
		t.Skip("the kernel has no MADV_POPULATE_WRITE")
	}
	g, err := synth.New(guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	r := g.Regions()[0]
	return g, r, populatedSet(r)
}

// waitDone waits until a's goroutine has done everything below page, or
// fails after 10 s.
func waitDone(t *testing.T, a *ahead, page uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for a.done.Load() < page {
		if time.Now().After(deadline) {
			t.Fatalf("the goroutine reached page %d in 10 s, want %d", a.done.Load(), page)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestPopulateAhead: the goroutine stays within its window past the
// stream, goes on as the stream reaches further, populates every hinted
// page and only those; a page the stream stored ahead of it keeps its
// data; a run the receiver announces across the goroutine's front is
// populated whole and recorded; Activate stops the goroutine.
func TestPopulateAhead(t *testing.T) {
	g, r, before := aheadGuest(t)
	b := r.FirstPage()
	im := NewImage(g)
	im.WriteThrough()
	im.startAhead([][2]uint64{{b + 4096, 4096}}, 1024)
	a := im.ahead.Load()
	if a == nil {
		t.Fatal("no goroutine for a hint inside memory")
	}
	stored := b + 6500 // stored by the stream before the goroutine gets there
	data := bytes.Repeat([]byte{0x5a}, guest.PageSize)
	copy(guest.PageOf(g.Regions(), stored), data)
	// The stream reaches 4696: the goroutine may go to 5720, so it does
	// whole chunks up to 5632 and waits.
	im.Prefault(b+4096, 600)
	waitDone(t, a, b+5632)
	time.Sleep(50 * time.Millisecond)
	if got := a.done.Load(); got != b+5632 {
		t.Fatalf("the goroutine is at page %d, past its window (want %d)", got-b, 5632)
	}
	// A run straddling its front: the receiver populates its part.
	im.Prefault(b+5600, 64)
	mid := populatedSet(r)
	for p := b + 5600; p < b+5664; p++ {
		if !im.populatedPages().Test(p) {
			t.Errorf("page %d of a run straddling the goroutine's front is not recorded", p-b)
		}
		if !mid[p-b] {
			t.Errorf("page %d of a run straddling the goroutine's front is not populated", p-b)
		}
	}
	im.Prefault(b+8100, 92) // the stream reaches the end
	waitDone(t, a, b+8192)
	if _, _, err := im.Activate(); err == nil {
		t.Fatal("an empty image activated")
	}
	select {
	case <-a.stop:
	default:
		t.Error("Activate did not stop the goroutine")
	}
	after := populatedSet(r)
	for p := uint64(0); p < r.Pages(); p++ {
		in := p >= 4096 && p < 8192
		switch {
		case in && !after[p]:
			t.Fatalf("hinted page %d not populated", p)
		case !in && after[p] && !before[p]:
			t.Fatalf("page %d populated, not hinted", p)
		}
	}
	if !bytes.Equal(guest.PageOf(g.Regions(), stored), data) {
		t.Error("a page the stream stored ahead of the goroutine lost its data")
	}
	if got := guest.PageOf(g.Regions(), b+5000); !bytes.Equal(got, make([]byte, guest.PageSize)) {
		t.Error("a populated page is not zero")
	}
}

// TestPopulateAheadStaging: a staging image (a secondary's catch-up)
// populates ahead too, and its commit records the pages the goroutine
// did without asking for them again; Close stops the goroutine.
func TestPopulateAheadStaging(t *testing.T) {
	g, r, _ := aheadGuest(t)
	base := r.FirstPage()
	im := NewImage(g)
	im.populateAhead([][2]uint64{{base + 1024, 1024}})
	a := im.ahead.Load()
	if a == nil {
		t.Fatal("a staging image does not populate ahead")
	}
	waitDone(t, a, base+2048)
	page := make([]byte, guest.PageSize)
	page[7] = 7
	for _, p := range []uint64{base + 1500, base + 1501, base + 3000} {
		if err := im.StorePage(p, page); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.EndEpoch(checkpoint.EpochEnd{Epoch: 1, Pages: 3}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []uint64{base + 1500, base + 1501, base + 3000} {
		if !im.populatedPages().Test(p) {
			t.Errorf("committed page %d not recorded as populated", p)
		}
		if !bytes.Equal(guest.PageOf(g.Regions(), p), page) {
			t.Errorf("committed page %d does not hold its data", p)
		}
	}
	im.Close()
	select {
	case <-a.stop:
	default:
		t.Error("Close did not stop the goroutine")
	}
}

// TestPopulateAheadRefusesWhatItCannotUse: no goroutine for a hint with
// nothing in memory; stopping without one, or twice, is safe.
func TestPopulateAheadRefusesWhatItCannotUse(t *testing.T) {
	g, err := synth.New(guest.Config{Memory: 16 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	im := NewImage(g)
	im.populateAhead([][2]uint64{{1 << 40, 1024}})
	if im.ahead.Load() != nil {
		t.Error("a hint outside memory started a goroutine")
	}
	im.stopAhead()
	im.populateAhead([][2]uint64{{g.Regions()[0].FirstPage(), 1024}})
	im.stopAhead()
	im.stopAhead()
	im.haltAhead()
}

// TestResidentHint: a synth guest with one long written run and a few
// scattered pages names the long run only.
func TestResidentHint(t *testing.T) {
	g, err := synth.New(guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	r := g.Regions()[0]
	before := ResidentHint(g)
	for p := uint64(8192); p < 8192+3*MinResidentRun; p++ {
		r.Mem[p<<guest.PageShift] = 1
	}
	for _, p := range []uint64{12000, 12010, 14000} {
		r.Mem[p<<guest.PageShift] = 1
	}
	after := ResidentHint(g)
	found := false
	for _, h := range after {
		if h[1] < MinResidentRun {
			t.Errorf("run %v shorter than %d pages", h, MinResidentRun)
		}
		if h[0] <= r.FirstPage()+8192 && h[0]+h[1] >= r.FirstPage()+8192+3*MinResidentRun {
			found = true
		}
		if h[0] <= r.FirstPage()+12000 && h[0]+h[1] > r.FirstPage()+12000 && !slices.Contains(before, h) {
			t.Errorf("run %v holds a scattered page", h)
		}
	}
	if !found {
		t.Errorf("hint %v misses the written run [%d, +%d)", after, r.FirstPage()+8192, 3*MinResidentRun)
	}
}
