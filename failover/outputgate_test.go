package failover

import (
	"bytes"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/clock"
)

func TestOutputGateReleasesOnlyAckedEpochsInOrder(t *testing.T) {
	var out bytes.Buffer
	g := NewOutputGate(1, func(p []byte) { out.Write(p) }, nil)
	g.Write([]byte("a1 "))
	if e := g.Seal(); e != 1 {
		t.Fatalf("Seal = %d, want 1", e)
	}
	g.Write([]byte("b2 "))
	g.Seal()
	g.Write([]byte("c3 "))

	if !g.Release(0) || out.Len() != 0 {
		t.Fatalf("released %q before any ack", out.String())
	}
	g.Release(1)
	if out.String() != "a1 " {
		t.Fatalf("after ack 1: %q", out.String())
	}
	g.Release(1) // a repeated ack releases nothing twice
	g.Release(2)
	if out.String() != "a1 b2 " {
		t.Fatalf("after ack 2: %q", out.String())
	}
	if g.Held() != 3 {
		t.Fatalf("held %d, want 3 (epoch 3 open)", g.Held())
	}
}

func TestOutputGateFencedReleasesNothing(t *testing.T) {
	var out bytes.Buffer
	fenced := false
	g := NewOutputGate(1, func(p []byte) { out.Write(p) }, func() bool { return !fenced })
	g.Write([]byte("x"))
	g.Seal()
	fenced = true
	if g.Release(1) {
		t.Fatal("Release succeeded while fenced")
	}
	g.Discard()
	fenced = false
	g.Release(5)
	if out.Len() != 0 {
		t.Fatalf("fenced gate released %q", out.String())
	}
}

func TestOutputGateConcurrentWriters(t *testing.T) {
	var mu sync.Mutex
	total := 0
	g := NewOutputGate(1, func(p []byte) { mu.Lock(); total += len(p); mu.Unlock() }, nil)
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 1000; i++ {
				g.Write([]byte("xy"))
			}
		}()
	}
	wg.Wait()
	e := g.Seal()
	g.Release(e)
	if total != 8000 || g.Held() != 0 {
		t.Fatalf("released %d held %d, want 8000 and 0", total, g.Held())
	}
}

func TestOutputGatePassingReleasesHeldFirstThenPassesOn(t *testing.T) {
	var out bytes.Buffer
	g := NewOutputGate(1, func(p []byte) { out.Write(p) }, nil)
	g.Write([]byte("held "))
	g.Hold(false)
	g.Write([]byte("direct"))
	if out.String() != "held direct" {
		t.Fatalf("got %q", out.String())
	}
	g.Hold(true)
	g.Write([]byte(" later"))
	if out.String() != "held direct" || g.Held() != 6 {
		t.Fatalf("holding gate passed output on: %q", out.String())
	}
}

// The sink is the outside world: while it blocks, the gate still answers
// and Hold(true) and Seal (called at a pause) still return; a Discard waits for the
// sink call in flight and nothing it dropped leaves afterwards.
func TestOutputGateSinkBlockingDoesNotHoldTheGate(t *testing.T) {
	entered := make(chan struct{}, 1)
	unblock := make(chan struct{})
	var mu sync.Mutex
	var out bytes.Buffer
	var fenced atomic.Bool
	g := NewOutputGate(1, func(p []byte) {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-unblock
		mu.Lock()
		out.Write(p)
		mu.Unlock()
	}, func() bool { return !fenced.Load() })
	g.Write([]byte("a1 "))
	g.Seal()
	g.Write([]byte("b2 "))
	released := make(chan bool, 1)
	go func() { released <- g.Release(1) }()
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the sink was never called")
	}

	answered := make(chan struct{})
	go func() {
		_ = g.Holding()
		_ = g.Held()
		_ = g.Delays()
		g.Hold(true) // what a pause does, with Seal
		g.Seal()
		g.Write([]byte("c3 "))
		close(answered)
	}()
	select {
	case <-answered:
	case <-time.After(2 * time.Second):
		t.Fatal("Holding/Held/Seal/Write waited for a blocked sink")
	}

	fenced.Store(true)
	discarded := make(chan struct{})
	go func() { g.Discard(); close(discarded) }()
	select {
	case <-discarded:
		t.Fatal("Discard returned while a sink call was in flight")
	case <-time.After(100 * time.Millisecond):
	}
	close(unblock)
	select {
	case <-discarded:
	case <-time.After(5 * time.Second):
		t.Fatal("Discard never returned")
	}
	if ok := <-released; !ok {
		t.Fatal("Release before the fence refused")
	}
	if g.Release(3) {
		t.Fatal("a release after the fence was allowed")
	}
	g.Hold(false)
	g.Write([]byte("d4 "))
	mu.Lock()
	defer mu.Unlock()
	if out.String() != "a1 " {
		t.Fatalf("sink got %q, want only the pre-fence release %q", out.String(), "a1 ")
	}
	if g.Held() != 0 {
		t.Fatalf("held %d after Discard", g.Held())
	}
}

