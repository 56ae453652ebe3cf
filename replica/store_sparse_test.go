package replica

import (
	"bytes"
	"testing"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// TestStoreReadsOnlyPopulatedMemory: writing a store's image reads the
// pages the host holds and no others (a read of a hole costs a fault and,
// on hosts without a shared zero page, a page of RAM: the secondary of a
// sparse guest filled its whole memory in at every compaction), and the
// image loads back with every written page.
func TestStoreReadsOnlyPopulatedMemory(t *testing.T) {
	cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	g, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	im := NewImage(g)
	r := g.Regions()[0]
	before := populatedSet(r)
	written := map[uint64]byte{3000: 1, 3001: 2, 9000: 3, r.Pages() - 1: 4}
	page := make([]byte, guest.PageSize)
	for p, v := range written {
		page[100] = v
		if err := im.StorePage(r.FirstPage()+p, page); err != nil {
			t.Fatal(err)
		}
	}
	st, err := g.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	if err := im.StoreDevices(st); err != nil {
		t.Fatal(err)
	}
	if err := im.EndEpoch(checkpoint.EpochEnd{Epoch: 1, Pages: uint64(len(written))}); err != nil {
		t.Fatal(err)
	}
	store, err := OpenStore(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Begin(im, Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg, Build: "test"}); err != nil {
		t.Fatal(err)
	}
	after := populatedSet(r)
	for p := range after {
		if _, ok := written[p]; !ok && !before[p] {
			t.Errorf("page %d populated by the store's write: it read a hole", p)
		}
	}
	g.Close()
	store.Close()

	rc := &Receiver{NewGuest: synthFactory, Build: "test", Timeout: 5 * time.Second}
	im2, _, ok, err := store.Load(rc)
	if err != nil || !ok {
		t.Fatalf("load: ok=%v err=%v", ok, err)
	}
	defer im2.Guest().Close()
	r2 := im2.Guest().Regions()[0]
	for p, v := range written {
		got := r2.Mem[p<<guest.PageShift : (p+1)<<guest.PageShift]
		page[100] = v
		if !bytes.Equal(got, page) {
			t.Errorf("page %d not restored", p)
		}
	}
}
