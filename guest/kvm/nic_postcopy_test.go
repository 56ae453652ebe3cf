package kvm

import (
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/netframe"
	"github.com/tandemvm/tandem/internal/uffd"
)

// owePage makes the page at gpa one a post-copy source still owes, as a
// destination's Target leaves it: registered with userfaultfd, its copy
// dropped, the access path on; and no one serves the fault (a source
// gone). It returns the page's bytes and the descriptor to copy them back
// in with. Precondition: g is paused.
func owePage(t *testing.T, g *Guest, gpa uint64) ([]byte, *uffd.FD) {
	t.Helper()
	nd, ok := g.memAt(gpa, guest.PageSize)
	if !ok {
		t.Fatalf("no page at %#x", gpa)
	}
	saved := append([]byte(nil), nd...)
	fd, err := uffd.Open()
	if err != nil {
		t.Skipf("userfaultfd: %v", err)
	}
	if err := fd.Register(nd); err != nil {
		fd.Close()
		t.Skipf("userfaultfd on KVM memory: %v", err)
	}
	t.Cleanup(func() {
		g.SetPostcopy(false)
		fd.Unregister(nd)
		fd.Close()
	})
	if err := unix.Madvise(nd, unix.MADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	g.SetPostcopy(true)
	return saved, fd
}

// within runs f on its own goroutine and fails the test if it has not
// returned within d (the goroutine is left to finish when the page comes).
func within(t *testing.T, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { f(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not return within %v: it waits for a page the source owes", what, d)
	}
}

// A post-copy destination whose card's page is still owed, with the
// source gone: status's reads of the card (Counters, Announce) return at
// once, saying the counters are unavailable, even while vCPU 0 waits for
// the page to fill the RX ring with a frame that came in. The fill waits
// outside the card's lock. When the page arrives, the frame is served
// and the counters are the guest's again.
func TestNICStatusPromptWhilePageOwed(t *testing.T) {
	skipWithoutKVM(t)
	g, w := startNIC(t, netKVConfig())
	nic := g.nic
	nic.Deliver(w.request("c:1 SET k v"))
	udpReply(t, w.next(t))
	if c := nic.Counters(); c.Datagrams != 1 || nic.CountersUnavailable() != "" {
		t.Fatalf("before: counters %+v, unavailable %q", c, nic.CountersUnavailable())
	}
	mustPause(t, g)
	saved, fd := owePage(t, g, netGPA)
	mustResume(t, g)
	if err := nic.Deliver(w.request("c:2 GET k")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // vCPU 0 polls and waits for the page
	for range 3 {
		var c netframe.Counters
		within(t, time.Second, "Counters", func() { c = nic.Counters() })
		if c.Datagrams != 1 || nic.CountersUnavailable() == "" {
			t.Fatalf("while owed: counters %+v (want the last read), unavailable %q (want a reason)", c, nic.CountersUnavailable())
		}
		within(t, time.Second, "Announce", func() { nic.Announce() })
		time.Sleep(50 * time.Millisecond)
	}
	w.none(t)
	nd, _ := g.memAt(netGPA, guest.PageSize)
	if err := fd.Copy(uintptr(unsafe.Pointer(unsafe.SliceData(nd))), saved); err != nil {
		t.Fatal(err)
	}
	if got, _ := udpReply(t, w.next(t)); got != "c:2 OK v\n" {
		t.Fatalf("reply after the page arrived: %q", got)
	}
	if c := nic.Counters(); c.Datagrams != 2 || nic.CountersUnavailable() != "" {
		t.Fatalf("after: counters %+v, unavailable %q", c, nic.CountersUnavailable())
	}
}

// The dirty workload's statistics page owed, its vCPU blocked on it:
// PageWrites (status's page_writes, read under the guest's control lock)
// returns the last figure at once instead of waiting for the page with
// the lock held, and Paused, which takes that lock, answers too.
func TestPageWritesPromptWhilePageOwed(t *testing.T) {
	skipWithoutKVM(t)
	g, err := New(dirtyConfig(64<<20, 4<<20, 5000, "random", 1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	mustResume(t, g)
	deadline := time.Now().Add(10 * time.Second)
	for g.PageWrites() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	mustPause(t, g)
	last := g.PageWrites()
	if last == 0 {
		t.Fatal("no page writes counted")
	}
	saved, fd := owePage(t, g, statsGPA)
	mustResume(t, g)
	time.Sleep(200 * time.Millisecond) // the vCPU's next batch waits for the page
	for range 3 {
		var n uint64
		within(t, time.Second, "PageWrites", func() { n = g.PageWrites() })
		if n != last {
			t.Fatalf("PageWrites %d while the page is owed, want the last figure %d", n, last)
		}
		within(t, time.Second, "Paused", func() { g.Paused() })
	}
	st, _ := g.memAt(statsGPA, guest.PageSize)
	if err := fd.Copy(uintptr(unsafe.Pointer(unsafe.SliceData(st))), saved); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(5 * time.Second)
	for g.PageWrites() <= last {
		if time.Now().After(deadline) {
			t.Fatal("no page writes counted after the page arrived")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Close of a guest whose two vCPUs both wait in KVM_RUN for a page no one
// will copy in (a post-copy destination abandoned with its source gone):
// it returns after its deadline instead of waiting for the second vCPU
// forever (the deadline's one tick went to the first). The page is the
// top page table: on this host (kvm-pvm, shadow paging) KVM reads it from
// the kernel, a wait a kick does not end, so both vCPUs stay in KVM_RUN;
// where a kick ends the wait, Close returns at once.
func TestCloseWithVCPUsWaitingForAPage(t *testing.T) {
	skipWithoutKVM(t)
	g, err := New(dirtyConfig(64<<20, 4<<20, 5000, "random", 2))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	mustResume(t, g)
	deadline := time.Now().Add(10 * time.Second)
	for g.PageWrites() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	mustPause(t, g)
	_, fd := owePage(t, g, pml4GPA) // both vCPUs' address translation walks it
	mustResume(t, g)
	waiting := map[uint32]bool{}
	for deadline := time.Now().Add(5 * time.Second); len(waiting) < 2; {
		if time.Now().After(deadline) {
			t.Fatalf("vCPU threads waiting for the page: %v, want 2", waiting)
		}
		faults, err := fd.ReadFaults(nil, 50*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range faults {
			waiting[f.TID] = true
		}
	}
	var cerr error
	within(t, closeTimeout+2*time.Second, "Close", func() { cerr = g.Close() })
	t.Logf("close: %v", cerr)
}
