package test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
	"github.com/tandemvm/tandem/internal/netlab"
)

// The guest on a real network: a raft trio of real processes whose
// nodes' TAP devices sit on one bridge with a client namespace. The
// client writes kv over UDP to the guest's address, retrying each
// request with the same id until it is answered; the primary is killed
// with SIGKILL; the secondary takes over and announces the address; the
// client goes on at the same address, and every write it saw
// acknowledged is there. It runs on both guests.
func TestGuestNetworkTrioFailover(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		l, tr := netTrio(t, kind)
		tr.startAll()
		tr.waitProtected("a", "b", 30*time.Second)

		c := l.DialUDP(guestNetAddr + ":7000")
		ld := startUDPLoad(t, c, 0)
		ld.waitAcked(100, 20*time.Second)
		// Kill a protected primary: a stall of this shared machine can
		// expire a's lease, and a primary that came back unprotected
		// acknowledges writes no secondary has (a double failure when it
		// dies then, not this test's case). Checked just before the kill.
		tr.waitProtected("a", "b", 20*time.Second)
		before := ld.Count()
		killed := time.Now()
		tr.m["a"].n.kill()
		ld.waitAcked(before+1, 20*time.Second)
		rto := ld.FirstAckAfter(killed).Sub(killed)
		ld.waitAcked(before+100, 20*time.Second)
		ld.finish()
		tr.waitMember("b", 10*time.Second, "primary", func(s trioStatus) bool { return s.Role == "primary" })

		lost := checkUDPAcked(t, c, ld, "check")
		t.Logf("%s: %d writes acknowledged over UDP (%d before the kill), %d lost; first reply at the same address %v after SIGKILL", kind, ld.Count(), before, lost, rto)
	})
}

// guestNetAddr is the guest's address on a test's lab network.
const guestNetAddr = "10.77.0.10"

// netTrio is a test trio on a fresh lab network: a boots the guest with
// its card at guestNetAddr, and a and b each have a TAP of their own on
// the lab's bridge.
func netTrio(t *testing.T, kind string) (*netlab.Lab, *testTrio) {
	l := netlab.New(t)
	tr := newTestTrio(t, kind)
	tr.m["a"].Extra = []string{"--guest-ip", guestNetAddr + "/24", "--net", "tap:" + l.TapName() + ",bridge=" + l.Bridge}
	tr.m["b"].Extra = []string{"--net", "tap:" + l.TapName() + ",bridge=" + l.Bridge}
	return l, tr
}

// udpLoad is e2e.UDPLoad for a test: stopped by the test's cleanup if
// finish was not called.
type udpLoad struct {
	*e2e.UDPLoad
	t *testing.T
}

// startUDPLoad writes k1, k2, ... over c, each resent with its id every
// retry (0: 50 ms) until answered (given up after 20 s).
func startUDPLoad(t *testing.T, c *net.UDPConn, retry time.Duration) *udpLoad {
	ld := &udpLoad{e2e.StartUDPLoad(context.Background(), &e2e.UDPKV{Conn: c, Retry: retry}, 20*time.Second), t}
	t.Cleanup(func() { ld.Stop() })
	return ld
}

// finish stops the writer and fails the test if it failed.
func (ld *udpLoad) finish() {
	ld.t.Helper()
	if err := ld.Stop(); err != nil {
		ld.t.Fatal(err)
	}
}

// waitAcked waits until n writes were acknowledged.
func (ld *udpLoad) waitAcked(n int, within time.Duration) {
	ld.t.Helper()
	deadline := time.Now().Add(within)
	for ld.Count() < n {
		if time.Now().After(deadline) {
			ld.t.Fatalf("%d writes acknowledged after %v, want %d (the writer's error: %v)", ld.Count(), within, n, ld.Stop())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkUDPAcked reads back, over c as kv client id, every write ld saw
// acknowledged: each must hold the value written. It returns how many
// did not (each an error of t).
func checkUDPAcked(t *testing.T, c *net.UDPConn, ld *udpLoad, id string) (lost int) {
	t.Helper()
	r := &e2e.UDPKV{Conn: c, Client: id}
	for _, k := range ld.Keys() {
		got, err := r.Do(context.Background(), fmt.Sprintf("GET %s", k), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got != "OK v"+strings.TrimPrefix(k, "k") {
			lost++
			if lost <= 5 {
				t.Errorf("acknowledged write %s: now %q", k, got)
			}
		}
	}
	if lost > 5 {
		t.Errorf("... %d acknowledged writes lost in all", lost)
	}
	return lost
}
