package kvm

import (
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/netframe"
)

func netKVConfig() guest.Config {
	c := kvConfig(64<<20, 1)
	c.Net = guest.Net{IP: "10.77.0.10/24"}
	return c
}

var nicClient = netframe.Peer{MAC: netframe.MAC{0x52, 0x54, 0, 0xaa, 0, 1}, IP: netframe.IPv4{10, 77, 0, 2}, Port: 40000}

// wire is the client's end of the card: it builds frames with its own
// Endpoint and collects what the guest sends.
type wire struct {
	mu     sync.Mutex
	frames [][]byte
	cli    netframe.Endpoint
	guest  netframe.Peer
}

func newWire(g *Guest) *wire {
	ep := g.nic.ep
	return &wire{cli: netframe.Endpoint{MAC: nicClient.MAC, IP: nicClient.IP, Port: nicClient.Port},
		guest: netframe.Peer{MAC: ep.MAC, IP: ep.IP, Port: ep.Port}}
}

func (w *wire) sink(f []byte) {
	w.mu.Lock()
	w.frames = append(w.frames, f)
	w.mu.Unlock()
}

func (w *wire) request(line string) []byte {
	f, _ := w.cli.Reply(nil, w.guest, []byte(line))
	return f
}

func (w *wire) arp(target netframe.IPv4) []byte {
	f := netframe.AppendEthernet(nil, netframe.Ethernet{Dst: netframe.Broadcast, Src: nicClient.MAC, Type: netframe.EtherTypeARP})
	return netframe.AppendARP(f, netframe.ARP{Op: netframe.ARPRequest, SenderMAC: nicClient.MAC, SenderIP: nicClient.IP, TargetIP: target})
}

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

func (w *wire) none(t *testing.T) {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.frames) != 0 {
		t.Fatalf("%d unexpected frames from the guest, the first %x", len(w.frames), w.frames[0])
	}
}

// udpReply parses a reply datagram to the client: its text and IPv4 ID.
func udpReply(t *testing.T, f []byte) (string, uint16) {
	t.Helper()
	cli := netframe.Endpoint{MAC: nicClient.MAC, IP: nicClient.IP, Port: nicClient.Port}
	_, data, _, ok := cli.Input(f, nil)
	if !ok || data == nil {
		t.Fatalf("guest frame is not a UDP reply to the client: %x (counters %+v)", f, cli.Counters)
	}
	return string(data), binary.BigEndian.Uint16(f[netframe.EthernetHeaderLen+4:])
}

func startNIC(t *testing.T, cfg guest.Config) (*Guest, *wire) {
	t.Helper()
	return startNICWith(t, cfg, DirtyGetLog)
}

func startNICWith(t *testing.T, cfg guest.Config, dirty DirtyMethod) (*Guest, *wire) {
	t.Helper()
	g, err := NewWithOptions(cfg, Options{DirtyMethod: dirty})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	w := newWire(g)
	g.NIC().SetTransmit(w.sink)
	mustResume(t, g)
	return g, w
}

// deliver hands f to the card and to ref, the reference stack the
// counters are compared with.
func deliver(t *testing.T, g *Guest, ref *netframe.Endpoint, f []byte) {
	t.Helper()
	if err := g.NIC().Deliver(f); err != nil {
		t.Fatal(err)
	}
	ref.Input(f, nil)
}

