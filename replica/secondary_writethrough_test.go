package replica

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/precopy"
)

// TestSecondaryCatchUpWritesThroughThenStages: a secondary's catch-up
// goes straight into its new guest's memory (nothing staged), and once
// the image is adopted its epochs are staged again: an epoch cut before
// its end leaves the image held, in memory, exactly at the last
// committed epoch, and it activates.
func TestSecondaryCatchUpWritesThroughThenStages(t *testing.T) {
	cfg, src := runningSource(t)
	// Wait (bounded) until the guest has touched its 4 MiB.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var held uint64
		for _, h := range ResidentHint(src) {
			held += h[1]
		}
		if held >= 1024 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest holds %d pages in long runs after 10 s, want its 1,024 touched", held)
		}
	}
	sec := NewSecondary(&Receiver{NewGuest: synthFactory, Build: "test", Timeout: 5 * time.Second}, nil)
	defer sec.Close()
	addr, served := serveOnce(t, sec)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	hello := Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg, Build: "test", Resident: ResidentHint(src)}
	link, core, sender, caughtUp := caughtUpLink(t, ctx, addr, src, hello)
	if caughtUp < 2*256 {
		t.Fatalf("the catch-up sent %d pages, too few to tell staging from writing through", caughtUp)
	}
	for e := 1; e <= 2; e++ {
		time.Sleep(50 * time.Millisecond) // pages rewritten
		sendEpoch(t, ctx, core, sender, link)
	}
	sec.mu.Lock()
	im := sec.current
	sec.mu.Unlock()
	if im == nil {
		t.Fatal("no image adopted after two consistent epochs")
	}
	lastDigest := im.Digest() // the committed epoch's, kept page by page
	// An epoch that rewrites pages, cut before its end.
	time.Sleep(50 * time.Millisecond)
	cp, err := core.Capture(ctx, precopy.CaptureOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(cp.Pages) == 0 {
		t.Fatal("the torn epoch carries no pages")
	}
	link.Writer().WritePages(cp.Pages)
	link.Flush()
	link.Close()
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		t.Fatal("secondary did not notice the cut")
	}
	// Serve has returned: the image's staging is no goroutine's now. The
	// catch-up's epochs held 256 pages each; staged, its peak would be
	// at least that, where the epochs after it stage a few pages.
	if im.stagedPeak >= 256 {
		t.Errorf("the image staged up to %d pages in one epoch: the catch-up was staged, not written through", im.stagedPeak)
	}
	g, _, _, err := sec.Activate()
	if err != nil {
		t.Fatalf("activate the held image after a cut epoch: %v", err)
	}
	defer g.Close()
	st, _ := g.SaveState()
	if got := guest.CombineDigest(guest.ScanMemory(g.Regions()).Sum(), st); got != lastDigest {
		t.Fatalf("held image digest %s, want the last committed epoch's %s", got, lastDigest)
	}
}

// runningSource is a running 32 MiB synth guest dirtying 2,000 random
// pages a second of its first 4 MiB, closed with the test.
func runningSource(t *testing.T) (guest.Config, *synth.Guest) {
	t.Helper()
	cfg := guest.Config{Memory: 32 << 20, VCPUs: 1, Workload: guest.Workload{
		Kind: guest.WorkloadDirty, Touch: 4 << 20, DirtyRate: 2000, Pattern: guest.PatternRandom}}
	src, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	src.Resume()
	return cfg, src
}

// caughtUpLink dials the secondary at addr with hello and sends it all
// of src (the catch-up, 256 pages an epoch); it returns the link, the
// sender and its core, and the pages the catch-up sent.
func caughtUpLink(t *testing.T, ctx context.Context, addr string, src guest.Guest, hello Hello) (*Link, *precopy.Core, *precopy.LiveSender, uint64) {
	t.Helper()
	link, err := Dial(ctx, addr, hello, src.Regions(), DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	core := precopy.NewCore(src, nil)
	sender := &precopy.LiveSender{Core: core, Link: link, EpochPages: 256}
	core.Sync()
	core.Dirty.Clear()
	n, err := sender.SendAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return link, core, sender, n
}

// sendEpoch captures src's changes through core and sends them, with
// the machine state, as one consistent epoch; it returns the epoch once
// the receiver has acknowledged it.
func sendEpoch(t *testing.T, ctx context.Context, core *precopy.Core, sender *precopy.LiveSender, link *Link) uint64 {
	t.Helper()
	cp, err := core.Capture(ctx, precopy.CaptureOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w := link.Writer()
	if err := w.WritePages(cp.Pages); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteDevices(cp.State); err != nil {
		t.Fatal(err)
	}
	ep, err := sender.EndEpoch()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := link.WaitAck(ctx, ep, false); err != nil {
		t.Fatal(err)
	}
	return ep
}

// TestActivateDoesNotWaitForTheStoresSync: with a store under --sync
// memory the fsync follows the acknowledgement; an activation while it
// hangs (a stalled disk) returns at once with the acknowledged epoch,
// never waiting for the disk (the copy into memory precedes the store).
func TestActivateDoesNotWaitForTheStoresSync(t *testing.T) {
	cfg, src := runningSource(t)
	store, err := OpenStore(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	sec := NewSecondary(&Receiver{NewGuest: synthFactory, Build: "test", Timeout: 5 * time.Second}, nil)
	sec.Store = store
	defer sec.Close()
	hung, release := make(chan struct{}, 1), make(chan struct{})
	var hits atomic.Int32
	disable := FPAfterAckBeforeSync.Enable(func() error {
		if hits.Add(1) == 1 {
			return nil // the adopting epoch: its store was just begun
		}
		select {
		case hung <- struct{}{}:
		default:
		}
		select { // the fsync "hangs", bounded
		case <-release:
		case <-time.After(20 * time.Second):
		}
		return nil
	})
	defer disable()
	defer close(release) // before disable, which waits for the action
	addr, _ := serveOnce(t, sec)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	link, core, sender, _ := caughtUpLink(t, ctx, addr, src, Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg, Build: "test"})
	defer link.Close()
	// Epochs until one's fsync hangs (the failpoint runs just after its
	// acknowledgement: wait a moment for it before sending another, which
	// would wait for an acknowledgement the hung Serve cannot send).
	reached := false
	for i := 0; i < 4 && !reached; i++ {
		time.Sleep(20 * time.Millisecond)
		sendEpoch(t, ctx, core, sender, link)
		select {
		case <-hung:
			reached = true
		case <-time.After(time.Second):
		}
	}
	if !reached {
		t.Fatal("the store's fsync was never reached")
	}
	done := make(chan error, 1)
	go func() {
		g, _, _, err := sec.Activate()
		if err == nil {
			g.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("activate: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("activation waits for the store's fsync")
	}
}
