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