// The card answers ARP for its address, serves kv over UDP with the
// console's table and <client>:<seq> records, drops malformed frames under
// netframe's reasons, and counts exactly as netframe does.
func TestNICServesKVOverUDP(t *testing.T) {
	skipWithoutKVM(t)
	g, w := startNIC(t, netKVConfig())
	ref := &netframe.Endpoint{MAC: g.nic.ep.MAC, IP: g.nic.ep.IP, Port: g.nic.ep.Port}
	deliver(t, g, ref, w.arp(netframe.IPv4{10, 77, 0, 10}))
	_, p, _ := netframe.ParseEthernet(w.next(t))
	if a, err := netframe.ParseARP(p); err != nil || a.Op != netframe.ARPReply || a.SenderMAC != (netframe.MAC{0x52, 0x54, 0, 77, 0, 10}) || a.TargetMAC != nicClient.MAC {
		t.Fatalf("ARP reply %+v %v: want the MAC derived from the address, to the asker", a, err)
	}
	lr := newLineReader()
	g.Console().SetOutput(lr.sink)
	expect(t, ask(t, g, lr, "con:1 SET shared fromconsole"), "con:1 OK")
	var lastID uint16
	for _, c := range []struct{ req, want string }{
		{"c:1 SET k v", "c:1 OK\n"},
		{"c:2 GET k\r\n", "c:2 OK v\n"},
		{"c:2 SET k other", "c:2 OK v\n"}, // a retry of the last id: the recorded reply, no new write
		{"c:3 GET k", "c:3 OK v\n"},
		{"c:4 GET shared", "c:4 OK fromconsole\n"}, // one table for both paths
		{"garbage", "ERR missing <client>:<seq>\n"},
	} {
		deliver(t, g, ref, w.request(c.req))
		got, id := udpReply(t, w.next(t))
		if got != c.want || id != lastID+1 {
			t.Fatalf("%q: reply %q with IPv4 ID %d, want %q with %d", c.req, got, id, c.want, lastID+1)
		}
		lastID = id
	}
	expect(t, ask(t, g, lr, "c:4 SET k again"), "c:4 OK fromconsole") // the UDP client's record, seen from the console
	bad := w.request("c:5 GET k")
	bad[netframe.EthernetHeaderLen+netframe.IPv4HeaderLen+netframe.UDPHeaderLen] ^= 0xff
	frag := w.request("c:5 GET k")
	frag[netframe.EthernetHeaderLen+6] |= 0x20
	binary.BigEndian.PutUint16(frag[netframe.EthernetHeaderLen+10:], 0)
	binary.BigEndian.PutUint16(frag[netframe.EthernetHeaderLen+10:], netframe.Checksum(frag[netframe.EthernetHeaderLen:netframe.EthernetHeaderLen+20], 0))
	for _, f := range [][]byte{{1, 2, 3}, bad, frag, w.arp(netframe.IPv4{10, 77, 0, 99}), make([]byte, 1600), make([]byte, 9000), w.request("")} {
		deliver(t, g, ref, f)
	}
	deliver(t, g, ref, w.request("c:5 GET k"))
	if got, _ := udpReply(t, w.next(t)); got != "c:5 OK v\n" {
		t.Fatalf("after bad frames: %q", got)
	}
	w.none(t)
	c := g.NIC().Counters()
	ref.Counters.Sent = ref.Counters.ARPReplies + ref.Counters.Datagrams - 1 // Input builds ARP replies only; the empty datagram has no reply
	if c != ref.Counters {
		t.Fatalf("counters %+v, netframe counts %+v", c, ref.Counters)
	}
	for _, r := range []int{netframe.DropShort, netframe.DropBadChecksum, netframe.DropFragment, netframe.DropNotOurs, netframe.DropTooLong} {
		if c.Dropped[r] == 0 {
			t.Errorf("no %s drop counted: %+v", netframe.DropNames[r], c.Dropped)
		}
	}
}

// The card lives in guest memory: a guest rebuilt from a first full copy
// plus only the pages the dirty log reported since (as a secondary builds
// it) has the same table, records, counters, IPv4 ID and MAC, so Tandem's
// own ring writes were all in the log, with each dirty-log method.
func TestNICStateTravelsWithDirtyPages(t *testing.T) {
	skipWithoutKVM(t)
	for _, m := range []DirtyMethod{DirtyGetLog, DirtyManualClear, DirtyRing} {
		t.Run(m.String(), func(t *testing.T) { nicStateTravels(t, m) })
	}
}

