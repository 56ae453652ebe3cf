//go:build cgo

package netfuzz

import (
	"bytes"
	"encoding/binary"
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
