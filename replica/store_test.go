package replica

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/precopy"
)

// TestSecondaryComesBackAtItsLastCommittedEpoch streams epochs of a real
// guest into a secondary with a Store, cuts the stream in the middle of an
// epoch, and restarts the secondary from its directory: it must hold
// exactly the last complete epoch, and activate into a guest that answers.
func TestSecondaryComesBackAtItsLastCommittedEpoch(t *testing.T) {
	cfg := guest.Config{Memory: 32 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	src, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var out lines
	src.Console().SetOutput(out.sink)
	src.Resume()
	dir := t.TempDir()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	r := &Receiver{NewGuest: synthFactory, Build: "test", Timeout: 5 * time.Second}
	store, err := OpenStore(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	sec := NewSecondary(r, nil)
	sec.Store = store
	served := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			served <- err
			return
		}
		served <- sec.Serve(context.Background(), conn)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	link, err := Dial(ctx, ln.Addr().String(), Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg, Build: "test"},
		src.Regions(), DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	core := precopy.NewCore(src, nil)
	sender := &precopy.LiveSender{Core: core, Link: link}
	core.Sync()
	core.Dirty.Clear()
	if _, err := sender.SendAll(ctx); err != nil {
		t.Fatal(err)
	}
	// Three consistent epochs, each after a few kv writes.
	var lastDigest guest.Digest
	for e := 1; e <= 3; e++ {
		for i := 0; i < 5; i++ {
			src.Console().Input([]byte(fmt.Sprintf("c:%d SET k%d v%d\n", e*10+i, e*10+i, e)))
		}
		out.waitFor(t, fmt.Sprintf("c:%d OK", e*10+4))
		sendEpoch(t, ctx, core, sender, link)
		src.Pause(ctx)
		st, _ := src.SaveState()
		lastDigest = guest.CombineDigest(guest.ScanMemory(src.Regions()).Sum(), st)
		src.Resume()
	}
	committed := sec.Status(false).LastCommittedEpoch
	// A torn epoch: pages sent, then the connection dies before its end.
	src.Console().Input([]byte("c:99 SET torn yes\n"))
	out.waitFor(t, "c:99 OK")
	cp, err := core.Capture(ctx, precopy.CaptureOptions{})
	if err != nil {
		t.Fatal(err)
	}
	link.Writer().WritePages(cp.Pages)
	link.Flush()
	link.Close()
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		t.Fatal("secondary did not notice the cut")
	}
	sec.Close()

	// Restart from the directory.
	store2, _ := OpenStore(dir, nil)
	sec2 := NewSecondary(r, nil)
	sec2.Store = store2
	c, ok, err := sec2.LoadStored()
	if err != nil || !ok {
		t.Fatalf("LoadStored: ok=%v err=%v", ok, err)
	}
	if c.Epoch != committed || !c.Consistent {
		t.Fatalf("restarted at epoch %d (consistent %v), want %d", c.Epoch, c.Consistent, committed)
	}
	g, _, _, err := sec2.Activate()
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	st, _ := g.SaveState()
	if got := guest.CombineDigest(guest.ScanMemory(g.Regions()).Sum(), st); got != lastDigest {
		t.Fatalf("restored image digest %s, want the last committed epoch's %s", got, lastDigest)
	}
	var out2 lines
	g.Console().SetOutput(out2.sink)
	g.Resume()
	g.Console().Input([]byte("c:100 GET k34\nc:101 GET torn\n"))
	out2.waitFor(t, "c:100 OK v3")
	out2.waitFor(t, "c:101 NOTFOUND")
}
