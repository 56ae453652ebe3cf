package uffd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// From linux/userfaultfd.h (API version 0xAA). The ioctl numbers are
// _IOWR/_IOR of the structs below; sizes are checked in uffd_test.go.
const (
	api               = 0xAA
	ioctlAPI          = 0xC018AA3F // _IOWR(0xAA, 0x3F, struct uffdio_api)
	ioctlRegister     = 0xC020AA00 // _IOWR(0xAA, 0x00, struct uffdio_register)
	ioctlUnregister   = 0x8010AA01 // _IOR(0xAA, 0x01, struct uffdio_range)
	ioctlWake         = 0x8010AA02 // _IOR(0xAA, 0x02, struct uffdio_range)
	ioctlCopy         = 0xC028AA03 // _IOWR(0xAA, 0x03, struct uffdio_copy)
	ioctlZeropage     = 0xC020AA04 // _IOWR(0xAA, 0x04, struct uffdio_zeropage)
	registerMissing   = 1          // UFFDIO_REGISTER_MODE_MISSING
	eventPagefault    = 0x12       // UFFD_EVENT_PAGEFAULT
	featureThreadID   = 1 << 8     // UFFD_FEATURE_THREAD_ID
	userModeOnly      = 1          // UFFD_USER_MODE_ONLY (flag of the syscall)
	pagefaultWrite    = 1          // UFFD_PAGEFAULT_FLAG_WRITE
	copyOrZeroNeeded  = 1<<0x03 | 1<<0x04
	pageSize          = 4096
	msgSize           = 32
	maxFaultsPerRead  = 64
	defaultPollPeriod = 100 * time.Millisecond
	// maxRetries bounds the retries of a copy the kernel answered EAGAIN
	// (the mapping changed under it).
	maxRetries = 100
)

type uffdioAPI struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

type uffdioRange struct {
	Start uint64
	Len   uint64
}

type uffdioRegister struct {
	Range  uffdioRange
	Mode   uint64
	Ioctls uint64
}

type uffdioCopy struct {
	Dst  uint64
	Src  uint64
	Len  uint64
	Mode uint64
	Copy int64
}

type uffdioZeropage struct {
	Range    uffdioRange
	Mode     uint64
	Zeropage int64
}

// ErrUnavailable wraps every reason a range cannot be handed to
// userfaultfd (no syscall, not permitted, memory of the wrong kind): the
// caller then stays with a copy that needs no faults.
var ErrUnavailable = errors.New("userfaultfd unavailable")

// FD is an open userfaultfd. Its methods may be called from several
// goroutines (the kernel serialises the ioctls); Close must come last.
type FD struct {
	fd int
	// UserOnly: opened with UFFD_USER_MODE_ONLY, so faults taken inside
	// the kernel (KVM's accesses to guest memory) are not delivered.
	UserOnly bool
}

// Fault is one page fault: the faulting address rounded down to its page,
// whether it was a write, and the faulting thread's id.
type Fault struct {
	Addr  uintptr
	Write bool
	TID   uint32
}

// Open opens a userfaultfd for this process and does the API handshake.
// It asks for faults from kernel mode too (KVM's vCPUs fault there) and
// falls back to user-mode-only faults where that is all an unprivileged
// process may have (vm.unprivileged_userfaultfd=0).
func Open() (*FD, error) {
	fd, err := open(0)
	userOnly := false
	if errors.Is(err, unix.EPERM) {
		fd, err = open(userModeOnly)
		userOnly = true
	}
	if err != nil {
		return nil, fmt.Errorf("%w: userfaultfd: %w", ErrUnavailable, err)
	}
	a := uffdioAPI{API: api, Features: featureThreadID}
	if err := ioctl(fd, ioctlAPI, unsafe.Pointer(&a)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%w: UFFDIO_API: %w", ErrUnavailable, err)
	}
	return &FD{fd: fd, UserOnly: userOnly}, nil
}

func open(extra int) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(unix.O_CLOEXEC|unix.O_NONBLOCK|extra), 0, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(r), nil
}

func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}

// base is the address of mem's first byte; mem is a mapping outside the
// Go heap (mmap), so the address stays valid while it is mapped.
func base(mem []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(mem))) }

