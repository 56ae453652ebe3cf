package guest

import (
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Writing pages into guest memory from the kernel's side.
//
// A receiver (a migration destination, a secondary) stores hundreds of
// thousands of pages into memory its process has not written before. A
// plain copy takes a trip out of user space for each 4 KiB page the first
// time it is written: a page fault, and where the host is itself a
// virtual machine (kvm-pvm) the hypervisor's shadow page tables filled one
// page at a time. Measured on such a host (2026-12-01, a Go program
// writing 512 MiB in 256 KiB pieces): a copy into fresh 4 KiB pages 2.1
// to 2.2 s, into pages populated beforehand (MADV_POPULATE_WRITE) still
// 0.8 to 1.0 s, into huge pages 0.67 to 1.4 s (allocating a 2 MiB page
// the host no longer backs is slow and varies run to run); the same
// bytes written by process_vm_writev to the process's own memory 0.13 to
// 0.16 s, and 2,000 random pages long populated 1.5 us a page against
// 6.5 to 11 us by copy. The kernel allocates, zeroes and fills each page
// and maps it in one pass, reaching it through its own mapping of all
// memory, so no fault is taken from user space at all.
//
// What is left to pay, on such a host, is the first user-space access to
// each page later (the guest's own writes after a migration or a
// failover: docs/PERFORMANCE.md, "Pages written by the kernel").

// maxIov is the most iovecs one process_vm_writev takes (IOV_MAX).
const maxIov = 1024

// kernelWritesOff is set once process_vm_writev has failed in a way that
// says it is not available here (no such call, or a policy forbids it):
// MemWriters copy from then on.
var kernelWritesOff atomic.Bool

// MemWriter queues page-sized copies into this process's memory and does
// them from the kernel's side (process_vm_writev on itself), a call per
// up to 1,024 pages; where that call is refused it copies. Both sides of
// a queued write must stay as they are until Flush (or Drop): the source
// is read, and the destination written, only then; no queued source may
// be the destination of another queued write (a failed call is redone
// by copying every write again, in order). One goroutine. The race
// detector does not see the kernel's accesses, so under -race Flush
// reports them as a copy would (raceCopy).
type MemWriter struct {
	local  []unix.Iovec
	remote []unix.RemoteIovec
	pend   [][2][]byte // dst, src: for a copy when the call is refused
	bytes  int
}

// Write queues copy(dst, src) (min(len(dst), len(src)) bytes, as copy).
func (w *MemWriter) Write(dst, src []byte) {
	n := min(len(dst), len(src))
	if n == 0 {
		return
	}
	dst, src = dst[:n], src[:n]
	if kernelWritesOff.Load() && len(w.pend) == 0 {
		copy(dst, src)
		return
	}
	// Queued even when kernel writes went off meanwhile: the writes
	// already queued must land first (Flush copies them all in order).
	var v unix.Iovec
	v.Base = unsafe.SliceData(src)
	v.SetLen(n)
	w.local = append(w.local, v)
	w.remote = append(w.remote, unix.RemoteIovec{Base: uintptr(unsafe.Pointer(unsafe.SliceData(dst))), Len: n})
	w.pend = append(w.pend, [2][]byte{dst, src})
	w.bytes += n
	if len(w.pend) == maxIov {
		w.Flush()
	}
}

// Pending is how many writes are queued.
func (w *MemWriter) Pending() int { return len(w.pend) }

// Flush does the queued writes, in the order they were queued (the last
// write to a page wins).
func (w *MemWriter) Flush() { w.flush() }

// flush is Flush, and says whether the kernel wrote every queued byte
// (false: none queued, or they were copied).
func (w *MemWriter) flush() bool {
	if len(w.pend) == 0 {
		return false
	}
	for _, p := range w.pend {
		raceCopy(p[0], p[1])
	}
	var err error
	n := 0
	if !kernelWritesOff.Load() {
		n, err = unix.ProcessVMWritev(os.Getpid(), w.local, w.remote, 0)
	}
	kernel := n == w.bytes
	if !kernel {
		switch err {
		case unix.ENOSYS, unix.EPERM, unix.EACCES:
			kernelWritesOff.Store(true)
		}
		// A short or failed call leaves some pages written: copying them
		// all again, in order, writes the same bytes.
		for _, p := range w.pend {
			copy(p[0], p[1])
		}
	}
	w.Drop()
	return kernel
}

// Drop forgets the queued writes without doing them.
func (w *MemWriter) Drop() {
	clear(w.pend) // let the sources go
	clear(w.local)
	w.local, w.remote, w.pend, w.bytes = w.local[:0], w.remote[:0], w.pend[:0], 0
}

// KernelWrites says whether MemWriters write from the kernel's side: a
// first call (one byte, into this process's own memory) worked and none
// has been refused since.
func KernelWrites() bool { return probeKernelWrites() && !kernelWritesOff.Load() }

var probeKernelWrites = sync.OnceValue(func() bool {
	var w MemWriter
	w.Write(make([]byte, 1), []byte{1})
	if !w.flush() {
		kernelWritesOff.Store(true)
		return false
	}
	return true
})
