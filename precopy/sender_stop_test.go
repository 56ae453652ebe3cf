package precopy

import (
	"context"
	"io"
	"testing"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// discardLink is a Link whose destination takes everything at once.
type discardLink struct {
	w     *checkpoint.Writer
	epoch uint64
}

func (l *discardLink) Writer() *checkpoint.Writer { return l.w }
func (l *discardLink) Flush() error               { return nil }
func (l *discardLink) BytesSent() uint64          { return 0 }
func (l *discardLink) WaitAck(ctx context.Context, epoch uint64, final bool) (Ack, error) {
	return Ack{Epoch: epoch}, nil
}

// A round stopped for a switch (LiveSender.Stop) ends at its next batch:
// a stopped full pass leaves exactly the pages it did not reach in the
// Bitmap (the switch owes them), a stopped dirty round the pages it did
// not take.
func TestLiveSenderStops(t *testing.T) {
	g, err := synth.New(guest.Config{Memory: 8 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	regions := g.Regions()
	for i := range regions[0].Mem {
		regions[0].Mem[i] = byte(i>>12) | 1 // every page non-zero
	}
	pages := regions[0].Pages()
	w, err := checkpoint.NewWriter(io.Discard, checkpoint.Header{Build: "test", Kind: synth.Kind, PageSize: guest.PageSize,
		Regions: checkpoint.RegionsOf(regions)}, checkpoint.Options{})
	if err != nil {
		t.Fatal(err)
	}
	core := NewCore(g, nil)
	stop := false
	s := &LiveSender{Core: core, Link: &discardLink{w: w}, KeepDisk: true, Stop: func() bool { return stop }}
	batch := uint64(s.batchPages())
	if pages < 2*batch {
		t.Fatalf("guest of %d pages: want at least two batches of %d", pages, batch)
	}
	ctx := context.Background()

	stop = true
	sent, err := s.SendAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	first := regions[0].FirstPage()
	if sent != batch || core.Dirty.Count() != pages-batch || core.Dirty.Test(first+batch-1) || !core.Dirty.Test(first+batch) {
		t.Fatalf("stopped full pass: sent %d, %d pages left dirty: want %d sent and the %d after them dirty", sent, core.Dirty.Count(), batch, pages-batch)
	}
	sent, err = s.SendDirty(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sent != batch || core.Dirty.Count() != pages-2*batch {
		t.Fatalf("stopped dirty round: sent %d, %d left: want %d and %d", sent, core.Dirty.Count(), batch, pages-2*batch)
	}
	stop = false
	if sent, err = s.SendDirty(ctx); err != nil || sent != pages-2*batch || core.Dirty.Count() != 0 {
		t.Fatalf("dirty round not stopped: sent %d (%v), %d left: want the rest", sent, err, core.Dirty.Count())
	}
	if sent, err = s.SendAll(ctx); err != nil || sent != pages {
		t.Fatalf("full pass not stopped: sent %d (%v), want %d", sent, err, pages)
	}
}

// TestLiveSenderStopOwesOnlyPopulated: a full pass stopped on a sparse
// guest marks dirty only the pages not reached that the host holds: the
// others are zero at both ends (SendAll skips them for the same reason),
// and owing them would make a post-copy switch serve holes.
func TestLiveSenderStopOwesOnlyPopulated(t *testing.T) {
	g, err := synth.New(guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	r := g.Regions()[0]
	var held []uint64 // pages of r the host holds, by Populated
	if err := guest.Populated(r, func(p, n uint64) error {
		for q := p; q < p+n; q++ {
			held = append(held, q)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	written := []uint64{5000, 5001, 9000, r.Pages() - 1}
	for _, p := range written {
		r.Mem[p<<guest.PageShift+3] = 7
	}
	w, err := checkpoint.NewWriter(io.Discard, checkpoint.Header{Build: "test", Kind: synth.Kind, PageSize: guest.PageSize,
		Regions: checkpoint.RegionsOf(g.Regions())}, checkpoint.Options{})
	if err != nil {
		t.Fatal(err)
	}
	core := NewCore(g, nil)
	s := &LiveSender{Core: core, Link: &discardLink{w: w}, KeepDisk: true}
	s.markRest(g.Regions(), 4000)
	want := map[uint64]bool{}
	for _, p := range append(held, written...) {
		if p >= 4000 {
			want[r.FirstPage()+p] = true
		}
	}
	if got := core.Dirty.Count(); got != uint64(len(want)) || got > r.Pages()/4 {
		t.Fatalf("%d pages owed of %d (want %d: the populated pages from 4000 on)", got, r.Pages(), len(want))
	}
	for p := range want {
		if !core.Dirty.Test(p) {
			t.Errorf("written page %d not owed", p-r.FirstPage())
		}
	}
}