// A crash just before output is released (the failpoint) releases nothing;
// the held output goes out on the next release once the point is passed.
func TestOutputGateFailpointBeforeRelease(t *testing.T) {
	var out bytes.Buffer
	g := NewOutputGate(1, func(p []byte) { out.Write(p) }, nil)
	g.Write([]byte("x"))
	g.Seal()
	disable := FPBeforeReleaseOutput.Enable(nil)
	if g.Release(1) || out.Len() != 0 {
		t.Fatalf("released %q through an armed failpoint", out.String())
	}
	disable()
	if !g.Release(1) || out.String() != "x" {
		t.Fatalf("after the failpoint: %q", out.String())
	}
}

// TestOutputGateArrivals: the loop hears of the open epoch's first held
// byte once, on a channel, and OpenHeld counts the open epoch only (a
// sealed epoch's output waits for its acknowledgement, not for a pause).
func TestOutputGateArrivals(t *testing.T) {
	g := NewOutputGate(1, func([]byte) {}, nil)
	arrived := func() bool {
		select {
		case <-g.Arrivals():
			return true
		default:
			return false
		}
	}
	g.Hold(false)
	g.Write([]byte("passing"))
	if arrived() {
		t.Fatal("output passing through (unprotected) signalled an arrival")
	}
	g.Hold(true)
	g.Write([]byte("r1 "))
	g.Write([]byte("r2 "))
	if !arrived() || arrived() {
		t.Fatal("want exactly one arrival for the open epoch's output")
	}
	if o := g.OpenHeld(); o.Bytes != 6 || o.Since.IsZero() || !o.OverlapAt.IsZero() {
		t.Fatalf("open held %+v, want 6 bytes and no overlap", o)
	}
	g.Seal()
	if o := g.OpenHeld(); o.Bytes != 0 || g.Held() != 6 {
		t.Fatalf("after the seal: open %d, held %d; want 0 and 6", o.Bytes, g.Held())
	}
	// Written while epoch 1's output waits: pipelined.
	g.Write([]byte("r3 "))
	if !arrived() {
		t.Fatal("the next epoch's first byte did not signal")
	}
	if o := g.OpenHeld(); o.OverlapAt.IsZero() {
		t.Fatal("output written while earlier output waits is not an overlap")
	}
	g.Discard()
	if o := g.OpenHeld(); o.Bytes != 0 {
		t.Fatalf("open held %d after Discard", o.Bytes)
	}
}

// Frames are held with their epoch like console bytes, leave whole (one
// sink call each) and in order, never before their epoch is acknowledged,
// and never after a fence; the console's bytes keep their own stream.
func TestOutputGateFrames(t *testing.T) {
	var cons bytes.Buffer
	var frames []string
	fenced := false
	g := NewOutputGate(1, func(p []byte) { cons.Write(p) }, func() bool { return !fenced })
	g.SetFrameSink(func(f []byte) { frames = append(frames, string(f)) })
	g.Hold(true)
	g.WriteFrame([]byte("f1a"))
	g.Write([]byte("c1 "))
	g.WriteFrame([]byte("f1b"))
	g.Seal()
	g.WriteFrame([]byte("f2"))
	if g.Release(0); len(frames) != 0 || cons.Len() != 0 {
		t.Fatalf("released before the ack: frames %q, console %q", frames, cons.String())
	}
	g.Release(1)
	if len(frames) != 2 || frames[0] != "f1a" || frames[1] != "f1b" || cons.String() != "c1 " {
		t.Fatalf("after ack 1: frames %q, console %q", frames, cons.String())
	}
	if g.Frames() != 2 || g.Held() != 2 {
		t.Fatalf("frames %d held %d, want 2 and 2 (epoch 2's frame)", g.Frames(), g.Held())
	}
	fenced = true
	g.Discard()
	fenced = false
	g.Seal()
	g.Release(2)
	if len(frames) != 2 {
		t.Fatalf("a discarded frame left: %q", frames)
	}
	// Not holding (unprotected), a frame passes at once.
	g.Hold(false)
	g.WriteFrame([]byte("f3"))
	if len(frames) != 3 || frames[2] != "f3" || g.Frames() != 3 {
		t.Fatalf("passing gate: frames %q", frames)
	}
}

