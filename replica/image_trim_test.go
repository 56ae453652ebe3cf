package replica

import (
	"testing"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// TestStagingShrinksAfterALargeEpoch: a large first epoch (a join's) does
// not leave every later small epoch a staging map and a pool of free page
// buffers of its size; the image's content and digest are unaffected.
func TestStagingShrinksAfterALargeEpoch(t *testing.T) {
	g, err := synth.New(guest.Config{Memory: 256 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	first := g.Regions()[0].FirstPage()
	im := NewImage(g)
	page := make([]byte, guest.PageSize)
	stage := func(epoch uint64, pages int) {
		t.Helper()
		for i := range pages {
			page[0], page[1] = byte(epoch), byte(i)
			if err := im.StorePage(first+uint64(i), page); err != nil {
				t.Fatal(err)
			}
		}
		if err := im.EndEpoch(checkpoint.EpochEnd{Epoch: epoch, Pages: uint64(pages)}); err != nil {
			t.Fatal(err)
		}
	}
	stage(1, 3*staleStagingPeak)
	if len(im.free) != 3*staleStagingPeak || im.stagedPeak != 3*staleStagingPeak {
		t.Fatalf("after the large epoch: %d free buffers, peak %d", len(im.free), im.stagedPeak)
	}
	stage(2, 10)
	if len(im.free) > 2*10+1024 || im.stagedPeak != 10 {
		t.Fatalf("after a small epoch: %d free buffers (want at most %d), peak %d (want 10)", len(im.free), 2*10+1024, im.stagedPeak)
	}
	stage(3, 10)
	if got := g.Regions()[0].Mem[guest.PageSize*5 : guest.PageSize*5+2]; got[0] != 3 || got[1] != 5 {
		t.Fatalf("page 5 holds %v after epoch 3", got)
	}
	if want := guest.ScanMemory(g.Regions()).Sum(); im.hash.Sum() != want {
		t.Fatalf("memory hash %x, a scan of memory %x", im.hash.Sum(), want)
	}
}
