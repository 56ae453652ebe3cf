package replica

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// TestImagePrefault: a staged commit populates its fresh pages before
// copying them, in runs, and remembers them; a write-through image does
// it for each run the Reader announces. Pages never stored stay holes.
func TestImagePrefault(t *testing.T) {
	for _, through := range []bool{false, true} {
		g, err := synth.New(guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		r := g.Regions()[0]
		before := populatedSet(r)
		im := NewImage(g)
		want := []uint64{9000, 9001, 9002, 12000}
		if through {
			im.WriteThrough()
			im.Prefault(r.FirstPage()+9000, 3)
			im.Prefault(r.FirstPage()+12000, 1)
		} else {
			page := make([]byte, guest.PageSize)
			page[1] = 1
			for _, p := range want {
				if err := im.StorePage(r.FirstPage()+p, page); err != nil {
					t.Fatal(err)
				}
			}
			im.prefaultStaged()
		}
		after := populatedSet(r)
		if !guest.PrefaultSupported() {
			t.Skip("the kernel has no MADV_POPULATE_WRITE")
		}
		for _, p := range want {
			if !after[p] && !before[p] {
				t.Errorf("write-through %v: page %d not populated", through, p)
			}
			if !im.populated.Test(r.FirstPage() + p) {
				t.Errorf("write-through %v: page %d not recorded", through, p)
			}
		}
		for p := range after {
			if !before[p] && p != 9000 && p != 9001 && p != 9002 && p != 12000 {
				t.Errorf("write-through %v: page %d populated, never stored", through, p)
			}
		}
	}
}

// populatedSet is the pages of r mapped in this process (mincore): a
// page read once counts, even where the kernel mapped its shared zero
// page (guest.Populated leaves those out), so a test sees any read.
func populatedSet(r guest.Region) map[uint64]bool {
	vec := make([]byte, r.Pages())
	set := map[uint64]bool{}
	_, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&r.Mem[0])), uintptr(len(r.Mem)), uintptr(unsafe.Pointer(&vec[0])))
	if errno != 0 {
		return set
	}
	for p, v := range vec {
		if v&1 != 0 {
			set[uint64(p)] = true
		}
	}
	return set
}