func nicStateTravels(t *testing.T, method DirtyMethod) {
	cfg := netKVConfig()
	cfg.Net.MAC = "02:00:00:00:00:01"
	g, w := startNICWith(t, cfg, method)
	mustPause(t, g)
	replica := make([][]byte, len(g.Regions()))
	for i, r := range g.Regions() {
		replica[i] = append([]byte(nil), r.Mem...)
	}
	if _, err := g.SyncDirty(newWordLog()); err != nil {
		t.Fatal(err)
	}
	mustResume(t, g)
	for i, c := range []struct{ req, want string }{{"a:1 SET k v", "a:1 OK\n"}, {"b:1 SET k2 w", "b:1 OK\n"}, {"b:1 SET k2 w", "b:1 OK\n"},
		{"b:2 GET k2", "b:2 OK w\n"}} {
		if err := g.NIC().Deliver(w.request(c.req)); err != nil {
			t.Fatal(err)
		}
		if got, id := udpReply(t, w.next(t)); got != c.want || id != uint16(i+1) {
			t.Fatalf("%q: %q id %d", c.req, got, id)
		}
	}
	mustPause(t, g)
	// A frame Tandem put in the RX ring that the guest has not taken yet
	// (as the console poll's exit leaves it when a pause follows at once):
	// only the dirty log's record of Tandem's writes brings it across. It
	// lands in slot 4, a page the guest has not touched since the sync
	// (slots 0-3 are two per page), so KVM's own log cannot have it.
	if err := g.NIC().Deliver(w.request("a:2 GET k")); err != nil {
		t.Fatal(err)
	}
	g.nic.fill()
	log := newWordLog()
	if _, err := g.SyncDirty(log); err != nil {
		t.Fatal(err)
	}
	for i, r := range g.Regions() {
		for p := uint64(0); p < uint64(len(r.Mem))/guest.PageSize; p++ {
			if log.has(r.GPA/guest.PageSize + p) {
				copy(replica[i][p*guest.PageSize:(p+1)*guest.PageSize], r.Mem[p*guest.PageSize:])
			}
		}
	}
	before := g.NIC().Counters()
	st, err := g.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	g.Close()
	r := restoreMemory(t, cfg, replica, st)
	w2 := newWire(r)
	r.NIC().SetTransmit(w2.sink)
	mustResume(t, r)
	if got, id := udpReply(t, w2.next(t)); got != "a:2 OK v\n" || id != 5 {
		t.Fatalf("restored guest, the frame in its ring: %q id %d, want the value and IPv4 ID 5", got, id)
	}
	r.NIC().Deliver(w2.request("b:2 SET k2 changed"))
	if got, id := udpReply(t, w2.next(t)); got != "b:2 OK w\n" || id != 6 {
		t.Fatalf("restored guest, a retry: %q id %d, want the record and IPv4 ID 6", got, id)
	}
	r.NIC().Deliver(w2.request("a:3 GET k2"))
	if got, _ := udpReply(t, w2.next(t)); got != "a:3 OK w\n" {
		t.Fatalf("restored guest's table: %q", got)
	}
	if c := r.NIC().Counters(); c.Datagrams != before.Datagrams+3 || c.Received != before.Received+3 {
		t.Fatalf("restored counters %+v, before %+v", c, before)
	}
	if !isAnnounceFrom(r.NIC().Announce(), netframe.MAC{2, 0, 0, 0, 0, 1}) {
		t.Fatal("restored card announces another MAC")
	}
}

