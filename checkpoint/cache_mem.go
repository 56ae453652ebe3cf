package checkpoint

import (
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The delta cache's memory, in huge pages where the kernel gives them.
//
// A cache is filled a page at a time as pages are sent: 16,384 first
// writes for the default 64 MiB, each a page fault, and on a host whose
// kernel is itself a kvm-pvm guest each first user-mode write costs
// about 10 us more (shadow page tables): a fifth of a migration
// source's CPU went to them (perf, 2026-12-01). Memory mapped for the
// cache alone, 2 MiB aligned and advised MADV_HUGEPAGE, takes one fault
// per 2 MiB instead. It is kept out of the Go heap, so the advice never
// outlives the cache on memory the runtime hands out again, and unmapped
// by a cleanup once the cache is unreachable (never while a Writer may
// still use it).
//
// Only for a writer that asks (Options.HugeCache: a migration source,
// whose round 0 fills the cache in page order; a stream that puts a few
// pages and ends would zero 2 MiB for each), and only for caches up to
// maxHugeCache: a huge page costs 2 MiB as soon as
// one page of it is written, which a cache filled in page order (round
// 0, epochs of a working set) fills anyway, but a cache sized to cover a
// sparse guest (a capped link's, up to the guest's memory) would not:
// it would cost up to 512 times what it holds.

// maxHugeCache is the largest cache given huge pages: the default.
const maxHugeCache = DefaultCacheBytes

// hugeBlock is a transparent huge page on x86-64.
const hugeBlock = 2 << 20

// hugeCacheMemory maps size bytes (a multiple of the page size) for c's
// data, 2 MiB aligned and advised as huge pages, unmapped when c is
// collected; nil if the mapping fails (the caller allocates instead).
func hugeCacheMemory(c *pageCache, size uint64) []byte {
	whole, err := unix.Mmap(-1, 0, int(size+hugeBlock), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil
	}
	off := alignUp(whole) // bytes to the first 2 MiB boundary
	data := whole[off : off+int(size) : off+int(size)]
	_ = unix.Madvise(data, unix.MADV_HUGEPAGE) // a hint: without it, 4 KiB pages
	runtime.AddCleanup(c, func(m []byte) { _ = unix.Munmap(m) }, whole)
	return data
}

// alignUp is the offset in m of its first hugeBlock-aligned byte.
func alignUp(m []byte) int {
	base := uintptr(unsafe.Pointer(unsafe.SliceData(m)))
	return int((base+hugeBlock-1)&^(hugeBlock-1) - base)
}
