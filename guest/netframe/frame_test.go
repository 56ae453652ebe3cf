package netframe

import (
	"bytes"
	"encoding/binary"
	"testing"
)

var (
	guestMAC  = MAC{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	guestIP   = IPv4{10, 77, 0, 10}
	clientMAC = MAC{0x52, 0x54, 0, 0xaa, 0xbb, 0xcc}
	clientIP  = IPv4{10, 77, 0, 2}
)

func newEndpoint() *Endpoint { return &Endpoint{MAC: guestMAC, IP: guestIP, Port: 7000} }

// clientDatagram is the frame a client sends: its IPv4 and UDP headers
// built independently of AppendIPv4/AppendUDP, with checksums from the
// RFC 1071 definition, so the parser is not checked only against itself.
func clientDatagram(data []byte, dstPort uint16) []byte {
	udpLen := 8 + len(data)
	f := make([]byte, 14+20+udpLen)
	copy(f[0:6], guestMAC[:])
	copy(f[6:12], clientMAC[:])
	f[12], f[13] = 0x08, 0x00
	ip := f[14:34]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+udpLen))
	binary.BigEndian.PutUint16(ip[4:], 0x1234)
	ip[8], ip[9] = 64, 17
	copy(ip[12:16], clientIP[:])
	copy(ip[16:20], guestIP[:])
	binary.BigEndian.PutUint16(ip[10:], rfc1071(ip))
	u := f[34:]
	binary.BigEndian.PutUint16(u[0:], 40000)
	binary.BigEndian.PutUint16(u[2:], dstPort)
	binary.BigEndian.PutUint16(u[4:], uint16(udpLen))
	copy(u[8:], data)
	pseudo := append(append(append([]byte{}, clientIP[:]...), guestIP[:]...), 0, 17, byte(udpLen>>8), byte(udpLen))
	binary.BigEndian.PutUint16(u[6:], rfc1071(append(pseudo, u...)))
	return f
}

