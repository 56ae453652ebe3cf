package synth

import (
	"errors"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/uffd"
)

// A received kv guest resumed while its table's header is a page the
// post-copy source still owes (and no one serves it: the source is gone)
// waits for it outside its control lock: Paused, which status asks,
// answers at once; once the page arrives the resume completes.
func TestResumeWaitsForHeaderOutsideLock(t *testing.T) {
	g, out := startKV(t, kvConfig())
	if got := exchange(t, g, out, "c:1 SET k v"); got[0] != "c:1 OK" {
		t.Fatalf("SET: %q", got)
	}
	mustPause(t, g)
	hdr := g.mem.mem[:guest.PageSize]
	saved := append([]byte(nil), hdr...)
	fd, err := uffd.Open()
	if errors.Is(err, uffd.ErrUnavailable) {
		t.Skipf("userfaultfd: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := fd.Register(hdr); err != nil {
		fd.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		g.SetPostcopy(false)
		fd.Unregister(hdr)
		fd.Close()
	})
	if err := unix.Madvise(hdr, unix.MADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	g.SetPostcopy(true)
	resumed := make(chan error, 1)
	go func() {
		_, err := g.Resume()
		resumed <- err
	}()
	time.Sleep(100 * time.Millisecond)
	paused := make(chan bool, 1)
	go func() { paused <- g.Paused() }()
	select {
	case p := <-paused:
		if !p {
			t.Error("Paused says the guest runs while its resume waits for the header")
		}
	case <-time.After(time.Second):
		t.Fatal("Paused waited for the owed page: the resume holds the control lock across it")
	}
	select {
	case err := <-resumed:
		t.Fatalf("resume returned (%v) with the header still owed", err)
	default:
	}
	if err := fd.Copy(uintptr(unsafe.Pointer(unsafe.SliceData(hdr))), saved); err != nil {
		t.Fatal(err)
	}
	if err := <-resumed; err != nil {
		t.Fatal(err)
	}
	if got := exchange(t, g, out, "c:2 GET k"); got[0] != "c:2 OK v" {
		t.Fatalf("GET after the resume: %q", got)
	}
}
