package ft

import (
	"bytes"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
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
			t.Logf("primary port: received %d delivered %d sent %d send errors %d", np.net.received.Load(), np.net.delivered.Load(), np.net.sent.Load(), np.net.sendErrors())
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

// gratuitousARPs reads frames from watch until within has passed and
// returns when each ARP frame from announce's sender arrived.
func gratuitousARPs(t *testing.T, watch *tap.Device, announce []byte, within time.Duration) []time.Time {
	t.Helper()
	var got []time.Time
	buf := make([]byte, 2048)
	end := time.Now().Add(within)
	for time.Now().Before(end) {
		n, err := watch.ReadFrame(buf, end)
		if err != nil {
			continue // the deadline (the loop ends) or a frame too large
		}
		f := buf[:n]
		// Ethernet II, ARP, from the card's MAC, for the card's address.
		if n >= 42 && f[12] == 0x08 && f[13] == 0x06 && bytes.Equal(f[6:12], announce[6:12]) && bytes.Equal(f[38:42], announce[38:42]) {
			got = append(got, time.Now())
		}
	}
	return got
}

// The node that starts running the guest announces its address five
// times, at 0, 50, 200, 450 and 800 ms (one gratuitous ARP can be lost),
// seen by another device on the bridge; a node that stops running the
// guest stops announcing at once, and closing the port ends a schedule
// in progress (goleak checks that its goroutine was joined).
func TestAnnouncementsRepeated(t *testing.T) {
	l := netlab.New(t)
	gcfg := testGuestConfig
	gcfg.Net.IP = "10.77.0.10/24"
	g, err := synth.New(gcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	nic := guest.NICOf(g)
	p := newNetPort(openTap(t, l), quietLog())
	defer p.close()
	watch := openTap(t, l)
	defer watch.Close()
	frame := nic.Announce()

	p.attach(nic)
	t0 := time.Now()
	p.announce(nic)
	got := gratuitousARPs(t, watch, frame, 1500*time.Millisecond)
	if len(got) != announceCount {
		t.Fatalf("%d announcements reached the bridge, want %d", len(got), announceCount)
	}
	want := []time.Duration{0, 50 * time.Millisecond, 200 * time.Millisecond, 450 * time.Millisecond, 800 * time.Millisecond}
	for i, at := range got {
		// Late is allowed on a busy machine; early never.
		if d := at.Sub(t0); d < want[i]-5*time.Millisecond || d > want[i]+300*time.Millisecond {
			t.Errorf("announcement %d at %v, want about %v", i+1, d, want[i])
		}
	}
	if c := p.announcements.Load(); c != announceCount {
		t.Errorf("the port counted %d announcements, want %d", c, announceCount)
	}

	// Stopping to run the guest ends the schedule: what was sent before
	// the detach (at 120 ms: the ones at 0 and 50 ms, unless the machine
	// is slow) and not one announcement after attach(nil) returned.
	before := p.announcements.Load()
	p.announce(nic)
	time.Sleep(120 * time.Millisecond)
	p.attach(nil)
	atDetach := p.announcements.Load() - before
	got = gratuitousARPs(t, watch, frame, time.Second)
	sent := p.announcements.Load() - before
	if atDetach >= announceCount || sent != atDetach || uint64(len(got)) != sent {
		t.Fatalf("%d announcements sent before the node stopped running the guest 120 ms in, %d in all, %d seen on the bridge: want fewer than %d, none more, all seen",
			atDetach, sent, len(got), announceCount)
	}
	t.Logf("a schedule stopped 120 ms in sent %d announcements", sent)

	// Closing the port in the middle of a schedule joins it promptly.
	p.attach(nic)
	p.announce(nic)
	time.Sleep(60 * time.Millisecond)
	closed := time.Now()
	p.close()
	if d := time.Since(closed); d > 500*time.Millisecond {
		t.Fatalf("closing the port took %v with an announcement schedule running", d)
	}
}

// TestNoAnnouncementAfterDetach races a fresh schedule's first send
// against attach(nil), many times: once attach(nil) has returned, the
// count of announcements must not move (a late gratuitous ARP from a node
// that stopped running the guest points the bridge back at it).
func TestNoAnnouncementAfterDetach(t *testing.T) {
	l := netlab.New(t)
	gcfg := testGuestConfig
	gcfg.Net.IP = "10.77.0.10/24"
	g, err := synth.New(gcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	nic := guest.NICOf(g)
	p := newNetPort(openTap(t, l), quietLog())
	defer p.close()
	for i := 0; i < 300; i++ {
		p.attach(nic)
		p.announce(nic)
		if i%2 == 1 {
			runtime.Gosched() // let the schedule's goroutine reach its check
		}
		p.attach(nil)
		c := p.announcements.Load()
		time.Sleep(200 * time.Microsecond)
		if got := p.announcements.Load(); got != c {
			t.Fatalf("round %d: %d announcements after attach(nil) returned", i, got-c)
		}
	}
}

// The schedule's offsets from its start: 0, 50, 200, 450 and 800 ms
// (what docs/NETWORK.md promises; each send is timed from the start).
func TestAnnounceOffsets(t *testing.T) {
	want := []time.Duration{0, 50 * time.Millisecond, 200 * time.Millisecond, 450 * time.Millisecond, 800 * time.Millisecond}
	for i, w := range want {
		if got := announceOffset(i); got != w {
			t.Errorf("announcement %d at %v after the start, want %v", i+1, got, w)
		}
	}
}