// rfc1071 is the Internet checksum written out the slow, obvious way.
func rfc1071(b []byte) uint16 {
	var sum uint32
	for i := 0; i < len(b); i += 2 {
		w := uint32(b[i]) << 8
		if i+1 < len(b) {
			w |= uint32(b[i+1])
		}
		sum += w
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

func TestDatagramDelivered(t *testing.T) {
	e := newEndpoint()
	for _, data := range [][]byte{[]byte("c:1 SET k v\n"), []byte("odd"), {}} {
		out, d, from, ok := e.Input(clientDatagram(data, 7000), nil)
		if !ok || out != nil || !bytes.Equal(d, data) {
			t.Fatalf("datagram %q: ok %v out %x data %q", data, ok, out, d)
		}
		if from != (Peer{MAC: clientMAC, IP: clientIP, Port: 40000}) {
			t.Fatalf("from %+v", from)
		}
	}
	if e.Counters.Datagrams != 3 || e.Counters.DroppedTotal() != 0 {
		t.Fatalf("counters %+v", e.Counters)
	}
}

// A reply parses back, its checksums agree with the independent
// definition, and it is padded to the minimum frame.
func TestReplyRoundTrip(t *testing.T) {
	e := newEndpoint()
	to := Peer{MAC: clientMAC, IP: clientIP, Port: 40000}
	for _, data := range [][]byte{[]byte("c:1 OK\n"), bytes.Repeat([]byte{0xff}, MaxData), {}} {
		f, err := e.Reply(nil, to, data)
		if err != nil {
			t.Fatal(err)
		}
		if len(f) < MinFrame {
			t.Fatalf("frame of %d bytes, want >= %d", len(f), MinFrame)
		}
		eth, p, err := ParseEthernet(f)
		if err != nil || eth.Dst != clientMAC || eth.Src != guestMAC || eth.Type != EtherTypeIPv4 {
			t.Fatalf("ethernet %+v %v", eth, err)
		}
		if rfc1071(p[:20]) != 0 {
			t.Fatalf("IPv4 header checksum wrong: %x", p[:20])
		}
		ip, p, err := ParseIPv4(p)
		if err != nil || ip.Src != guestIP || ip.Dst != clientIP {
			t.Fatalf("ipv4 %+v %v", ip, err)
		}
		u, got, err := ParseUDP(ip, p)
		if err != nil || u.SrcPort != 7000 || u.DstPort != 40000 || !bytes.Equal(got, data) {
			t.Fatalf("udp %+v %q %v", u, got, err)
		}
	}
	if _, err := e.Reply(nil, to, make([]byte, MaxData+1)); err != ErrDataTooLong {
		t.Fatalf("oversized reply: %v", err)
	}
}

func TestARP(t *testing.T) {
	e := newEndpoint()
	req := AppendEthernet(nil, Ethernet{Dst: Broadcast, Src: clientMAC, Type: EtherTypeARP})
	req = AppendARP(req, ARP{Op: ARPRequest, SenderMAC: clientMAC, SenderIP: clientIP, TargetIP: guestIP})
	out, _, _, ok := e.Input(req, nil)
	if !ok || out == nil {
		t.Fatalf("ARP request for our address not answered")
	}
	eth, p, _ := ParseEthernet(out)
	a, err := ParseARP(p)
	if err != nil || eth.Dst != clientMAC || a.Op != ARPReply || a.SenderMAC != guestMAC || a.SenderIP != guestIP || a.TargetIP != clientIP || a.TargetMAC != clientMAC {
		t.Fatalf("ARP reply %+v %+v %v", eth, a, err)
	}
	other := AppendEthernet(nil, Ethernet{Dst: Broadcast, Src: clientMAC, Type: EtherTypeARP})
	other = AppendARP(other, ARP{Op: ARPRequest, SenderMAC: clientMAC, SenderIP: clientIP, TargetIP: IPv4{10, 77, 0, 99}})
	if out, _, _, ok := e.Input(other, nil); ok || out != nil || e.Counters.Dropped[DropNotOurs] != 1 {
		t.Fatalf("ARP for another address: ok %v, counters %+v", ok, e.Counters)
	}
	g := e.Announce(nil)
	eth, p, _ = ParseEthernet(g)
	a, err = ParseARP(p)
	if err != nil || eth.Dst != Broadcast || a.SenderIP != guestIP || a.TargetIP != guestIP || a.SenderMAC != guestMAC {
		t.Fatalf("gratuitous ARP %+v %+v %v", eth, a, err)
	}
}

// Every malformed frame is dropped under its reason, and the counts add up.
func TestDrops(t *testing.T) {
	good := clientDatagram([]byte("c:1 GET k\n"), 7000)
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := []struct {
		name   string
		frame  []byte
		reason int
	}{
		{"empty", nil, DropShort},
		{"ethernet only", good[:14], DropShort},
		{"short ipv4", good[:30], DropShort},
		{"jumbo", make([]byte, MaxFrame+1), DropTooLong},
		{"ip total too long", mut(func(b []byte) []byte { b[16] = 0xff; return b }), DropBadLength},
		{"ihl too small", mut(func(b []byte) []byte { b[14] = 0x44; return b }), DropBadLength},
		{"ip checksum", mut(func(b []byte) []byte { b[24] ^= 1; return b }), DropBadChecksum},
		{"udp checksum", mut(func(b []byte) []byte { b[len(b)-1] ^= 1; return b }), DropBadChecksum},
		{"udp length", mut(func(b []byte) []byte { b[38], b[39] = 0xff, 0xff; return b }), DropBadLength},
		{"more fragments", mut(func(b []byte) []byte { b[20] |= 0x20; fixIP(b); return b }), DropFragment},
		{"fragment offset", mut(func(b []byte) []byte { b[21] = 1; fixIP(b); return b }), DropFragment},
		{"tcp", mut(func(b []byte) []byte { b[23] = 6; fixIP(b); return b }), DropUnsupported},
		{"ipv6 ethertype", mut(func(b []byte) []byte { b[12], b[13] = 0x86, 0xdd; return b }), DropUnsupported},
		{"802.3 length", mut(func(b []byte) []byte { b[12], b[13] = 0x00, 0x40; return b }), DropUnsupported},
		{"other mac", mut(func(b []byte) []byte { b[0] = 0x02; return b }), DropNotOurs},
		{"other ip", mut(func(b []byte) []byte { b[33] = 11; fixIP(b); return b }), DropNotOurs},
		{"other port", clientDatagram([]byte("x"), 7001), DropNotOurs},
	}
	e := newEndpoint()
	for _, c := range cases {
		before := e.Counters.Dropped[c.reason]
		if out, d, _, ok := e.Input(c.frame, nil); ok || out != nil || d != nil {
			t.Errorf("%s: accepted", c.name)
		}
		if e.Counters.Dropped[c.reason] != before+1 {
			t.Errorf("%s: not counted as %s (counters %v)", c.name, DropNames[c.reason], e.Counters.Dropped)
		}
	}
	if e.Counters.Received != uint64(len(cases)) || e.Counters.DroppedTotal() != uint64(len(cases)) {
		t.Fatalf("counters %+v for %d frames", e.Counters, len(cases))
	}
}

// fixIP recomputes the IPv4 header checksum of a frame after a mutation.
func fixIP(f []byte) {
	ip := f[14:34]
	ip[10], ip[11] = 0, 0
	binary.BigEndian.PutUint16(ip[10:], rfc1071(ip))
}

func FuzzInput(f *testing.F) {
	f.Add(clientDatagram([]byte("c:1 SET k v\n"), 7000))
	arp := AppendEthernet(nil, Ethernet{Dst: Broadcast, Src: clientMAC, Type: EtherTypeARP})
	f.Add(AppendARP(arp, ARP{Op: ARPRequest, SenderMAC: clientMAC, SenderIP: clientIP, TargetIP: guestIP}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, frame []byte) {
		e := newEndpoint()
		out, d, _, ok := e.Input(frame, nil)
		c := e.Counters
		if c.Received != 1 || c.ARPReplies+c.Datagrams+c.DroppedTotal() != 1 {
			t.Fatalf("counts do not add up: %+v", c)
		}
		if ok != (out != nil || c.Datagrams == 1) || len(d) > len(frame) || len(out) > MaxFrame {
			t.Fatalf("ok %v out %d bytes data %d bytes of a %d-byte frame", ok, len(out), len(d), len(frame))
		}
	})
}
