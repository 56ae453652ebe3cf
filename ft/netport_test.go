package ft

import (
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/netlab"
	"github.com/tandemvm/tandem/internal/tap"
	"github.com/tandemvm/tandem/replica"
)

// udpKV sends req until a reply comes (the first try may wait for ARP,
// or for a failover) and returns it with the time it took.
func udpKV(t *testing.T, c *net.UDPConn, req string, within time.Duration) (string, time.Duration) {
	t.Helper()
	t0 := time.Now()
	buf := make([]byte, 2048)
	for time.Since(t0) < within {
		c.Write([]byte(req))
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		for {
			n, err := c.Read(buf)
			if err != nil {
				break
			}
			// A late reply to an earlier try of another request is
			// skipped: replies carry their request's id.
			id, _, _ := strings.Cut(req, " ")
			if got := string(buf[:n]); strings.HasPrefix(got, id+" ") {
				return got, time.Since(t0)
			}
		}
	}
	t.Fatalf("no reply to %q within %v", req, within)
	return "", 0
}

func openTap(t testing.TB, l *netlab.Lab) *tap.Device {
	t.Helper()
	d, err := tap.Open(tap.Spec{Name: l.TapName(), Bridge: l.Bridge})
	if err != nil {
		t.Fatal(err)
	}
	return d // the node owns it from NewNode on
}

// A protected pair on a real bridge: a client in its own namespace talks
// kv over UDP to the guest's address; the reply frames leave through the
// primary's output gate; the primary dies, the secondary is activated and
// announces the address, and the client, retrying with the same id to
// the same address, gets its answer from the guest's committed state.
// It runs on both guests (kvm where /dev/kvm and the image are there).
func TestPairGuestNetworkFailover(t *testing.T) {
	kinds := []string{synth.Kind}
	if kvm.Available() == nil {
		if _, err := kvm.DefaultImage(); err == nil {
			kinds = append(kinds, kvm.Kind)
		}
	}
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) { pairGuestNetworkFailover(t, kind) })
	}
}

func pairGuestNetworkFailover(t *testing.T, kind string) {
	l := netlab.New(t)
	gcfg := testGuestConfig
	if kind == kvm.Kind {
		gcfg.Memory = kvm.MinMemory
	}
	gcfg.Net.IP = "10.77.0.10/24"
	sec, ns := startMember(t, "secondary", memberOpts{coord: NewPairSecondary(""), data: true, net: openTap(t, l)})
	pc := NewPairPrimary(sec.cfg.Data.Addr().String(), "")
	pri, np := startMember(t, "primary", memberOpts{coord: pc, boot: &bootCounter{cfg: &gcfg, kind: kind}, fresh: true, net: openTap(t, l)})
	eventually(t, "pair protected", func() bool {
		loop := pri.currentLoop()
		return loop != nil && loop.Status().Protected
	})
	c := l.DialUDP("10.77.0.10:7000")
	t.Cleanup(func() {
		if t.Failed() && np.net != nil {
			t.Logf("primary port: received %d delivered %d sent %d send errors %d", np.net.received.Load(), np.net.delivered.Load(), np.net.sent.Load(), np.net.sendErrors.Load())
			if nic := np.net.nic.Load(); nic != nil {
				t.Logf("primary card: %+v", (*nic).Counters())
			}
		}
	})
	got, took := udpKV(t, c, "c:1 SET k v", 5*time.Second)
	if got != "c:1 OK\n" {
		t.Fatalf("SET over UDP: %q", got)
	}
	t.Logf("first protected reply over UDP after %v", took)
	if f := pri.currentLoop().Gate().Frames(); f == 0 {
		t.Fatal("the reply did not go through the primary's output gate")
	}
	// Output commit: with every acknowledgement held back 300 ms, no
	// reply frame reaches the client sooner.
	disable := replica.FPBeforeAck.Enable(func() error { time.Sleep(300 * time.Millisecond); return nil })
	_, took = udpKV(t, c, "c:2 SET k2 v2", 10*time.Second)
	disable()
	if took < 290*time.Millisecond {
		t.Fatalf("a reply arrived %v after its request while acknowledgements took 300 ms: it left before its epoch was safe", took)
	}
	t.Logf("with acknowledgements delayed 300 ms the reply took %v", took)
	for i := 3; i < 20; i++ {
		req := "c:" + strconv.Itoa(i) + " SET k" + strconv.Itoa(i) + " v" + strconv.Itoa(i)
		if got, _ := udpKV(t, c, req, 5*time.Second); got != "c:"+strconv.Itoa(i)+" OK\n" {
			t.Fatalf("%s: %q", req, got)
		}
	}

	// Status shows the network as the primary sees it.
	st := np.status(false)
	if n := st.Net; n == nil || n.Tap == "" || n.GuestIP != "10.77.0.10/24" || n.Datagrams < 19 || n.FramesReleased == nil ||
		*n.FramesReleased < 19 || n.FramesSent < *n.FramesReleased || n.FramesDelivered < 19 {
		t.Fatalf("the primary's status of the guest network: %+v", st.Net)
	}
	t.Logf("primary's net status: %+v (released %d)", *st.Net, *st.Net.FramesReleased)

	// The primary dies: its node and member stop (the TAP goes with it).
	killed := time.Now()
	pri.Stop()
	np.Close()
	eventually(t, "secondary activates", func() bool {
		return postActivate(sec, `{"force": true}`).Code == http.StatusOK
	})
	got, _ = udpKV(t, c, "c:20 GET k19", 10*time.Second)
	if got != "c:20 OK v19\n" {
		t.Fatalf("after the failover: %q", got)
	}
	t.Logf("first reply at the same address %v after the primary stopped", time.Since(killed))
	if ns.net.sent.Load() == 0 {
		t.Fatal("the answer did not come through the new primary's TAP")
	}
}
