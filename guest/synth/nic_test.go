package synth

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/netframe"
)

func netConfig() guest.Config {
	c := kvConfig()
	c.Net = guest.Net{IP: "10.77.0.10/24"}
	return c
}

var client = netframe.Peer{MAC: netframe.MAC{0x52, 0x54, 0, 0xaa, 0, 1}, IP: netframe.IPv4{10, 77, 0, 2}, Port: 40000}

// wire is the other end of the card: it builds the client's frames with
// its own Endpoint and parses what the guest sends.
type wire struct {
	mu     sync.Mutex
	frames [][]byte
	cli    netframe.Endpoint
}

func (w *wire) sink(f []byte) {
	w.mu.Lock()
	w.frames = append(w.frames, append([]byte(nil), f...))
	w.mu.Unlock()
}

// request is the frame carrying line from the client to the guest.
func (w *wire) request(g *Guest, line string) []byte {
	// The vCPU updates the card's counters as frames arrive: take the
	// address under the card's lock.
	g.nic.mu.Lock()
	ep := g.nic.ep
	g.nic.mu.Unlock()
	f, _ := w.cli.Reply(nil, netframe.Peer{MAC: ep.MAC, IP: ep.IP, Port: ep.Port}, []byte(line))
	return f
}

// next waits for the guest's next frame.
func (w *wire) next(t *testing.T) []byte {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		w.mu.Lock()
		if len(w.frames) > 0 {
			f := w.frames[0]
			w.frames = w.frames[1:]
			w.mu.Unlock()
			return f
		}
		w.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
	t.Fatal("no frame from the guest within 5s")
	return nil
}

// replyText parses a UDP reply frame addressed to the client.
func replyText(t *testing.T, f []byte) string {
	t.Helper()
	cli := netframe.Endpoint{MAC: client.MAC, IP: client.IP, Port: client.Port}
	_, data, _, ok := cli.Input(f, nil)
	if !ok || data == nil {
		t.Fatalf("guest frame is not a UDP reply to the client: %x (counters %+v)", f, cli.Counters)
	}
	return string(data)
}

func startNet(t *testing.T, cfg guest.Config) (*Guest, *wire) {
	g := mustNew(t, cfg)
	w := &wire{cli: netframe.Endpoint{MAC: client.MAC, IP: client.IP, Port: client.Port}}
	g.NIC().SetTransmit(w.sink)
	mustResume(t, g)
	return g, w
}

func TestNICServesKVOverUDP(t *testing.T) {
	g, w := startNet(t, netConfig())
	// ARP first, as a client would.
	arp := netframe.AppendEthernet(nil, netframe.Ethernet{Dst: netframe.Broadcast, Src: client.MAC, Type: netframe.EtherTypeARP})
	arp = netframe.AppendARP(arp, netframe.ARP{Op: netframe.ARPRequest, SenderMAC: client.MAC, SenderIP: client.IP, TargetIP: netframe.IPv4{10, 77, 0, 10}})
	if err := g.NIC().Deliver(arp); err != nil {
		t.Fatal(err)
	}
	_, p, _ := netframe.ParseEthernet(w.next(t))
	if a, err := netframe.ParseARP(p); err != nil || a.Op != netframe.ARPReply || a.SenderMAC != (netframe.MAC{0x52, 0x54, 0, 77, 0, 10}) {
		t.Fatalf("ARP reply %+v %v: want the MAC derived from the address", a, err)
	}
	for _, c := range []struct{ req, want string }{
		{"c:1 SET k v", "c:1 OK\n"},
		{"c:2 GET k\n", "c:2 OK v\n"},
		{"c:2 SET k other", "c:2 OK v\n"}, // a retry of the last id: the recorded reply, no new write
		{"c:3 GET k", "c:3 OK v\n"},
	} {
		if err := g.NIC().Deliver(w.request(g, c.req)); err != nil {
			t.Fatal(err)
		}
		if got := replyText(t, w.next(t)); got != c.want {
			t.Fatalf("%q: reply %q, want %q", c.req, got, c.want)
		}
	}
	// Malformed frames are dropped and counted, never answered.
	g.NIC().Deliver([]byte{1, 2, 3})
	bad := w.request(g, "c:4 GET k")
	bad[netframe.EthernetHeaderLen+netframe.IPv4HeaderLen+netframe.UDPHeaderLen] ^= 0xff // the first data byte (the end may be padding)
	g.NIC().Deliver(bad)
	g.NIC().Deliver(w.request(g, "c:5 GET k"))
	if got := replyText(t, w.next(t)); got != "c:5 OK v\n" {
		t.Fatalf("after bad frames: %q", got)
	}
	c := g.NIC().Counters()
	if c.Dropped[netframe.DropShort] != 1 || c.Dropped[netframe.DropBadChecksum] != 1 || c.Datagrams != 5 || c.ARPReplies != 1 {
		t.Fatalf("counters %+v", c)
	}
}

