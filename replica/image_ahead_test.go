package replica

import (
	"bytes"
	"slices"
	"testing"
	"time"

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
	a := &ahead{runs: [][2]uint64{{100, 1000}, {2000, 600}}}
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
	if got := a.recv.Load(); got != 2010 {
		t.Errorf("recv = %d after runs up to 2010, want 2010", got)
	}
}

// TestPopulateAhead: the goroutine populates every hinted page, and only
// those; a page the stream stored before keeps its data; stop joins the
// goroutine. A write-through image then asks nothing again for pages it
// covered.
func TestPopulateAhead(t *testing.T) {
	if !guest.PrefaultSupported() {
		t.Skip("the kernel has no MADV_POPULATE_WRITE")
	}
	g, err := synth.New(guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	r := g.Regions()[0]
	before := populatedSet(r)
	stored := r.FirstPage() + 4100
	data := bytes.Repeat([]byte{0x5a}, guest.PageSize)
	copy(guest.PageOf(g.Regions(), stored), data)
	im := NewImage(g)
	im.WriteThrough()
	hint := [][2]uint64{{r.FirstPage() + 4096, 2048}, {r.FirstPage() + 9000, 600}}
	stop := im.populateAhead(hint)
	a := im.ahead
	deadline := time.Now().Add(10 * time.Second)
	for a.done.Load() < r.FirstPage()+9600 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	stop()
	if im.ahead != nil {
		t.Error("the image still names a stopped populateAhead")
	}
	after := populatedSet(r)
	in := func(p uint64) bool { return (p >= 4096 && p < 6144) || (p >= 9000 && p < 9600) }
	for p := uint64(0); p < r.Pages(); p++ {
		switch {
		case in(p) && !after[p]:
			t.Fatalf("hinted page %d not populated", p)
		case !in(p) && after[p] && !before[p]:
			t.Fatalf("page %d populated, not hinted", p)
		}
	}
	if !bytes.Equal(guest.PageOf(g.Regions(), stored), data) {
		t.Error("a page stored before the goroutine reached it lost its data")
	}
	if got := guest.PageOf(g.Regions(), r.FirstPage()+5000); !bytes.Equal(got, make([]byte, guest.PageSize)) {
		t.Error("a populated page is not zero")
	}
}

// TestPopulateAheadRefusesWhatItCannotUse: no goroutine for a staging
// image or a hint with nothing in memory, and stop is always safe.
func TestPopulateAheadRefusesWhatItCannotUse(t *testing.T) {
	g, err := synth.New(guest.Config{Memory: 16 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	im := NewImage(g)
	stop := im.populateAhead([][2]uint64{{g.Regions()[0].FirstPage(), 1024}})
	if im.ahead != nil {
		t.Error("a staging image populates ahead")
	}
	stop()
	im.WriteThrough()
	stop = im.populateAhead([][2]uint64{{1 << 40, 1024}})
	if im.ahead != nil {
		t.Error("a hint outside memory started a goroutine")
	}
	stop()
	stop()
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
