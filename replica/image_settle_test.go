package replica

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"time"
	"unsafe"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/smaps"
)

// An image that acknowledges before copying reports the epoch (digest,
// number) at EndEpoch with its pages not yet in memory; Activate waits
// for Settle, and the next epoch's first page settles the last one, so a
// stream received so ends with the memory and digest of an image that
// copies at once.
func TestAckBeforeCopy(t *testing.T) {
	stream := wtStream(t)
	plain, early := NewImage(wtGuest(t)), NewImage(wtGuest(t))
	early.AckBeforeCopy()
	receiveAll(t, stream, plain)

	rd, err := checkpoint.NewReader(bytes.NewReader(stream), checkpoint.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	mem := early.Guest().Regions()[0].Mem
	if _, err := rd.ReadEpoch(early); err != nil {
		t.Fatal(err)
	}
	// Epoch 1 stores random data in the first half of memory: committed,
	// not yet copied.
	if c := early.Committed(); c.Epoch != 1 {
		t.Fatalf("committed %+v after epoch 1", c)
	}
	if !early.copyPending || !guest.IsZeroPage(mem[:guest.PageSize]) {
		t.Fatal("EndEpoch copied the pages: nothing was left for Settle")
	}
	if got, want := early.hash.Sum(), digestOfStream(t, stream, 1); got != want {
		t.Fatalf("digest after epoch 1 %x, want %x (the acknowledgement's digest must include the epoch)", got, want)
	}
	// The next epoch settles the last before it stages anything.
	if _, err := rd.ReadEpoch(early); err != nil {
		t.Fatal(err)
	}
	if guest.IsZeroPage(mem[:guest.PageSize]) {
		t.Fatal("epoch 1's pages are still not in memory after epoch 2 was read")
	}
	for {
		if _, err := rd.ReadEpoch(early); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
	}
	if !early.copyPending {
		t.Fatal("the last epoch was copied by EndEpoch")
	}
	// Activate waits for the copy.
	type result struct {
		c   Committed
		err error
	}
	done := make(chan result, 1)
	go func() {
		_, c, err := early.Activate()
		done <- result{c, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("Activate returned (%+v, %v) with an epoch not yet in memory", r.c, r.err)
	case <-time.After(50 * time.Millisecond):
	}
	early.Settle()
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatal(r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Activate still waits after Settle")
	}
	if !bytes.Equal(mem, plain.Guest().Regions()[0].Mem) {
		t.Fatal("memory differs from the image that copied at once")
	}
	if early.Digest() != plain.Digest() {
		t.Fatalf("digest %v, want %v", early.Digest(), plain.Digest())
	}
	if got, want := early.hash.Sum(), guest.ScanMemory(early.Guest().Regions()).Sum(); got != want {
		t.Fatalf("incremental digest %x, scan %x", got, want)
	}
}

// digestOfStream is the memory digest of an image that received the
// first n epochs of stream and copied each at once.
func digestOfStream(t *testing.T, stream []byte, n int) [16]byte {
	t.Helper()
	im := NewImage(wtGuest(t))
	rd, err := checkpoint.NewReader(bytes.NewReader(stream), checkpoint.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	for range n {
		if _, err := rd.ReadEpoch(im); err != nil {
			t.Fatal(err)
		}
	}
	return im.hash.Sum()
}

// Close waits for a pending copy too, and Discard settles before it
// drops a partly received epoch (the committed pages are not lost with
// the staged ones).
func TestAckBeforeCopyCloseAndDiscard(t *testing.T) {
	im := NewImage(wtGuest(t))
	im.AckBeforeCopy()
	page := bytes.Repeat([]byte{7}, guest.PageSize)
	if err := im.StorePage(3, page); err != nil {
		t.Fatal(err)
	}
	if err := im.EndEpoch(checkpoint.EpochEnd{Epoch: 1, Pages: 1}); err != nil {
		t.Fatal(err)
	}
	im.Discard()
	mem := im.Guest().Regions()[0].Mem
	if !bytes.Equal(mem[3*guest.PageSize:4*guest.PageSize], page) {
		t.Fatal("Discard dropped a committed epoch's pages")
	}
	if err := im.StorePage(4, page); err != nil {
		t.Fatal(err)
	}
	if err := im.EndEpoch(checkpoint.EpochEnd{Epoch: 2, Pages: 1}); err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	go func() { im.Close(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("Close returned with an epoch not yet in memory")
	case <-time.After(50 * time.Millisecond):
	}
	im.Settle()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close still waits after Settle")
	}
}

// A Store handed an epoch whose pages still wait for Settle settles it
// before it copies the pages out, and loads back with them.
func TestAckBeforeCopyStoreAppend(t *testing.T) {
	cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	g, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	im := NewImage(g)
	im.AckBeforeCopy()
	im.Record()
	st, err := g.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	page := func(v byte) []byte { return bytes.Repeat([]byte{v}, guest.PageSize) }
	if err := im.StorePage(5, page(1)); err != nil {
		t.Fatal(err)
	}
	if err := im.StoreDevices(st); err != nil {
		t.Fatal(err)
	}
	if err := im.EndEpoch(checkpoint.EpochEnd{Epoch: 1, Pages: 1}); err != nil {
		t.Fatal(err)
	}
	store, err := OpenStore(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Begin(im, Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg, Build: "test"}); err != nil {
		t.Fatal(err)
	}
	for _, idx := range []uint64{5, 6} {
		if err := im.StorePage(idx, page(2)); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.StoreDevices(st); err != nil {
		t.Fatal(err)
	}
	e := checkpoint.EpochEnd{Epoch: 2, Pages: 2}
	if err := im.EndEpoch(e); err != nil {
		t.Fatal(err)
	}
	pages, state, disk := im.LastCommit()
	if err := store.Append(im, e, pages, state, disk); err != nil {
		t.Fatal(err)
	}
	if im.copyPending {
		t.Fatal("Append copied out an epoch still waiting for Settle")
	}
	store.Close()
	rc := &Receiver{NewGuest: synthFactory, Build: "test", Timeout: 5 * time.Second}
	im2, _, ok, err := store.Load(rc)
	if err != nil || !ok {
		t.Fatalf("load: ok=%v err=%v", ok, err)
	}
	defer im2.Guest().Close()
	if c := im2.Committed(); c.Epoch != 2 {
		t.Fatalf("loaded epoch %d, want 2", c.Epoch)
	}
	mem := im2.Guest().Regions()[0].Mem
	for _, idx := range []uint64{5, 6} {
		if !bytes.Equal(mem[idx*guest.PageSize:(idx+1)*guest.PageSize], page(2)) {
			t.Fatalf("page %d not as epoch 2 left it", idx)
		}
	}
}

// An adopted image's whole-write range (guest.WholeWriter) is advised
// MADV_HUGEPAGE by adviseWholeWrites, and not before: a receiver's
// catch-up takes huge pages only where the primary names its resident
// runs. Where the kernel writes the pages (guest.KernelWrites) the image
// takes no huge pages and is never advised.
func TestAdviseWholeWrites(t *testing.T) {
	cfg := guest.Config{Memory: 32 << 20, VCPUs: 1, Workload: guest.Workload{
		Kind: guest.WorkloadDirty, Touch: 8 << 20, DirtyRate: 2000, Pattern: guest.PatternRandom}}
	g, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	im := NewImage(g)
	mem := im.regions[0].Mem
	base := uintptr(unsafe.Pointer(&mem[0]))
	advised := func(off uintptr) bool {
		t.Helper()
		// the middle of the first whole 2 MiB block at or after off
		flags, _, found, err := smaps.Mapping((base+off+2<<20-1)&^(2<<20-1) + 1<<20)
		if err != nil {
			t.Skipf("no smaps: %v", err)
		}
		return found && smaps.HugeAdvised(flags)
	}
	if advised(0) {
		t.Fatal("a new image's memory is advised MADV_HUGEPAGE before it is adopted")
	}
	if guest.KernelWrites() {
		if im.huge {
			t.Fatal("an image written from the kernel's side takes huge pages")
		}
		im.adviseWholeWrites()
		if advised(0) {
			t.Fatal("an image written from the kernel's side is advised MADV_HUGEPAGE")
		}
		im.huge, im.wholeAdvised = true, false // as where the kernel refuses such writes
	}
	im.adviseWholeWrites()
	if !advised(0) {
		t.Fatal("the dirty range is not advised MADV_HUGEPAGE after adviseWholeWrites")
	}
	if advised(16 << 20) {
		t.Fatal("memory past the dirty range is advised MADV_HUGEPAGE")
	}
}