// Register hands mem (page aligned, a whole number of pages, anonymous
// private memory) to the descriptor in MISSING mode: from now on a touch
// of a page with nothing mapped waits for this descriptor's owner.
func (f *FD) Register(mem []byte) error {
	if len(mem) == 0 || len(mem)%pageSize != 0 || base(mem)%pageSize != 0 {
		return fmt.Errorf("%w: register %d bytes at %#x: not whole aligned pages", ErrUnavailable, len(mem), base(mem))
	}
	r := uffdioRegister{Range: uffdioRange{Start: uint64(base(mem)), Len: uint64(len(mem))}, Mode: registerMissing}
	if err := ioctl(f.fd, ioctlRegister, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("%w: UFFDIO_REGISTER of %d KiB at %#x: %w", ErrUnavailable, len(mem)>>10, base(mem), err)
	}
	if r.Ioctls&copyOrZeroNeeded != copyOrZeroNeeded {
		return fmt.Errorf("%w: the range does not take UFFDIO_COPY and UFFDIO_ZEROPAGE (ioctls %#x)", ErrUnavailable, r.Ioctls)
	}
	return nil
}

// Unregister takes mem back from the descriptor: faults there are the
// kernel's again. Waiters, if any, are woken.
func (f *FD) Unregister(mem []byte) error {
	r := uffdioRange{Start: uint64(base(mem)), Len: uint64(len(mem))}
	if err := ioctl(f.fd, ioctlUnregister, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("UFFDIO_UNREGISTER: %w", err)
	}
	return nil
}

