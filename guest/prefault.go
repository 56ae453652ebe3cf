package guest

import (
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PrefaultWrite populates mem for writing in one call
// (MADV_POPULATE_WRITE, Linux 5.14 and later) instead of one page fault
// per page as the first write to each page would take. Receivers call
// it before storing a run of pages into memory the host may not hold
// yet. A fault is a trip out of user space per 4 KiB page: storing a
// page into fresh memory cost 10.5 to 11 us with the fault against 4.9
// to 5.2 us after a 4 MiB populate on a kvm-pvm guest kernel
// (BenchmarkPrefaultWrite, 2026-12-01; what is left is the hypervisor's
// own first touch of each 4 KiB page), where a migration destination had
// spent 2.3 s of CPU on 512 MiB.
//
// With huge, the whole 2 MiB-aligned blocks of mem are advised
// MADV_HUGEPAGE first, so they are populated as transparent huge pages
// and that first touch is one per 2 MiB (BenchmarkPrefaultWrite/huge:
// 0.6 us a page in all). Only whole blocks: every byte of them is about
// to be written, so a huge page holds nothing a 4 KiB page would not
// (a sparse guest's scattered pages never grow to 2 MiB each). Only for
// memory whose backend is known to work with huge pages
// (HugePagesOK).
//
// It is only a hint: on a kernel without the advice, or on any error,
// the writes fault as before.
func PrefaultWrite(mem []byte, huge bool) {
	// Only the whole pages mem covers: madvise refuses an unaligned
	// start with EINVAL (a buffer from the Go heap need not be aligned),
	// which would read as a kernel without the advice.
	base := uintptr(unsafe.Pointer(unsafe.SliceData(mem)))
	lo := (base + PageSize - 1) &^ (PageSize - 1)
	hi := (base + uintptr(len(mem))) &^ (PageSize - 1)
	if len(mem) == 0 || hi <= lo || noPopulate.Load() {
		return
	}
	mem = mem[lo-base : hi-base]
	if huge {
		adviseHuge(mem)
	}
	if err := unix.Madvise(mem, unix.MADV_POPULATE_WRITE); err == unix.EINVAL {
		noPopulate.Store(true) // the kernel does not know the advice
	}
}

// hugeBlock is a transparent huge page on x86-64.
const hugeBlock = 2 << 20

// adviseHuge advises MADV_HUGEPAGE on the whole hugeBlock-aligned blocks
// of mem. Each advised range may split a mapping (one more VMA; the
// kernel's default limit is 65,530 a process), so callers bound how
// often they ask (replica.Image: maxHugeRuns per guest); adjacent
// advised ranges merge again, and memory written in order makes few.
func adviseHuge(mem []byte) {
	base := uintptr(unsafe.Pointer(&mem[0]))
	lo := (base + hugeBlock - 1) &^ (hugeBlock - 1)
	hi := (base + uintptr(len(mem))) &^ (hugeBlock - 1)
	if hi > lo {
		_ = unix.Madvise(mem[lo-base:hi-base], unix.MADV_HUGEPAGE)
	}
}

// HugeBlockPages is the pages of one transparent huge page: a run
// shorter than this holds no whole block.
const HugeBlockPages = hugeBlock / PageSize

// noPopulate is set once the kernel has refused MADV_POPULATE_WRITE.
var noPopulate atomic.Bool

// HugePagesOK is a guest whose memory may be backed by transparent huge
// pages where it is written whole (PrefaultWrite's huge): its dirty
// tracking does not depend on the host's page size.
type HugePagesOK interface {
	HugePagesOK() bool
}

// WholeWriter is a guest that knows ranges of its memory it writes every
// page of (first page, pages): whole 2 MiB blocks of them are best
// backed by huge pages where the memory takes them (HugePagesOK).
type WholeWriter interface {
	WholeWriteRanges() [][2]uint64
}

// AdviseWholeWrites advises huge pages on the ranges g writes whole
// (WholeWriter), where its memory takes them (HugePagesOK).
func AdviseWholeWrites(g Guest) {
	w, ok := g.(WholeWriter)
	h, hok := g.(HugePagesOK)
	if !ok || !hok || !h.HugePagesOK() {
		return
	}
	regions := g.Regions()
	for _, r := range w.WholeWriteRanges() {
		AdviseHugePages(regions, r[0], r[1])
	}
}

// PrefaultSupported says whether the kernel has taken
// MADV_POPULATE_WRITE so far (false once it refused it).
func PrefaultSupported() bool { return !noPopulate.Load() }

// PrefaultPages is PrefaultWrite of pages [first, first+n) of regions,
// clipped to each region (a run may cross from one to the next).
func PrefaultPages(regions []Region, first, n uint64, huge bool) {
	eachSpan(regions, first, n, func(mem []byte) { PrefaultWrite(mem, huge) })
}

// AdviseHugePages advises MADV_HUGEPAGE on the whole huge blocks of
// pages [first, first+n) of regions, so the first write to each, or a
// PrefaultWrite of part of it, backs the whole block with one huge
// page. Only for memory that takes them (HugePagesOK), and within a
// bound of runs per guest (see adviseHuge).
func AdviseHugePages(regions []Region, first, n uint64) {
	eachSpan(regions, first, n, adviseHuge)
}

// eachSpan calls fn with the memory of pages [first, first+n) in each
// region that holds some of them (a run may cross from one to the next).
func eachSpan(regions []Region, first, n uint64, fn func(mem []byte)) {
	for _, r := range regions {
		lo, hi := max(first, r.FirstPage()), min(first+n, r.FirstPage()+r.Pages())
		if lo < hi {
			fn(r.Mem[(lo-r.FirstPage())<<PageShift : (hi-r.FirstPage())<<PageShift])
		}
	}
}