// Frames held for unacknowledged epochs are bounded: past
// maxHeldFrameBytes a frame is dropped and counted, and releasing makes
// room again.
func TestOutputGateBoundsHeldFrames(t *testing.T) {
	g := NewOutputGate(1, nil, nil)
	var sent int
	g.SetFrameSink(func([]byte) { sent++ })
	g.Hold(true)
	frame := make([]byte, 1500)
	n := maxHeldFrameBytes/len(frame) + 10
	for range n {
		g.WriteFrame(frame)
	}
	if d := g.FramesDropped(); d != 10 {
		t.Fatalf("dropped %d of %d frames, want 10", d, n)
	}
	g.Seal()
	g.Release(1)
	if sent != n-10 {
		t.Fatalf("released %d frames, want %d", sent, n-10)
	}
	g.WriteFrame(frame)
	if g.FramesDropped() != 10 || g.Held() != len(frame) {
		t.Fatalf("after the release: dropped %d, held %d", g.FramesDropped(), g.Held())
	}
}

// Console output held is bounded too (rev2's finding 4: a post-copy
// destination's hold can last until an operator acts, and a chatty guest
// grew it without limit): past maxHeldConsoleBytes, counting each write's
// record, console bytes are dropped and counted, one-byte writes
// included, and a release makes room again.
func TestOutputGateBoundsHeldConsole(t *testing.T) {
	var got int
	g := NewOutputGate(1, func(p []byte) { got += len(p) }, nil)
	g.Hold(true)
	chunk := make([]byte, 1<<20)
	for range 20 {
		g.Write(chunk)
	}
	kept := maxHeldConsoleBytes / (len(chunk) + heldRecordCost)
	if d, want := g.ConsoleDropped(), uint64((20-kept)*len(chunk)); d != want {
		t.Fatalf("dropped %d console bytes, want %d (%d of 20 chunks kept)", d, want, kept)
	}
	g.Seal()
	g.Release(1)
	if got != kept*len(chunk) {
		t.Fatalf("released %d bytes, want %d", got, kept*len(chunk))
	}
	before := g.ConsoleDropped()
	for range maxHeldConsoleBytes/heldRecordCost + 100 {
		g.Write([]byte{'x'})
	}
	if g.ConsoleDropped() == before || g.Held() > maxHeldConsoleBytes/heldRecordCost {
		t.Fatalf("one-byte writes: dropped %d, held %d bytes in records: want bounded", g.ConsoleDropped()-before, g.Held())
	}
}

// The gate tells its observer each released item's delay (frames apart
// from console bytes) and how many frames each released epoch held, and
// HeldFrames counts what waits: what a node's metrics export.
func TestOutputGateObserver(t *testing.T) {
	clk := clock.NewFake(time.Unix(1000, 0))
	g := newOutputGate(1, func([]byte) {}, nil, clk)
	g.SetFrameSink(func([]byte) {})
	var frameDelays, consDelays []time.Duration
	var perEpoch []int
	g.SetObserver(OutputObserver{
		Delay: func(frame bool, d time.Duration) {
			if frame {
				frameDelays = append(frameDelays, d)
			} else {
				consDelays = append(consDelays, d)
			}
		},
		EpochFrames: func(n int) { perEpoch = append(perEpoch, n) },
	})
	g.Hold(true)
	g.WriteFrame([]byte("f1a"))
	g.WriteFrame([]byte("f1b"))
	clk.Advance(3 * time.Millisecond)
	g.Write([]byte("c1"))
	g.Seal()
	g.Write([]byte("c2")) // epoch 2: console only
	g.Seal()
	g.WriteFrame([]byte("f3-1"))
	if n, b := g.HeldFrames(); n != 3 || b != 10 {
		t.Fatalf("held frames %d (%d bytes), want 3 (10)", n, b)
	}
	clk.Advance(7 * time.Millisecond)
	g.Release(3)
	if n, b := g.HeldFrames(); n != 0 || b != 0 {
		t.Fatalf("held frames %d (%d bytes) after the release, want none", n, b)
	}
	if want := []time.Duration{10 * time.Millisecond, 10 * time.Millisecond, 7 * time.Millisecond}; !slices.Equal(frameDelays, want) {
		t.Errorf("frame delays %v, want %v", frameDelays, want)
	}
	if want := []time.Duration{7 * time.Millisecond, 7 * time.Millisecond}; !slices.Equal(consDelays, want) {
		t.Errorf("console delays %v, want %v", consDelays, want)
	}
	if want := []int{2, 1}; !slices.Equal(perEpoch, want) {
		t.Errorf("frames per released epoch %v, want %v (epoch 2 held none)", perEpoch, want)
	}
	// A discarded frame is no longer held.
	g.WriteFrame([]byte("f4"))
	g.Discard()
	if n, _ := g.HeldFrames(); n != 0 {
		t.Fatalf("held frames %d after Discard", n)
	}
}