// restoreMemory builds a paused guest of cfg from mem and st.
func restoreMemory(t *testing.T, cfg guest.Config, mem [][]byte, st guest.MachineState) *Guest {
	t.Helper()
	r, err := NewEmpty(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	for i := range mem {
		copy(r.Regions()[i].Mem, mem[i])
	}
	if err := r.LoadState(st); err != nil {
		t.Fatal(err)
	}
	return r
}

func isAnnounceFrom(f []byte, mac netframe.MAC) bool {
	eth, p, err := netframe.ParseEthernet(f)
	if err != nil || eth.Dst != netframe.Broadcast {
		return false
	}
	a, err := netframe.ParseARP(p)
	return err == nil && a.SenderMAC == mac && a.SenderIP == a.TargetIP
}

// A state whose memory holds a card loads only into a guest with the same
// card, and one without a card only into a guest without one.
func TestNICStateRefusals(t *testing.T) {
	skipWithoutKVM(t)
	g, _ := startNIC(t, netKVConfig())
	mustPause(t, g)
	st, err := g.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	mem := [][]byte{g.Regions()[0].Mem}
	other := netKVConfig()
	other.Net.IP = "10.77.0.11/24"
	for _, cfg := range []guest.Config{kvConfig(64<<20, 1), other} {
		r, err := NewEmpty(cfg)
		if err != nil {
			t.Fatal(err)
		}
		copy(r.Regions()[0].Mem, mem[0])
		if err := r.LoadState(st); !errors.Is(err, guest.ErrState) {
			t.Errorf("card state into %+v: %v", cfg.Net, err)
		}
		r.Close()
	}
	plain, err := New(kvConfig(64<<20, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	pst, _ := plain.SaveState()
	r, err := NewEmpty(netKVConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	copy(r.Regions()[0].Mem, plain.Regions()[0].Mem)
	if err := r.LoadState(pst); !errors.Is(err, guest.ErrState) {
		t.Errorf("cardless state into a guest with a card: %v", err)
	}
}

// The host reads the TX ring from untrusted guest memory: indices far
// apart and lengths out of range are skipped and counted, never followed.
func TestNICTransmitBoundsGuestInput(t *testing.T) {
	skipWithoutKVM(t)
	g, err := New(netKVConfig()) // paused: the guest does not touch its ring
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	var sent [][]byte
	g.NIC().SetTransmit(func(f []byte) { sent = append(sent, f) })
	nd, _ := g.guestBytes(netGPA, guest.PageSize)
	le := binary.LittleEndian
	le.PutUint32(nd[ndTxLen:], 1<<31)               // slot 0: too long
	le.PutUint32(nd[ndTxLen+4:], 3)                 // slot 1: too short
	le.PutUint32(nd[ndTxLen+8:], netframe.MinFrame) // slot 2: fine
	g.nic.transmit(3)
	if len(sent) != 1 || len(sent[0]) != netframe.MinFrame || g.nic.badTx != 2 || le.Uint32(nd[ndTxCons:]) != 3 {
		t.Fatalf("sent %d frames, %d bad, cons %d", len(sent), g.nic.badTx, le.Uint32(nd[ndTxCons:]))
	}
	g.nic.transmit(3 + 1<<30) // a doorbell far past the ring
	if len(sent) != 1 || g.nic.badTx != 2+1<<30 || le.Uint32(nd[ndTxCons:]) != 3+1<<30 {
		t.Fatalf("runaway doorbell: sent %d, bad %d", len(sent), g.nic.badTx)
	}
	le.PutUint32(nd[ndRxCons:], 1<<20) // the guest claims to have taken frames never given
	for range NICQueueFrames {
		if err := g.NIC().Deliver(make([]byte, 60)); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.NIC().Deliver(make([]byte, 60)); err == nil || g.nic.QueueDrops() != 1 {
		t.Fatalf("a full queue took another frame: %v", err)
	}
	g.nic.fill() // a corrupt ring counts as full: nothing written
	if le.Uint32(nd[ndRxProd:]) != 0 || !g.nic.hasPending() {
		t.Fatal("frames written into a ring the guest corrupted")
	}
}

// After Close the card still answers from what it kept (guest memory is
// unmapped): the configured address, the last counters.
func TestNICAfterClose(t *testing.T) {
	skipWithoutKVM(t)
	g, w := startNIC(t, netKVConfig())
	nic := g.NIC()
	nic.Deliver(w.request("c:1 SET k v"))
	udpReply(t, w.next(t))
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if c := nic.Counters(); c.Datagrams != 1 {
		t.Fatalf("counters after close %+v", c)
	}
	if !isAnnounceFrom(nic.Announce(), netframe.MAC{0x52, 0x54, 0, 77, 0, 10}) {
		t.Fatal("no announcement after close")
	}
	if err := nic.Deliver(w.request("c:2 GET k")); !errors.Is(err, guest.ErrClosed) {
		t.Fatalf("deliver after close: %v", err)
	}
}
