package guest

import (
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Populated calls fn for every run of pages of r that the host may hold
// data for, in ascending order, with page indices relative to r. A page it
// leaves out has never been populated in this process (its page-table
// entry is empty: never written, never read, not in swap) and therefore
// reads as zero, so a full pass over memory (round 0, a catch-up, a
// digest scan) that skips zero pages may skip it without reading it.
// Reading it would cost a page fault that maps the shared zero page: at
// 64 GiB, 16 million of them, seconds of work for pages that hold nothing.
//
// The source is /proc/self/pagemap: its PAGEMAP_SCAN ioctl (Linux 6.7 and
// later) walks the page tables and returns runs of present or swapped
// pages, skipping empty tables wholesale (a 1 TiB region with 64 MiB
// written takes milliseconds); on older kernels the per-page entries are
// read instead (present bit 63, swapped bit 62, readable without
// privilege; about 1.6 s for 1 TiB here). Both backends keep guest
// RAM in private anonymous mappings (synth with MAP_NORESERVE, kvm the
// memory it registers with KVM_SET_USER_MEMORY_REGION), where an empty
// entry means a zero page. mincore(2) was not chosen: it reports a page
// that sits in swap as not resident, which would skip real data.
//
// When pagemap cannot be read (not Linux, /proc missing), fn gets the
// whole region: the answer is an upper bound, never an under-estimate.
//
// Racing writes: a page first written after Populated looked at it is
// missed here, exactly as a page read as zero before the write would be;
// the callers' dirty log reports the write, as it reports any write made
// after the pass started.
func Populated(r Region, fn func(first, n uint64) error) error {
	pages := r.Pages()
	if pages == 0 {
		return nil
	}
	f := pagemap()
	if f == nil {
		return fn(0, pages)
	}
	if done, err := populatedScan(f, r, fn); done {
		return err
	}
	const chunk = 8192 // entries per read: 64 KiB
	buf := make([]byte, chunk*8)
	base := uint64(uintptr(unsafe.Pointer(&r.Mem[0])))
	runStart, inRun := uint64(0), false
	for p := uint64(0); p < pages; p += chunk {
		n := min(chunk, pages-p)
		off := int64((base>>PageShift + p) * 8)
		got, err := f.ReadAt(buf[:n*8], off)
		if uint64(got) != n*8 {
			_ = err // pagemap unusable for this range: report it whole
			for i := uint64(got / 8); i < n; i++ {
				binary.LittleEndian.PutUint64(buf[i*8:], 1<<63)
			}
		}
		for i := uint64(0); i < n; i++ {
			e := binary.LittleEndian.Uint64(buf[i*8:])
			live := e&(1<<63|1<<62) != 0
			switch {
			case live && !inRun:
				runStart, inRun = p+i, true
			case !live && inRun:
				if err := fn(runStart, p+i-runStart); err != nil {
					return err
				}
				inRun = false
			}
		}
	}
	if inRun {
		return fn(runStart, pages-runStart)
	}
	return nil
}

var (
	pagemapOnce sync.Once
	pagemapFile *os.File
)

// ResidencyKnown says whether Populated can tell populated pages from
// others here; without /proc/self/pagemap it reports every page.
func ResidencyKnown() bool { return pagemap() != nil }

// pagemap is this process's /proc/self/pagemap, opened once and kept for
// the process's life (reads use ReadAt, so concurrent callers are safe).
func pagemap() *os.File {
	pagemapOnce.Do(func() {
		f, err := os.Open("/proc/self/pagemap")
		if err == nil {
			pagemapFile = f
		}
	})
	return pagemapFile
}

// PAGEMAP_SCAN (linux/fs.h).
const (
	pagemapScan   = 0xC0606610 // _IOWR('f', 16, struct pm_scan_arg)
	pageIsPresent = 1 << 3
	pageIsSwapped = 1 << 4
	pageIsPFNZero = 1 << 5
)

type pmScanArg struct {
	Size, Flags, Start, End, WalkEnd, Vec, VecLen, MaxPages       uint64
	CategoryInverted, CategoryMask, CategoryAnyofMask, ReturnMask uint64
}

type pageRegion struct{ Start, End, Categories uint64 }

// scanVecs holds PAGEMAP_SCAN's output vectors. The kernel is given a
// vector's address once and writes it on every call, while fn runs in
// between and may grow the goroutine's stack: a vector on the stack (a
// make that does not escape) moves with it, and later calls would write
// the old stack while the scan read stale runs (pages missed). Heap
// objects never move; the pool keeps the vector there.
var scanVecs = sync.Pool{New: func() any { return new([512]pageRegion) }}

// noScan is set once the kernel has refused PAGEMAP_SCAN.
var noScan atomic.Bool

// populatedScan answers Populated with PAGEMAP_SCAN. done is false when
// the kernel lacks the ioctl (the caller falls back to reading entries).
// Pages that map the shared zero page (read, never written) are left out
// too: they hold zeros.
func populatedScan(f *os.File, r Region, fn func(first, n uint64) error) (done bool, err error) {
	if noScan.Load() {
		return false, nil
	}
	base := uint64(uintptr(unsafe.Pointer(&r.Mem[0])))
	end := base + uint64(len(r.Mem))
	v := scanVecs.Get().(*[512]pageRegion)
	defer scanVecs.Put(v)
	vec := v[:]
	arg := pmScanArg{
		Size: uint64(unsafe.Sizeof(pmScanArg{})), Start: base, End: end,
		Vec: uint64(uintptr(unsafe.Pointer(&vec[0]))), VecLen: uint64(len(vec)),
		CategoryInverted: pageIsPFNZero, CategoryMask: pageIsPFNZero,
		CategoryAnyofMask: pageIsPresent | pageIsSwapped, ReturnMask: pageIsPresent | pageIsSwapped,
	}
	var runStart, runEnd uint64 // pending run, merged across calls
	for arg.Start < end {
		n, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), pagemapScan, uintptr(unsafe.Pointer(&arg)))
		if errno != 0 {
			if errno == unix.EINTR || errno == unix.EAGAIN {
				continue
			}
			if runEnd == 0 && arg.Start == base && (errno == unix.ENOTTY || errno == unix.EINVAL || errno == unix.EOPNOTSUPP) {
				noScan.Store(true)
				return false, nil
			}
			return true, errors.Join(errors.New("guest: PAGEMAP_SCAN"), errno)
		}
		for _, pr := range vec[:n] {
			if pr.Start == runEnd && runEnd != 0 {
				runEnd = pr.End
				continue
			}
			if runEnd != 0 {
				if err := fn((runStart-base)>>PageShift, (runEnd-runStart)>>PageShift); err != nil {
					return true, err
				}
			}
			runStart, runEnd = pr.Start, pr.End
		}
		if arg.WalkEnd <= arg.Start {
			break
		}
		arg.Start = arg.WalkEnd
	}
	runtime.KeepAlive(vec)
	if runEnd != 0 {
		return true, fn((runStart-base)>>PageShift, (runEnd-runStart)>>PageShift)
	}
	return true, nil
}
