package guest

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func mapSparse(t testing.TB, size int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		t.Skipf("map %d bytes: %v", size, err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// TestPopulatedFindsEveryWrittenPage: every page written is reported and,
// with transparent huge pages off for the mapping, nothing else is.
func TestPopulatedFindsEveryWrittenPage(t *testing.T) {
	t.Run("scan", testPopulated)
	t.Run("entries", func(t *testing.T) {
		was := noScan.Swap(true) // the fallback for kernels before 6.7
		defer noScan.Store(was)
		testPopulated(t)
	})
}

func testPopulated(t *testing.T) {
	const size = 64 << 20
	mem := mapSparse(t, size)
	_ = unix.Madvise(mem, unix.MADV_NOHUGEPAGE)
	written := []uint64{0, 1, 2, 100, 4095, 8191, size/PageSize - 1}
	for _, p := range written {
		mem[p*PageSize+17] = 1
	}
	_ = mem[5000*PageSize] // a read maps the zero page: reported, harmlessly
	r := Region{GPA: 1 << 30, Mem: mem}
	got := map[uint64]bool{}
	var prevEnd uint64
	err := Populated(r, func(first, n uint64) error {
		if first < prevEnd || n == 0 {
			t.Fatalf("run [%d,+%d) after a run ending at %d", first, n, prevEnd)
		}
		prevEnd = first + n
		for p := first; p < first+n; p++ {
			got[p] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range written {
		if !got[p] {
			t.Errorf("written page %d not reported", p)
		}
	}
	if len(got) > len(written)+1 {
		t.Errorf("%d pages reported, want at most %d", len(got), len(written)+1)
	}
	if h := ScanMemory([]Region{r}); h.nonZero() != len(written) {
		t.Errorf("ScanMemory hashed %d non-zero pages, want %d", h.nonZero(), len(written))
	}
}

// TestPopulatedTebibyte: a 1 TiB mapping with 64 MiB written is scanned
// in well under the time a read of every page would take.
func TestPopulatedTebibyte(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	mem := mapSparse(t, 1<<40)
	for off := 0; off < 64<<20; off += PageSize {
		mem[(1<<39)+off] = 1
	}
	t0 := time.Now()
	n := populatedPages(t, Region{Mem: mem})
	d := time.Since(t0)
	if n < 64<<20/PageSize || n > 66<<20/PageSize {
		t.Errorf("%d pages populated, want about %d", n, 64<<20/PageSize)
	}
	t.Logf("1 TiB, 64 MiB written: %d pages populated, scanned in %v", n, d)
	if d > 20*time.Second {
		t.Errorf("scan took %v", d)
	}
}

// populatedPages is how many pages of r Populated reports.
func populatedPages(t *testing.T, r Region) uint64 {
	t.Helper()
	var total uint64
	if err := Populated(r, func(_, n uint64) error { total += n; return nil }); err != nil {
		t.Fatal(err)
	}
	return total
}

// TestPopulatedManyRuns: more runs than one PAGEMAP_SCAN call returns
// (512), with a callback that grows the goroutine's stack (as a round 0
// sending pages does) between calls. The scan's output vector once lived
// on the stack: it moved with the stack, later calls wrote the old one,
// and pages went unreported.
func TestPopulatedManyRuns(t *testing.T) {
	const pages = 6000
	mem := mapSparse(t, pages*PageSize)
	_ = unix.Madvise(mem, unix.MADV_NOHUGEPAGE)
	for p := 0; p < pages; p += 3 { // 2,000 runs of one page
		mem[p*PageSize] = 1
	}
	var seen, prevEnd uint64
	err := Populated(Region{Mem: mem}, func(first, n uint64) error {
		if first < prevEnd {
			t.Fatalf("run [%d,+%d) after a run ending at %d", first, n, prevEnd)
		}
		prevEnd = first + n
		seen += n
		growStack(64)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != pages/3 {
		t.Fatalf("%d pages reported, want %d", seen, pages/3)
	}
}

// growStack recurses with a large frame, so the goroutine's stack is
// grown (copied elsewhere) on the way down.
func growStack(depth int) byte {
	var frame [4096]byte
	frame[depth%len(frame)] = byte(depth)
	if depth == 0 {
		return frame[0]
	}
	return growStack(depth-1) + frame[depth%len(frame)]
}
