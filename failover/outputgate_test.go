package failover

import (
	"bytes"
	"sync"
	"testing"
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
