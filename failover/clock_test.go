package failover

import (
	"net"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/clock"
)

// Output delays are measured on the gate's clock: on a fake one they are
// exact, with no sleeping.
func TestOutputGateDelaysOnFakeClock(t *testing.T) {
	clk := clock.NewFake(time.Time{})
	g := newOutputGate(1, func([]byte) {}, nil, clk)
	g.Write([]byte("a")) // epoch 1, at +0
	clk.Advance(7 * time.Millisecond)
	g.Write([]byte("b")) // epoch 1, at +7ms
	g.Seal()
	clk.Advance(3 * time.Millisecond)
	g.Write([]byte("c")) // epoch 2, at +10ms
	g.Release(1)         // at +10ms
	clk.Advance(25 * time.Millisecond)
	g.Seal()
	g.Release(2) // at +35ms
	want := []time.Duration{10 * time.Millisecond, 3 * time.Millisecond, 25 * time.Millisecond}
	got := g.Delays()
	if len(got) != len(want) {
		t.Fatalf("delays %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("delays %v, want %v", got, want)
		}
	}
}

// The join back-off doubles from 200 ms to a 5 s cap, on the loop's
// clock: with a fake one each retry happens exactly when the back-off
// ends, not a millisecond before, and the test never sleeps.
func TestEpochsJoinBackOffOnFakeClock(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepts := make(chan struct{}, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close() // the join fails at its handshake
			accepts <- struct{}{}
		}
	}()
	awaitJoin := func(n int) {
		t.Helper()
		select {
		case <-accepts:
		case <-time.After(10 * time.Second):
			t.Fatalf("join attempt %d never came", n)
		}
	}
	clk := clock.NewFake(time.Time{})
	loop, _ := startTrustLoop(t, EpochConfig{Clock: clk, Release: func([]byte) {}})
	loop.SetSecondary(ln.Addr().String())
	awaitJoin(1)
	ms := time.Millisecond
	for i, d := range []time.Duration{200 * ms, 400 * ms, 800 * ms, 1600 * ms, 3200 * ms, 5000 * ms, 5000 * ms} {
		// The back-off's timer and its 200 ms release ticker.
		clk.BlockUntil(2)
		if n := clk.Waiters(); n != 2 {
			t.Fatalf("back-off %d: %d timers armed, want 2", i+1, n)
		}
		clk.Advance(d - ms)
		if n := clk.Waiters(); n != 2 {
			t.Fatalf("back-off %d (%v) ended %v early", i+1, d, ms)
		}
		select {
		case <-accepts:
			t.Fatalf("join %d came before its %v back-off ended", i+2, d)
		default:
		}
		clk.Advance(ms)
		awaitJoin(i + 2)
	}
	if st := loop.Status(); st.Protected || st.Joins != 8 {
		t.Fatalf("status after failed joins: %+v", st)
	}
}

// The delay samples are a ring: once full, each release replaces the
// oldest sample, and the newest are always kept.
func TestOutputGateDelaysKeepTheNewest(t *testing.T) {
	clk := clock.NewFake(time.Unix(0, 0))
	g := newOutputGate(1, func([]byte) {}, nil, clk)
	for i := 1; i <= maxDelaySamples+3; i++ {
		g.Write([]byte("x"))
		g.Seal()
		clk.Advance(time.Duration(i) * time.Microsecond)
		g.Release(uint64(i))
	}
	got := g.Delays()
	if len(got) != maxDelaySamples {
		t.Fatalf("%d samples kept, want %d", len(got), maxDelaySamples)
	}
	seen := map[time.Duration]bool{}
	for _, d := range got {
		seen[d] = true
	}
	for i := maxDelaySamples + 1; i <= maxDelaySamples+3; i++ {
		if !seen[time.Duration(i)*time.Microsecond] {
			t.Fatalf("the delay of release %d is not kept", i)
		}
	}
	for i := 1; i <= 3; i++ {
		if seen[time.Duration(i)*time.Microsecond] {
			t.Fatalf("the delay of release %d, among the oldest, is still kept", i)
		}
	}
}
