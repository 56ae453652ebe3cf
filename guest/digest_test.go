package guest

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"github.com/cespare/xxhash/v2"
)

func TestMemHashIncrementalEqualsScan(t *testing.T) {
	mem := make([]byte, 64*PageSize)
	regions := []Region{{GPA: 0, Mem: mem[:32*PageSize]}, {GPA: 1 << 32, Mem: mem[32*PageSize:]}}
	inc := ScanMemory(regions)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 500; i++ {
		r := regions[rng.IntN(2)]
		p := rng.Uint64N(r.Pages())
		page := r.Mem[p*PageSize : (p+1)*PageSize]
		if rng.IntN(4) == 0 {
			clear(page) // back to zero: must leave the digest
		} else {
			page[rng.IntN(PageSize)] = byte(rng.Uint32())
		}
		inc.Update(r.FirstPage()+p, page)
		if i%50 == 0 && ScanMemory(regions).Sum() != inc.Sum() {
			t.Fatalf("step %d: incremental digest differs from a full scan", i)
		}
	}
	if ScanMemory(regions).Sum() != inc.Sum() {
		t.Fatal("final incremental digest differs from a full scan")
	}
}

func TestMemHashSeesMovedPage(t *testing.T) {
	a := make([]byte, 4*PageSize)
	b := make([]byte, 4*PageSize)
	a[0] = 1
	b[PageSize] = 1 // the same content one page further on
	if ScanMemory([]Region{{Mem: a}}).Sum() == ScanMemory([]Region{{Mem: b}}).Sum() {
		t.Fatal("a page moved to another index hashes the same")
	}
	if ScanMemory([]Region{{Mem: make([]byte, PageSize)}}).Sum() != NewMemHash().Sum() {
		t.Fatal("zero memory differs from the empty digest")
	}
}

func TestIsZeroPageAnyLength(t *testing.T) {
	for _, n := range []int{0, 1, 63, PageSize, PageSize + 1, 3*PageSize + 5} {
		p := make([]byte, n)
		if !IsZeroPage(p) {
			t.Fatalf("zero slice of %d bytes reported non-zero", n)
		}
		if n > 0 {
			p[n-1] = 1
			if IsZeroPage(p) {
				t.Fatalf("slice of %d bytes with its last byte set reported zero", n)
			}
		}
	}
}

// UpdateHashed with a page's XXH64 (or zero) gives what Update gives.
func TestUpdateHashedMatchesUpdate(t *testing.T) {
	a, b := NewMemHash(), NewMemHash()
	page := make([]byte, PageSize)
	for i := uint64(0); i < 64; i++ {
		clear(page)
		if i%3 != 0 {
			page[i*17%PageSize] = byte(i + 1)
		}
		idx := i % 20 // rewrites: old contributions come out
		a.Update(idx, page)
		b.UpdateHashed(idx, xxhash.Sum64(page), i%3 == 0)
		if a.Sum() != b.Sum() || a.Page(idx) != b.Page(idx) {
			t.Fatalf("after %d updates: %x, want %x", i+1, b.Sum(), a.Sum())
		}
	}
}

// MemorySum folds what ScanMemory folds, over several jobs and regions.
func TestMemorySumEqualsScan(t *testing.T) {
	const pages = 9000 // more than two scan jobs per region
	regions := []Region{{GPA: 0, Mem: make([]byte, pages*PageSize)}, {GPA: 1 << 32, Mem: make([]byte, pages*PageSize)}}
	rng := rand.New(rand.NewPCG(3, 4))
	inc := NewMemHash()
	for i := 0; i < 3000; i++ {
		r := regions[rng.IntN(2)]
		p := rng.Uint64N(r.Pages())
		page := r.Mem[p*PageSize : (p+1)*PageSize]
		page[rng.IntN(PageSize)] = byte(rng.Uint32() | 1)
		inc.Update(r.FirstPage()+p, page)
	}
	if got := MemorySum(regions); got != ScanMemory(regions).Sum() || got != inc.Sum() {
		t.Fatalf("MemorySum %x, ScanMemory %x, incremental %x", got, ScanMemory(regions).Sum(), inc.Sum())
	}
	if MemorySum(regions[:1]) == MemorySum(regions) {
		t.Fatal("MemorySum ignores the second region")
	}
}

// BenchmarkMemorySum: the full-scan digest of 256 MiB of random pages,
// folded alone (MemorySum, the switch-over check) against ScanMemory,
// which also keeps every page's hash in maps.
func BenchmarkMemorySum(b *testing.B) {
	mem := make([]byte, 256<<20)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := 0; i+8 <= len(mem); i += 8 {
		binary.LittleEndian.PutUint64(mem[i:], rng.Uint64())
	}
	regions := []Region{{Mem: mem}}
	b.Run("MemorySum", func(b *testing.B) {
		b.SetBytes(int64(len(mem)))
		for b.Loop() {
			MemorySum(regions)
		}
	})
	b.Run("ScanMemory", func(b *testing.B) {
		b.SetBytes(int64(len(mem)))
		for b.Loop() {
			ScanMemory(regions).Sum()
		}
	})
}

// nonZero counts the pages m records as non-zero.
func (m *MemHash) nonZero() int {
	n := len(m.far)
	for _, ch := range m.chunks {
		if ch == nil {
			continue
		}
		for _, h := range ch {
			if h != 0 {
				n++
			}
		}
	}
	return n
}

// TestMemHashTableMatchesMap: the chunked table keeps the same fold and
// per-page contributions as a map of every page would, across rewrites,
// pages zeroed again, indices far apart and past the chunks (the map
// beyond them).
func TestMemHashTableMatchesMap(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	m := NewMemHash()
	ref := map[uint64]uint64{}
	var xor, sum uint64
	far := uint64(maxHashChunks) << hashChunkShift
	pick := func() uint64 {
		switch rng.IntN(4) {
		case 0:
			return far + rng.Uint64N(1000)
		case 1:
			return rng.Uint64N(1 << 30) // a 4 TiB guest's range: sparse chunks
		default:
			return rng.Uint64N(3 * hashChunkPages)
		}
	}
	for i := 0; i < 30000; i++ {
		idx := pick()
		zero := rng.IntN(5) == 0
		sum64 := rng.Uint64()
		m.UpdateHashed(idx, sum64, zero)
		h := uint64(0)
		if !zero {
			h = PageHashOf(idx, sum64)
		}
		old := ref[idx]
		xor ^= old ^ h
		sum += h - old
		if h == 0 {
			delete(ref, idx)
		} else {
			ref[idx] = h
		}
		if i%100 == 0 {
			probe := pick()
			if got := m.Page(probe); got != ref[probe] {
				t.Fatalf("step %d: page %d records %x, want %x", i, probe, got, ref[probe])
			}
		}
	}
	var want [16]byte
	binary.LittleEndian.PutUint64(want[:8], xor)
	binary.LittleEndian.PutUint64(want[8:], sum)
	if m.Sum() != want {
		t.Fatalf("fold %x, want %x", m.Sum(), want)
	}
	if m.nonZero() != len(ref) {
		t.Fatalf("%d non-zero pages recorded, want %d", m.nonZero(), len(ref))
	}
	for idx, h := range ref {
		if m.Page(idx) != h {
			t.Fatalf("page %d records %x, want %x", idx, m.Page(idx), h)
		}
	}
	if m.Page(far+5000) != 0 || m.Page(1<<40) != 0 {
		t.Fatal("a never-recorded page records a contribution")
	}
}
