package precopy

import (
	"testing"
	"unsafe"

	"github.com/tandemvm/tandem/guest"
)

// TestCaptureBuffers: GrowCapture only ever grows, and a grown buffer is
// populated before it is handed back (its first use is inside a pause);
// ReserveCapture keeps room for twice an epoch and gives back a buffer far
// larger than needed.
func TestCaptureBuffers(t *testing.T) {
	buf := make([]byte, 0, 10*guest.PageSize)
	if got := GrowCapture(buf, 8); cap(got) != cap(buf) {
		t.Fatalf("GrowCapture for 8 pages replaced a 10-page buffer (cap %d)", cap(got))
	}
	if got := GrowCapture(buf, 0); cap(got) != cap(buf) {
		t.Fatal("GrowCapture for no pages replaced the buffer")
	}
	grown := GrowCapture(buf, 1000)
	if len(grown) != 0 || cap(grown) < 1000*guest.PageSize {
		t.Fatalf("GrowCapture for 1,000 pages: len %d cap %d", len(grown), cap(grown))
	}
	if guest.PrefaultSupported() {
		// The whole pages inside the buffer (the Go heap's large
		// allocations are page-aligned; check only whole pages anyway).
		mem := grown[:cap(grown)]
		start := (uintptr(unsafe.Pointer(&mem[0])) + guest.PageSize - 1) &^ (guest.PageSize - 1)
		off := int(start - uintptr(unsafe.Pointer(&mem[0])))
		whole := (len(mem) - off) / guest.PageSize * guest.PageSize
		var populated uint64
		err := guest.Populated(guest.Region{Mem: mem[off : off+whole]}, func(_, n uint64) error {
			populated += n
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if want := uint64(whole / guest.PageSize); populated != want {
			t.Errorf("%d of %d pages of a grown buffer populated", populated, want)
		}
	}
	if got := GrowCapture(grown, 10); cap(got) != cap(grown) {
		t.Fatal("GrowCapture shrank a buffer")
	}
	r := ReserveCapture(buf, 100)
	if cap(r) < 200*guest.PageSize {
		t.Fatalf("ReserveCapture for 100 pages: cap %d, want room for 200", cap(r))
	}
	big := make([]byte, 0, 100<<20)
	if got := ReserveCapture(big, 10); cap(got) == cap(big) {
		t.Fatal("ReserveCapture kept a 100 MiB buffer for a 10-page epoch")
	}
}
