package replica

import (
	"testing"

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
		for _, p := range want {
			if !after[p] && !before[p] {
				t.Errorf("write-through %v: page %d not populated", through, p)
			}
			if im.populated[(r.FirstPage()+p)/64]&(1<<((r.FirstPage()+p)%64)) == 0 {
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

func populatedSet(r guest.Region) map[uint64]bool {
	set := map[uint64]bool{}
	_ = guest.Populated(r, func(first, n uint64) error {
		for p := first; p < first+n; p++ {
			set[p] = true
		}
		return nil
	})
	return set
}