// The card's state (address, counters, queued frames) travels with the
// guest: a restored guest answers a request queued before the capture,
// with the same table.
func TestNICStateRestores(t *testing.T) {
	cfg := netConfig()
	cfg.Net.MAC = "02:00:00:00:00:01"
	g, w := startNet(t, cfg)
	g.NIC().Deliver(w.request(g, "c:1 SET k v"))
	replyText(t, w.next(t))
	mustPause(t, g)
	g.NIC().Deliver(w.request(g, "c:2 GET k")) // queued while paused
	img := capture(t, g)
	g.Close()

	r := img.restore(t, cfg)
	w2 := &wire{cli: w.cli}
	r.NIC().SetTransmit(w2.sink)
	mustResume(t, r)
	if got := replyText(t, w2.next(t)); got != "c:2 OK v\n" {
		t.Fatalf("queued request after restore: %q", got)
	}
	if c := r.NIC().Counters(); c.Datagrams != 2 || c.Received != 2 {
		t.Fatalf("restored counters %+v", c)
	}
	if !isAnnounceFrom(r.NIC().Announce(), netframe.MAC{2, 0, 0, 0, 0, 1}) {
		t.Fatal("restored card announces another MAC")
	}

	// A guest without a card refuses the state; so does one at another address.
	if _, err := Restore(kvConfig(), func([]guest.Region) error { return nil }, img.state); !errors.Is(err, guest.ErrState) {
		t.Fatalf("state with a card into a guest without one: %v", err)
	}
	other := netConfig()
	other.Net.IP = "10.77.0.11/24"
	if _, err := Restore(other, func([]guest.Region) error { return nil }, img.state); !errors.Is(err, guest.ErrState) {
		t.Fatalf("state of another address: %v", err)
	}
}

func isAnnounceFrom(f []byte, mac netframe.MAC) bool {
	eth, p, err := netframe.ParseEthernet(f)
	if err != nil || eth.Dst != netframe.Broadcast {
		return false
	}
	a, err := netframe.ParseARP(p)
	return err == nil && a.SenderMAC == mac && a.SenderIP == a.TargetIP
}

func TestNICQueueBounded(t *testing.T) {
	g := mustNew(t, netConfig()) // paused: nothing is served
	f := make([]byte, 60)
	for i := range NICQueueFrames {
		if err := g.NIC().Deliver(f); err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
	}
	if err := g.NIC().Deliver(f); err == nil {
		t.Fatal("a full queue took another frame")
	}
	if g.nic.QueueDrops() != 1 {
		t.Fatalf("queue drops %d", g.nic.QueueDrops())
	}
}

func TestNetConfigRefusals(t *testing.T) {
	for _, n := range []guest.Net{
		{IP: "10.0.0.10"}, {IP: "10.0.0.0/24"}, {IP: "127.0.0.5/8"}, {IP: "fe80::1/64"}, {IP: "10.0.0.10/24", MAC: "01:00:00:00:00:01"},
		{IP: "10.0.0.10/24", MAC: "zz:00:00:00:00:01"}, {IP: "10.0.0.10/24", MAC: "00:00:00:00:00"}, {MAC: "02:00:00:00:00:01"},
	} {
		c := kvConfig()
		c.Net = n
		if err := c.Validate(); !errors.Is(err, guest.ErrConfig) {
			t.Errorf("%+v: %v", n, err)
		}
	}
	c := netConfig()
	c.Workload = guest.Workload{Kind: guest.WorkloadDirty, Pattern: guest.PatternSeq}
	if err := c.Validate(); err == nil {
		t.Error("a card on the dirty workload")
	}
}
