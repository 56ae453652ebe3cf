//go:build cgo

package netfuzz

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/tandemvm/tandem/guest/netframe"
)

var (
	guestMAC = netframe.MAC{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	guestIP  = netframe.IPv4{10, 77, 0, 10}
	client   = netframe.Peer{MAC: netframe.MAC{0x52, 0x54, 0, 0xaa, 0xbb, 0xcc}, IP: netframe.IPv4{10, 77, 0, 2}, Port: 40000}
)

const port = 7000

// reference is what a guest running netframe answers to frame, with the
// harness's kv service (net_serve in netfuzz.go): "R", the request, a
// newline, cut to one datagram.
func reference(ep *netframe.Endpoint, frame []byte) []byte {
	out, data, from, ok := ep.Input(frame, nil)
	if out != nil || !ok || data == nil {
		return out
	}
	data = bytes.TrimSuffix(bytes.TrimSuffix(data, []byte("\n")), []byte("\r"))
	if len(data) == 0 {
		return nil
	}
	reply := append(append([]byte("R"), data...), '\n')
	f, err := ep.Reply(nil, from, reply[:min(len(reply), netframe.MaxData)])
	if err != nil {
		panic(err)
	}
	return f
}

// differ runs frames through net.c and through netframe, one card each,
// and reports the first difference in reply, counters or IPv4 ID.
func differ(t *testing.T, frames ...[]byte) {
	t.Helper()
	d := NewDev(guestMAC, guestIP, port)
	ep := &netframe.Endpoint{MAC: guestMAC, IP: guestIP, Port: port}
	for i, f := range frames {
		got, want := d.Input(f), reference(ep, f)
		if !bytes.Equal(got, want) {
			t.Fatalf("frame %d (%x): net.c replies %x, netframe %x", i, f, got, want)
		}
	}
	if got, want := d.Counters(), ep.Counters; got != want {
		t.Fatalf("net.c counts %+v, netframe %+v", got, want)
	}
	if d.NextID() != ep.NextID() {
		t.Fatalf("IPv4 ID: net.c %d, netframe %d", d.NextID(), ep.NextID())
	}
}

// datagram is a client's request frame; its headers are netframe's.
func datagram(data string, dstPort uint16) []byte {
	cli := netframe.Endpoint{MAC: client.MAC, IP: client.IP, Port: client.Port}
	f, _ := cli.Reply(nil, netframe.Peer{MAC: guestMAC, IP: guestIP, Port: dstPort}, []byte(data))
	return f
}

func arpFor(target netframe.IPv4, op uint16) []byte {
	f := netframe.AppendEthernet(nil, netframe.Ethernet{Dst: netframe.Broadcast, Src: client.MAC, Type: netframe.EtherTypeARP})
	return netframe.AppendARP(f, netframe.ARP{Op: op, SenderMAC: client.MAC, SenderIP: client.IP, TargetIP: target})
}

// fixSums recomputes a frame's IPv4 header and UDP checksums where its
// lengths allow, so mutations reach the checks past them.
func fixSums(f []byte) {
	if len(f) < 34 || binary.BigEndian.Uint16(f[12:]) != uint16(netframe.EtherTypeIPv4) {
		return
	}
	ip := f[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ihl < 20 || ihl > len(ip) {
		return
	}
	ip[10], ip[11] = 0, 0
	binary.BigEndian.PutUint16(ip[10:], netframe.Checksum(ip[:ihl], 0))
	total := int(binary.BigEndian.Uint16(ip[2:]))
	if total < ihl+8 || total > len(ip) {
		return
	}
	u := ip[ihl:total]
	n := int(binary.BigEndian.Uint16(u[4:]))
	if n < 8 || n > len(u) || binary.BigEndian.Uint16(u[6:]) == 0 {
		return
	}
	u[6], u[7] = 0, 0
	pseudo := append(append(append([]byte{}, ip[12:20]...), 0, 17), byte(n>>8), byte(n))
	s := netframe.Checksum(append(pseudo, u[:n]...), 0)
	if s == 0 {
		s = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], s)
}

// malformed are frames every guest must drop, with the reason, and the
// good frames they are made from; they seed the fuzzer too.
func malformed() map[string][]byte {
	good := datagram("c:1 GET k\n", port)
	mut := func(fix bool, f func(b []byte)) []byte {
		b := append([]byte(nil), good...)
		f(b)
		if fix {
			fixSums(b)
		}
		return b
	}
	return map[string][]byte{
		"good":              good,
		"good crlf":         datagram("c:1 SET k v\r\n", port),
		"empty datagram":    datagram("", port),
		"newline only":      datagram("\n", port),
		"longest":           datagram(string(bytes.Repeat([]byte("x"), netframe.MaxData)), port),
		"arp":               arpFor(guestIP, netframe.ARPRequest),
		"arp other ip":      arpFor(netframe.IPv4{10, 77, 0, 99}, netframe.ARPRequest),
		"arp reply":         arpFor(guestIP, netframe.ARPReply),
		"arp op 3":          arpFor(guestIP, 3),
		"arp short":         arpFor(guestIP, netframe.ARPRequest)[:14+27],
		"empty":             {},
		"ethernet only":     good[:14],
		"short ipv4":        good[:30],
		"jumbo":             make([]byte, netframe.MaxFrame+1),
		"ip total too long": mut(false, func(b []byte) { b[16] = 0xff }),
		"ihl too small":     mut(false, func(b []byte) { b[14] = 0x44 }),
		"ihl too big":       mut(true, func(b []byte) { b[14] = 0x4f }),
		"ip options":        mut(true, func(b []byte) { b[14] = 0x46 }),
		"ip checksum":       mut(false, func(b []byte) { b[24] ^= 1 }),
		"udp checksum":      mut(false, func(b []byte) { b[len(b)-1] ^= 1 }),
		"udp no checksum":   mut(false, func(b []byte) { b[40], b[41] = 0, 0 }),
		"udp length":        mut(false, func(b []byte) { b[38], b[39] = 0xff, 0xff }),
		"udp length 7":      mut(true, func(b []byte) { b[38], b[39] = 0, 7 }),
		"more fragments":    mut(true, func(b []byte) { b[20] |= 0x20 }),
		"fragment offset":   mut(true, func(b []byte) { b[21] = 1 }),
		"tcp":               mut(true, func(b []byte) { b[23] = 6 }),
		"ipv6 version":      mut(true, func(b []byte) { b[14] = 0x65 }),
		"ipv6 ethertype":    mut(false, func(b []byte) { b[12], b[13] = 0x86, 0xdd }),
		"802.3 length":      mut(false, func(b []byte) { b[12], b[13] = 0x00, 0x40 }),
		"other mac":         mut(false, func(b []byte) { b[0] = 0x02 }),
		"broadcast mac":     mut(false, func(b []byte) { copy(b, netframe.Broadcast[:]) }),
		"other ip":          mut(true, func(b []byte) { b[33] = 11 }),
		"other port":        datagram("x", port+1),
	}
}

// Each malformed frame alone, then all in one card, reply and counters
// alike on both stacks, and every drop reason is reached.
func TestDifferentialMalformed(t *testing.T) {
	cases := malformed()
	var all [][]byte
	for name, f := range cases {
		t.Run(name, func(t *testing.T) { differ(t, f) })
		all = append(all, f)
	}
	differ(t, all...)
	d := NewDev(guestMAC, guestIP, port)
	for _, f := range all {
		d.Input(f)
	}
	for r, n := range d.Counters().Dropped {
		if n == 0 {
			t.Errorf("no case is dropped as %s", netframe.DropNames[r])
		}
	}
}

func FuzzDifferential(f *testing.F) {
	for _, frame := range malformed() {
		f.Add(frame, false)
		f.Add(frame, true)
	}
	f.Fuzz(func(t *testing.T, frame []byte, fix bool) {
		if fix {
			fixSums(frame)
		}
		differ(t, frame)
	})
}

// net_poll over a full RX ring, with the indices near 2^32 so they wrap
// mid-batch: every frame is taken in order, the replies are exactly the
// reference's, sent at one doorbell, and the indices end where they must.
func TestPollRing(t *testing.T) {
	var frames [][]byte
	for i := range 32 {
		switch i % 4 {
		case 0:
			frames = append(frames, arpFor(guestIP, netframe.ARPRequest))
		case 1:
			frames = append(frames, make([]byte, 9000)) // too long: the VMM copied nothing
		default:
			frames = append(frames, datagram(fmt.Sprintf("c:%d GET k", i), port))
		}
	}
	for _, start := range []uint32{0, 0xfffffff0} {
		d := NewDev(guestMAC, guestIP, port)
		ep := &netframe.Endpoint{MAC: guestMAC, IP: guestIP, Port: port}
		var want [][]byte
		for _, f := range frames {
			if r := reference(ep, f); r != nil {
				want = append(want, r)
			}
		}
		taken, sent, bells := d.Poll(start, 0, frames, true)
		if taken != 32 || bells != 1 || len(sent) != len(want) {
			t.Fatalf("start %#x: took %d, %d doorbells, sent %d frames, want 32, 1, %d", start, taken, bells, len(sent), len(want))
		}
		for i := range want {
			if !bytes.Equal(sent[i], want[i]) {
				t.Fatalf("start %#x: reply %d is %x, netframe's %x", start, i, sent[i], want[i])
			}
		}
		end := start + 32
		if got := d.Indices(); got != [4]uint32{end, end, start + uint32(len(want)), start + uint32(len(want))} {
			t.Fatalf("start %#x: indices %v", start, got)
		}
		if d.Counters() != ep.Counters {
			t.Fatalf("counters %+v, netframe %+v", d.Counters(), ep.Counters)
		}
	}
}

// A VMM that never empties the TX ring: the guest fills it, rings, and
// leaves the frames it cannot answer in the RX ring for a later poll
// instead of losing or overwriting anything.
func TestPollTxFull(t *testing.T) {
	d := NewDev(guestMAC, guestIP, port)
	frames := [][]byte{datagram("c:1 GET k", port), datagram("c:2 GET k", port), datagram("c:3 GET k", port), datagram("c:4 GET k", port)}
	taken, sent, bells := d.Poll(100, 30, frames, false)
	ix := d.Indices()
	if taken != 2 || len(sent) != 0 || bells != 2 || ix != [4]uint32{104, 102, 132, 100} {
		t.Fatalf("took %d, sent %d, %d doorbells, indices %v; want 2, 0, 2, [104 102 132 100]", taken, len(sent), bells, ix)
	}
	if c := d.Counters(); c.Datagrams != 2 || c.Sent != 2 || c.Received != 2 {
		t.Fatalf("counters %+v", c)
	}
}
