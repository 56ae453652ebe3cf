package guest

import (
	"testing"

	"golang.org/x/sys/unix"
)

// TestPrefaultPages: the run's pages are populated, clipped to each
// region, and nothing else is.
func TestPrefaultPages(t *testing.T) {
	a, b := mapSparse(t, 1<<20), mapSparse(t, 1<<20)
	_ = unix.Madvise(a, unix.MADV_NOHUGEPAGE)
	_ = unix.Madvise(b, unix.MADV_NOHUGEPAGE)
	regions := []Region{{GPA: 0, Mem: a}, {GPA: 1 << 20, Mem: b}}
	PrefaultPages(regions, 250, 10, false) // pages 250 to 255 of a, 0 to 3 of b
	PrefaultPages(regions, 1000, 5, false) // past both: nothing
	count := func(r Region) (first, n uint64) {
		first = ^uint64(0)
		_ = Populated(r, func(f, m uint64) error { first, n = min(first, f), n+m; return nil })
		return first, n
	}
	if noPopulate.Load() {
		t.Skip("the kernel has no MADV_POPULATE_WRITE")
	}
	if f, n := count(regions[0]); f != 250 || n != 6 {
		t.Errorf("first region: %d pages populated from %d, want 6 from 250", n, f)
	}
	if f, n := count(regions[1]); f != 0 || n != 4 {
		t.Errorf("second region: %d pages populated from %d, want 4 from 0", n, f)
	}
}

// BenchmarkPrefaultWrite: storing a page into memory the host has not
// populated, one page at a time as a receiver does: the first write's
// page fault (fault, the baseline) against one MADV_POPULATE_WRITE per
// 4 MiB run ahead of the writes (populate), and the same with the run's
// whole 2 MiB blocks advised as huge pages first (huge). ns/op is per
// page.
func BenchmarkPrefaultWrite(b *testing.B) {
	const run = 1024 // pages: 4 MiB
	page := make([]byte, PageSize)
	for i := range page {
		page[i] = byte(i) | 1
	}
	for _, name := range []string{"fault", "populate", "huge"} {
		pre := name != "fault"
		b.Run(name, func(b *testing.B) {
			b.SetBytes(PageSize)
			var mem []byte
			for i := 0; i < b.N; i++ {
				if i%run == 0 {
					b.StopTimer()
					if mem != nil {
						_ = unix.Munmap(mem)
					}
					mem = mapSparse(b, run*PageSize)
					_ = unix.Madvise(mem, unix.MADV_NOHUGEPAGE)
					b.StartTimer()
					if pre {
						PrefaultWrite(mem, name == "huge")
					}
				}
				p := i % run
				copy(mem[p*PageSize:(p+1)*PageSize], page)
			}
		})
	}
}

// TestPrefaultUnalignedKeepsAdvice: a buffer that does not start on a
// page (the Go heap's small ones) is populated in its whole pages, and
// the kernel's refusal of an unaligned start never turns the advice off
// for the process.
func TestPrefaultUnalignedKeepsAdvice(t *testing.T) {
	mem := mapSparse(t, 4*PageSize)
	PrefaultWrite(mem[2048:2048+3*PageSize], false) // pages 1 and 2 whole
	PrefaultWrite(mem[100:200], false)              // no whole page
	if !PrefaultSupported() {
		t.Fatal("an unaligned buffer turned MADV_POPULATE_WRITE off for the process")
	}
	for i := 0; i < 64; i++ {
		b := make([]byte, 6144) // need + need/2 for one page: often not page aligned
		PrefaultWrite(b, false)
	}
	if !PrefaultSupported() {
		t.Fatal("heap buffers turned MADV_POPULATE_WRITE off for the process")
	}
}