// ReadFaults waits up to timeout for page faults and appends them to dst.
// It returns dst unchanged when none came in time; it never blocks longer.
func (f *FD) ReadFaults(dst []Fault, timeout time.Duration) ([]Fault, error) {
	if timeout <= 0 {
		timeout = defaultPollPeriod
	}
	fds := []unix.PollFd{{Fd: int32(f.fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, int(max(timeout.Milliseconds(), 1)))
	if err == unix.EINTR || n == 0 {
		return dst, nil
	}
	if err != nil {
		return dst, fmt.Errorf("poll userfaultfd: %w", err)
	}
	var buf [maxFaultsPerRead * msgSize]byte
	got, err := unix.Read(f.fd, buf[:])
	if err == unix.EAGAIN || err == unix.EINTR {
		return dst, nil // another reader took them
	}
	if err != nil {
		return dst, fmt.Errorf("read userfaultfd: %w", err)
	}
	for off := 0; off+msgSize <= got; off += msgSize {
		m := buf[off : off+msgSize]
		if m[0] != eventPagefault {
			continue // no other event was asked for
		}
		flags := binary.LittleEndian.Uint64(m[8:])
		addr := binary.LittleEndian.Uint64(m[16:])
		dst = append(dst, Fault{Addr: uintptr(addr &^ (pageSize - 1)), Write: flags&pagefaultWrite != 0, TID: uint32(binary.LittleEndian.Uint64(m[24:]))})
	}
	return dst, nil
}

// ErrExists is Copy's and Zero's error when the page is already mapped
// (another goroutine resolved it first). The waiters were not woken by
// this call: Wake them if they may still wait.
var ErrExists = errors.New("page already mapped")

// Copy maps a copy of src (one page) at dst (page aligned, in a
// registered range) and wakes every thread waiting for it.
func (f *FD) Copy(dst uintptr, src []byte) error {
	if len(src) != pageSize || dst%pageSize != 0 {
		return fmt.Errorf("UFFDIO_COPY: want one aligned page, got %d bytes at %#x", len(src), dst)
	}
	c := uffdioCopy{Dst: uint64(dst), Src: uint64(uintptr(unsafe.Pointer(&src[0]))), Len: pageSize}
	for range maxRetries {
		err := ioctl(f.fd, ioctlCopy, unsafe.Pointer(&c))
		switch {
		case err == nil:
			return nil
		case err == unix.EEXIST:
			return ErrExists
		case err == unix.EAGAIN && c.Copy <= 0:
			// The mapping changed under the call; nothing was copied.
			c.Copy = 0
			continue
		}
		return fmt.Errorf("UFFDIO_COPY at %#x: %w", dst, err)
	}
	return fmt.Errorf("UFFDIO_COPY at %#x: the mapping kept changing (%d tries)", dst, maxRetries)
}

// Zero maps the zero page at dst (page aligned, registered) and wakes its
// waiters.
func (f *FD) Zero(dst uintptr) error {
	z := uffdioZeropage{Range: uffdioRange{Start: uint64(dst), Len: pageSize}}
	for range maxRetries {
		err := ioctl(f.fd, ioctlZeropage, unsafe.Pointer(&z))
		switch {
		case err == nil:
			return nil
		case err == unix.EEXIST:
			return ErrExists
		case err == unix.EAGAIN && z.Zeropage <= 0:
			z.Zeropage = 0
			continue
		}
		return fmt.Errorf("UFFDIO_ZEROPAGE at %#x: %w", dst, err)
	}
	return fmt.Errorf("UFFDIO_ZEROPAGE at %#x: the mapping kept changing (%d tries)", dst, maxRetries)
}

// Wake wakes the threads waiting on the page at addr, which must already
// be mapped (they would fault again otherwise).
func (f *FD) Wake(addr uintptr) error {
	r := uffdioRange{Start: uint64(addr), Len: pageSize}
	if err := ioctl(f.fd, ioctlWake, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("UFFDIO_WAKE at %#x: %w", addr, err)
	}
	return nil
}

// Close closes the descriptor. Registered ranges are released and any
// thread still waiting is woken and faults again, now served by the
// kernel: a page that never arrived reads as zeros. So a caller closes
// only once every page it owes has arrived, or once the memory's user is
// stopped for good.
func (f *FD) Close() error { return unix.Close(f.fd) }

// madvPopulateWrite is MADV_POPULATE_WRITE (Linux 5.14): fault pages in
// writable, from inside the kernel.
const madvPopulateWrite = 23

// Populate faults in the pages mem lies on (mem need not be page
// aligned) from inside a madvise(2) call, so a page registered here and
// missing is waited for in a system call rather than in a load or store.
// A Go goroutine that waits in a system call gives up its P: the
// scheduler, the collector's stop-the-world and the goroutine that must
// fetch the page all go on. A goroutine that faults in a plain load may
// sit on its P (assembly such as memmove has no safe point to preempt it
// at), and a collection that starts meanwhile then waits for it forever
// while the goroutine serving the fault is stopped. It returns once the
// pages are mapped; it waits as long as a page is missing (that is the
// point), retrying when a signal interrupts it.
func Populate(mem []byte) error {
	if len(mem) == 0 {
		return nil
	}
	start := base(mem) &^ (pageSize - 1)
	end := (base(mem) + uintptr(len(mem)) + pageSize - 1) &^ (pageSize - 1)
	for {
		_, _, errno := unix.Syscall(unix.SYS_MADVISE, start, end-start, madvPopulateWrite)
		switch errno {
		case 0:
			return nil
		case unix.EINTR, unix.EAGAIN:
			continue
		}
		return fmt.Errorf("madvise(MADV_POPULATE_WRITE): %w", errno)
	}
}

// Resident reports whether every page of mem is mapped now, without
// faulting any in (mincore(2)). On memory registered here, a page that
// is not mapped may be one no one will ever copy in (a post-copy
// destination whose source is gone): a caller that must not wait for it,
// one holding a lock, asks here first and reads only pages that are in.
// A page the kernel reclaimed to swap also reads as not resident, which
// such a caller takes for "not now" too.
func Resident(mem []byte) (bool, error) {
	if len(mem) == 0 {
		return true, nil
	}
	start := base(mem) &^ (pageSize - 1)
	end := (base(mem) + uintptr(len(mem)) + pageSize - 1) &^ (pageSize - 1)
	vec := make([]byte, (end-start)/pageSize)
	_, _, errno := unix.Syscall(unix.SYS_MINCORE, start, end-start, uintptr(unsafe.Pointer(unsafe.SliceData(vec))))
	if errno != 0 {
		return false, fmt.Errorf("mincore: %w", errno)
	}
	for _, v := range vec {
		if v&1 == 0 {
			return false, nil
		}
	}
	return true, nil
}
