package synth

import (
	"encoding/binary"
	"slices"
	"testing"

	"github.com/tandemvm/tandem/guest"
)

// BenchmarkGuestWrite measures what software dirty tracking adds to a guest
// store: the tracked put (store + atomic OR into the bitmap) against the
// same raw store, over the same page sequence, in one run. ratio is
// tracked/raw.
func BenchmarkGuestWrite(b *testing.B) {
	const size = 64 << 20
	m, err := newMemory(size)
	if err != nil {
		b.Fatal(err)
	}
	defer m.unmap()
	pages := uint64(size >> guest.PageShift)
	for p := range pages { // fault every page in first: measure stores, not faults
		m.mem[p<<guest.PageShift] = 1
	}
	offs := make([]uint64, 4096)
	for i := range offs {
		offs[i] = (mix(uint64(i))%pages)<<guest.PageShift + mix(uint64(i)+1)%512*8
	}
	var raw, tracked float64
	b.Run("raw", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			off := offs[i&4095]
			binary.LittleEndian.PutUint64(m.mem[off:off+8], uint64(i))
		}
		raw = float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	})
	b.Run("tracked", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			m.putUint64(offs[i&4095], uint64(i))
		}
		tracked = float64(b.Elapsed().Nanoseconds()) / float64(b.N)
		if raw > 0 {
			b.ReportMetric(tracked/raw, "ratio-vs-raw")
			b.ReportMetric(tracked-raw, "extra-ns/write")
		}
	})
}

func TestSyncHandsWordsAndClears(t *testing.T) {
	m, err := newMemory(1 << 30) // 1 GiB, sparse: costs nothing untouched
	if err != nil {
		t.Fatal(err)
	}
	defer m.unmap()
	m.putUint64(0, 1)
	m.putUint64(5<<guest.PageShift+8, 1)
	m.write(1000*guest.PageSize-4, []byte("spans two pages"))
	m.putUint64((1<<30)-8, 1) // last page
	b := newBitmap(m.pages())
	if n := m.sync(b); n != 5 {
		t.Fatalf("sync reported %d newly dirty, want 5", n)
	}
	for _, p := range []uint64{0, 5, 999, 1000, m.pages() - 1} {
		if !b.has(p) {
			t.Fatalf("page %d missing", p)
		}
	}
	if n := m.sync(newBitmap(m.pages())); n != 0 {
		t.Fatalf("log not cleared: %d", n)
	}
}

func TestSparse64GiB(t *testing.T) {
	if testing.Short() {
		t.Skip("maps 64 GiB of address space")
	}
	cfg := guest.Config{Memory: 64 << 30, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	g, err := New(cfg)
	if err != nil {
		t.Skipf("host cannot map 64 GiB of address space: %v", err)
	}
	defer g.Close()
	if uint64(len(g.Regions()[0].Mem)) != 64<<30 {
		t.Fatal("region size")
	}
}

// TestWholeWriteRanges: a dirty guest names the range its vCPUs write
// whole, a kv guest with a dirty rate its dirtied top of memory, a kv
// guest without one nothing.
func TestWholeWriteRanges(t *testing.T) {
	const mib = (1 << 20) >> guest.PageShift // pages
	for _, c := range []struct {
		name string
		cfg  guest.Config
		want [][2]uint64
	}{
		{"dirty", dirtyConfig(guest.PatternRandom), [][2]uint64{{0, 4 * mib}}},
		{"kv-dirty", guest.Config{Memory: 64 << 20, VCPUs: 2, Workload: guest.Workload{
			Kind: guest.WorkloadKV, Touch: 8 << 20, DirtyRate: 1000, Pattern: guest.PatternRandom, Seed: 7}}, [][2]uint64{{56 * mib, 8 * mib}}},
		{"kv", guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}, nil},
	} {
		g := mustNew(t, c.cfg)
		if got := g.WholeWriteRanges(); !slices.Equal(got, c.want) {
			t.Errorf("%s: WholeWriteRanges %v, want %v", c.name, got, c.want)
		}
	}
}
