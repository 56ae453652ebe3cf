package synth

import (
	"encoding/binary"
	"os"
	"testing"
	"unsafe"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/smaps"
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

// TestDirtyRangeHugeAdvised: a dirty guest's range (which its vCPUs
// write whole) is advised MADV_HUGEPAGE, and the memory past it, which
// the guest may leave sparse, is not; a kv guest's dirtied top of memory
// is advised, its table is not.
func TestDirtyRangeHugeAdvised(t *testing.T) {
	if _, err := os.Stat("/sys/kernel/mm/transparent_hugepage"); err != nil {
		t.Skip("this kernel has no transparent huge pages")
	}
	// Only whole 2 MiB blocks are advised: look at the middle of the
	// first whole block at or after off.
	advised := func(t *testing.T, g *Guest, off uint64) bool {
		t.Helper()
		base := uintptr(unsafe.Pointer(&g.mem.mem[0]))
		addr := (base+uintptr(off)+2<<20-1)&^(2<<20-1) + 1<<20
		flags, _, found, err := smaps.Mapping(addr)
		if err != nil {
			t.Skipf("no smaps: %v", err)
		}
		if !found {
			t.Fatalf("no mapping holds guest memory at offset %#x", off)
		}
		return smaps.HugeAdvised(flags)
	}
	g := mustNew(t, dirtyConfig(guest.PatternRandom)) // 64 MiB, 4 MiB touched
	if !advised(t, g, 0) {
		t.Error("the dirty range is not advised MADV_HUGEPAGE")
	}
	if advised(t, g, 32<<20) {
		t.Error("memory past the dirty range is advised MADV_HUGEPAGE")
	}
	kv := mustNew(t, guest.Config{Memory: 64 << 20, VCPUs: 2, Workload: guest.Workload{
		Kind: guest.WorkloadKV, Touch: 8 << 20, DirtyRate: 1000, Pattern: guest.PatternRandom, Seed: 7}})
	if !advised(t, kv, 56<<20) {
		t.Error("a kv guest's dirtied top of memory is not advised MADV_HUGEPAGE")
	}
	if advised(t, kv, 8<<20) {
		t.Error("a kv guest's table is advised MADV_HUGEPAGE")
	}
}
