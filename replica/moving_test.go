package replica

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/precopy"
)

// movingPair is a secondary serving every connection to its listener,
// holding one consistent epoch of a real synth guest (epoch), its
// replicate link closed again (a primary that shipped its final epoch).
type movingPair struct {
	sec   *Secondary
	addr  string
	hello Hello
	epoch uint64
	stop  func()
}

func startMovingPair(t *testing.T) *movingPair { return startMovingPairStore(t, nil) }

// startMovingPairStore is startMovingPair with a secondary keeping its
// image in store (nil: none).
func startMovingPairStore(t *testing.T, store *Store) *movingPair {
	t.Helper()
	cfg := guest.Config{Memory: 16 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	src, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	src.Resume()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sec := NewSecondary(&Receiver{NewGuest: synthFactory, Build: "test", Timeout: 5 * time.Second}, nil)
	sec.Store = store
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { defer conn.Close(); sec.Serve(ctx, conn) })
		}
	})
	mp := &movingPair{sec: sec, addr: ln.Addr().String(), hello: Hello{Kind: synth.Kind, Config: cfg, Build: "test"}}
	mp.stop = func() { cancel(); ln.Close(); wg.Wait(); sec.Close() }
	t.Cleanup(mp.stop)
	mp.sync(t, src)
	mp.epoch = sec.Status(false).LastCommittedEpoch
	return mp
}

// sync is a primary syncing src's full image to the secondary, one
// epoch, and going away.
func (mp *movingPair) sync(t *testing.T, src guest.Guest) {
	t.Helper()
	dctx, dcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer dcancel()
	h := mp.hello
	h.Purpose = PurposeReplicate
	link, err := Dial(dctx, mp.addr, h, src.Regions(), DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	core := precopy.NewCore(src, nil)
	sender := &precopy.LiveSender{Core: core, Link: link}
	core.Sync()
	core.Dirty.Clear()
	if _, err := sender.SendAll(dctx); err != nil {
		t.Fatal(err)
	}
	cp, err := core.Capture(dctx, precopy.CaptureOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := link.Writer().WritePages(cp.Pages); err != nil {
		t.Fatal(err)
	}
	if err := link.Writer().WriteDevices(cp.State); err != nil {
		t.Fatal(err)
	}
	ep, err := sender.EndEpoch()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := link.WaitAck(dctx, ep, false); err != nil {
		t.Fatal(err)
	}
	link.Close()
	waitFor(t, "the replicate link's end", func() bool { _, connected, _ := mp.sec.PrimaryContact(); return !connected })
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 5 s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (mp *movingPair) notice(t *testing.T, epoch uint64) (*MoveNotice, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h := mp.hello
	h.MigrationID, h.Destination, h.FinalEpoch = "m1", "10.0.0.9:7000", epoch
	return OpenMoveNotice(ctx, mp.addr, h, DialOptions{})
}

// A move notice is refused unless the secondary holds the final epoch;
// while it is open the primary counts as heard (no epochs flow); its
// commit retires the secondary, which then refuses activation.
func TestMoveNoticeRetires(t *testing.T) {
	mp := startMovingPair(t)
	if _, err := mp.notice(t, mp.epoch+1); err == nil || !strings.Contains(err.Error(), "committed epoch") {
		t.Fatalf("a notice of an epoch the secondary lacks: %v, want a refusal naming the committed epoch", err)
	}
	n, err := mp.notice(t, mp.epoch)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * MoveHeartbeat)
	_, connected, heard := mp.sec.PrimaryContact()
	if !connected || time.Since(heard) > 2*MoveHeartbeat {
		t.Errorf("during the move: connected %v, heard %v ago: want the notice's heartbeats to count", connected, time.Since(heard))
	}
	if mv, ok := mp.sec.Move(); !ok || !mv.Open || mv.Done || mv.Epoch != mp.epoch || mv.Destination != "10.0.0.9:7000" {
		t.Errorf("during the move: %+v %v", mv, ok)
	}
	if err := n.Commit(5 * time.Second); err != nil {
		t.Fatalf("commit: %v", err)
	}
	if mv, _ := mp.sec.Move(); !mv.Done {
		t.Errorf("after the commit: %+v, want done", mv)
	}
	if _, _, _, err := mp.sec.Activate(); !errors.Is(err, ErrMoved) || !strings.Contains(err.Error(), "10.0.0.9:7000") {
		t.Errorf("activation of a retired secondary: %v, want ErrMoved naming the destination", err)
	}
	if _, err := mp.notice(t, mp.epoch); err == nil || !strings.Contains(err.Error(), "moved") {
		t.Errorf("a new notice to a retired secondary: %v, want refused", err)
	}
}

// An aborted move is forgotten; a notice that ends without an outcome (the
// primary died) leaves the move on record, not open, and activation
// allowed; a forced activation during a move makes its commit fail.
func TestMoveNoticeAbortDeathForce(t *testing.T) {
	mp := startMovingPair(t)
	n, err := mp.notice(t, mp.epoch)
	if err != nil {
		t.Fatal(err)
	}
	n.Abort("test")
	waitFor(t, "the abort", func() bool { _, ok := mp.sec.Move(); return !ok })

	n, err = mp.notice(t, mp.epoch)
	if err != nil {
		t.Fatal(err)
	}
	n.Close()
	waitFor(t, "the notice's end", func() bool { mv, ok := mp.sec.Move(); return ok && !mv.Open })
	if _, connected, _ := mp.sec.PrimaryContact(); connected {
		t.Error("a primary whose notice ended is still taken as connected")
	}
	if mv, _ := mp.sec.Move(); mv.Done {
		t.Error("a notice with no outcome retired the secondary")
	}

	n, err = mp.notice(t, mp.epoch)
	if err != nil {
		t.Fatal(err)
	}
	g, _, c, err := mp.sec.Activate()
	if err != nil {
		t.Fatalf("forced activation during a move: %v", err)
	}
	defer g.Close()
	if c.Epoch != mp.epoch {
		t.Errorf("activated at epoch %d, want the final epoch %d", c.Epoch, mp.epoch)
	}
	if err := n.Commit(5 * time.Second); err == nil {
		t.Error("the move's commit succeeded after the secondary was activated")
	}
	n.Close()
}
