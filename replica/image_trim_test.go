package replica

import (
	"testing"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// TestStagingShrinksAfterALargeEpoch: a large first epoch (a join's) does
// not leave every later small epoch a staging map and a pool of free page
// buffers of its size, but epochs that alternate large and small keep
// theirs (no churn); the image's content and digest are unaffected.
func TestStagingShrinksAfterALargeEpoch(t *testing.T) {
	g, err := synth.New(guest.Config{Memory: 128 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
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
	big := staleStagingPeak + 1000
	stage(1, big)
	if len(im.free) != big || im.stagedPeak != big {
		t.Fatalf("after the large epoch: %d free buffers, peak %d", len(im.free), im.stagedPeak)
	}
	// Large and small epochs alternating: nothing is thrown away.
	epoch := uint64(2)
	for range 6 { // three cycles: a trim needs trimAfter small epochs in a row
		pages := 10
		if epoch%2 == 0 {
			pages = big
		}
		stage(epoch, pages)
		epoch++
		if len(im.free) != big {
			t.Fatalf("alternating epochs, after one of %d pages: %d free buffers, want all %d kept", pages, len(im.free), big)
		}
	}
	stage(epoch, big) // the last of them large: no small epoch counted yet
	epoch++
	if len(im.free) != big || im.stagedPeak != big {
		t.Fatalf("alternating epochs: %d free buffers (want %d kept), peak %d", len(im.free), big, im.stagedPeak)
	}
	// Small epochs only: after trimAfter of them the room goes.
	for range trimAfter - 1 {
		stage(epoch, 10)
		epoch++
	}
	if len(im.free) != big {
		t.Fatalf("%d small epochs: %d free buffers, want all %d kept until %d", trimAfter-1, len(im.free), big, trimAfter)
	}
	stage(epoch, 10)
	epoch++
	if len(im.free) > 2*10+1024 || im.stagedPeak != 10 {
		t.Fatalf("after %d small epochs: %d free buffers (want at most %d), peak %d (want 10)", trimAfter, len(im.free), 2*10+1024, im.stagedPeak)
	}
	stage(epoch, 10)
	if got := g.Regions()[0].Mem[guest.PageSize*5 : guest.PageSize*5+2]; got[0] != byte(epoch) || got[1] != 5 {
		t.Fatalf("page 5 holds %v after epoch %d", got, epoch)
	}
	if want := guest.ScanMemory(g.Regions()).Sum(); im.hash.Sum() != want {
		t.Fatalf("memory hash %x, a scan of memory %x", im.hash.Sum(), want)
	}
}
