package uffd

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The ioctl numbers encode the structs' sizes: a wrong size is a wrong
// number, which the kernel refuses (or worse, misreads).
func TestStructSizes(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uintptr
		ioctl     uintptr
	}{
		{"uffdio_api", unsafe.Sizeof(uffdioAPI{}), 24, ioctlAPI},
		{"uffdio_register", unsafe.Sizeof(uffdioRegister{}), 32, ioctlRegister},
		{"uffdio_range", unsafe.Sizeof(uffdioRange{}), 16, ioctlWake},
		{"uffdio_copy", unsafe.Sizeof(uffdioCopy{}), 40, ioctlCopy},
		{"uffdio_zeropage", unsafe.Sizeof(uffdioZeropage{}), 32, ioctlZeropage},
	} {
		if c.got != c.want || (c.ioctl>>16)&0x3fff != c.want {
			t.Errorf("%s: size %d, ioctl says %d, want %d", c.name, c.got, (c.ioctl>>16)&0x3fff, c.want)
		}
	}
}

func mapPages(t *testing.T, n int) []byte {
	t.Helper()
	mem, err := unix.Mmap(-1, 0, n*pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	return mem
}

func openRegistered(t *testing.T, mem []byte) *FD {
	t.Helper()
	f, err := Open()
	if errors.Is(err, ErrUnavailable) {
		t.Skipf("no userfaultfd here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Register(mem); err != nil {
		f.Close()
		t.Fatal(err)
	}
	return f
}

// touch reads one byte of page p from a goroutine of its own (the read
// blocks its thread until the fault is resolved) and sends it on the
// returned channel.
func touch(mem []byte, p int, write bool) <-chan byte {
	ch := make(chan byte, 1)
	go func() {
		if write {
			mem[p*pageSize+1] = 0x77
		}
		// Read before the send: `ch <- mem[i]` may read the byte inside
		// the channel's send, holding the channel's lock while the fault
		// waits, and the test's own select on ch then blocks on that lock
		// (seen without -race: the whole test hung).
		ch <- load(mem, p*pageSize)
	}()
	return ch
}

//go:noinline
func load(mem []byte, i int) byte { return mem[i] }

// waitFault reads faults until one arrives or 5 s pass.
func waitFault(t *testing.T, f *FD) Fault {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		fs, err := f.ReadFaults(nil, 50*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if len(fs) > 0 {
			return fs[0]
		}
	}
	t.Fatal("no fault within 5 s")
	return Fault{}
}

// A real fault from another goroutine is reported with its page and
// thread, and UFFDIO_COPY resolves it with the copied content.
func TestFaultResolvedByCopy(t *testing.T) {
	mem := mapPages(t, 16)
	f := openRegistered(t, mem)
	defer f.Close()
	got := touch(mem, 3, false)
	ft := waitFault(t, f)
	if want := base(mem) + 3*pageSize; ft.Addr != want || ft.Write || ft.TID == 0 {
		t.Fatalf("fault %+v, want read at %#x with a thread id", ft, want)
	}
	select {
	case <-got:
		t.Fatal("the read finished before the page was supplied")
	case <-time.After(50 * time.Millisecond):
	}
	page := bytes.Repeat([]byte{0x42}, pageSize)
	if err := f.Copy(ft.Addr, page); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if b != 0x42 {
			t.Fatalf("read %#x, want 0x42", b)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the read still waits after UFFDIO_COPY")
	}
	// The page is mapped now: a second copy is refused, no new fault.
	if err := f.Copy(ft.Addr, page); !errors.Is(err, ErrExists) {
		t.Fatalf("second copy: %v, want ErrExists", err)
	}
	if fs, _ := f.ReadFaults(nil, 20*time.Millisecond); len(fs) != 0 {
		t.Fatalf("unexpected faults %+v", fs)
	}
}

// A write fault says so, and the zero page resolves it; the write lands.
func TestWriteFaultResolvedByZero(t *testing.T) {
	mem := mapPages(t, 4)
	f := openRegistered(t, mem)
	defer f.Close()
	got := touch(mem, 2, true)
	ft := waitFault(t, f)
	if !ft.Write || ft.Addr != base(mem)+2*pageSize {
		t.Fatalf("fault %+v, want a write at page 2", ft)
	}
	if err := f.Zero(ft.Addr); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if b != 0 || mem[2*pageSize+1] != 0x77 {
			t.Fatalf("page 2 reads %#x, %#x; want 0, 0x77", b, mem[2*pageSize+1])
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the write still waits after UFFDIO_ZEROPAGE")
	}
}

// The Go runtime can stop the world while a goroutine waits on a fault
// (the synth guest's vCPUs fault in Go code): a GC must finish without the
// page, or the fault handler could deadlock against the collector.
func TestGCWhileFaultPending(t *testing.T) {
	mem := mapPages(t, 4)
	f := openRegistered(t, mem)
	defer f.Close()
	got := touch(mem, 1, false)
	ft := waitFault(t, f)
	gc := make(chan struct{})
	go func() { runtime.GC(); close(gc) }()
	select {
	case <-gc:
	case <-time.After(10 * time.Second):
		f.Copy(ft.Addr, make([]byte, pageSize))
		<-gc
		<-got
		t.Fatal("GC waited for the faulting goroutine")
	}
	if err := f.Copy(ft.Addr, make([]byte, pageSize)); err != nil {
		t.Fatal(err)
	}
	<-got
}

// ReadFaults returns within its timeout when nothing faults.
func TestReadFaultsTimeout(t *testing.T) {
	mem := mapPages(t, 1)
	f := openRegistered(t, mem)
	defer f.Close()
	t0 := time.Now()
	fs, err := f.ReadFaults(nil, 30*time.Millisecond)
	if err != nil || len(fs) != 0 || time.Since(t0) > 2*time.Second {
		t.Fatalf("faults %v err %v after %v", fs, err, time.Since(t0))
	}
}

// Memory that userfaultfd cannot take (an unaligned range, a private
// mapping of a regular file) is refused with ErrUnavailable, so a caller
// can stay precopy-only; anonymous private memory is taken.
func TestRegisterRefused(t *testing.T) {
	mem := mapPages(t, 2)
	f, err := Open()
	if err != nil {
		t.Skip(err)
	}
	defer f.Close()
	if err := f.Register(mem[1 : pageSize+1]); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("unaligned: %v", err)
	}
	file, err := os.Create(filepath.Join(t.TempDir(), "mem"))
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	if err := file.Truncate(pageSize); err != nil {
		t.Fatal(err)
	}
	fm, err := unix.Mmap(int(file.Fd()), 0, pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(fm)
	if err := f.Register(fm); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("file mapping: %v, want ErrUnavailable", err)
	}
	if err := f.Register(mem); err != nil {
		t.Fatalf("anonymous private memory refused: %v", err)
	}
}

// Populate waits for a missing page inside the kernel and returns once a
// copy resolves it; many goroutines doing so (more than GOMAXPROCS) do not
// keep the resolving goroutine from running.
func TestPopulateWaitsInSyscall(t *testing.T) {
	const n = 16
	mem := mapPages(t, n)
	f := openRegistered(t, mem)
	defer f.Close()
	done := make(chan error, n)
	for p := range n {
		go func() { done <- Populate(mem[p*pageSize : (p+1)*pageSize]) }()
	}
	page := bytes.Repeat([]byte{0x5a}, pageSize)
	deadline := time.Now().Add(10 * time.Second)
	served := 0
	for served < n && time.Now().Before(deadline) {
		runtime.GC() // the collector must not wait for the faulting goroutines
		fs, err := f.ReadFaults(nil, 50*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		for _, ft := range fs {
			if !ft.Write {
				t.Errorf("populate faulted for reading at %#x", ft.Addr)
			}
			if err := f.Copy(ft.Addr, page); err != nil {
				t.Fatal(err)
			}
			served++
		}
	}
	for range n {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if served != n || mem[(n-1)*pageSize] != 0x5a {
		t.Fatalf("served %d faults of %d", served, n)
	}
}

// Resident tells a page copied in from one still missing without
// faulting on it: asking raises no fault, and the answer turns once the
// page is copied in.
func TestResidentAsksWithoutFaulting(t *testing.T) {
	mem := mapPages(t, 4)
	f := openRegistered(t, mem)
	defer f.Close()
	page := mem[2*pageSize : 3*pageSize]
	if in, err := Resident(page); err != nil || in {
		t.Fatalf("a missing page: resident %v, err %v", in, err)
	}
	if fs, _ := f.ReadFaults(nil, 20*time.Millisecond); len(fs) != 0 {
		t.Fatalf("asking faulted: %+v", fs)
	}
	if err := f.Copy(base(page), bytes.Repeat([]byte{1}, pageSize)); err != nil {
		t.Fatal(err)
	}
	if in, err := Resident(page[100:200]); err != nil || !in {
		t.Fatalf("a copied-in page: resident %v, err %v", in, err)
	}
	if in, _ := Resident(mem[2*pageSize : 4*pageSize]); in {
		t.Fatal("two pages, one missing: reported resident")
	}
}
