package netframe

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// MAC is an Ethernet address.
type MAC [6]byte

// Broadcast is ff:ff:ff:ff:ff:ff.
var Broadcast = MAC{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

func (m MAC) String() string {
	return fmt.Sprintf("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5])
}

// IPv4 is an IPv4 address in network order.
type IPv4 [4]byte

func (a IPv4) String() string { return fmt.Sprintf("%d.%d.%d.%d", a[0], a[1], a[2], a[3]) }

// EtherType values this package knows.
const (
	EtherTypeIPv4 uint16 = 0x0800
	EtherTypeARP  uint16 = 0x0806
)

// Sizes of the headers this package reads and writes.
const (
	EthernetHeaderLen = 14
	ARPLen            = 28
	IPv4HeaderLen     = 20 // without options; longer headers are parsed, never built
	UDPHeaderLen      = 8
	// MaxFrame is the largest frame accepted: a 1500-byte MTU plus the
	// Ethernet header (no VLAN tag, no jumbo frames).
	MaxFrame = 1514
	// MinFrame is the smallest frame on the wire without its FCS; shorter
	// ones are padded when built.
	MinFrame = 60
)

// Errors of Parse*, one per reason a frame is dropped.
var (
	ErrShort       = errors.New("frame shorter than its headers")
	ErrTooLong     = errors.New("frame longer than the MTU")
	ErrBadLength   = errors.New("length field disagrees with the frame")
	ErrBadChecksum = errors.New("bad checksum")
	ErrFragment    = errors.New("IPv4 fragment")
	ErrUnsupported = errors.New("unsupported protocol or field")
)

// Ethernet is a parsed Ethernet II header.
type Ethernet struct {
	Dst, Src MAC
	Type     uint16
}

// ParseEthernet splits frame into its header and payload.
func ParseEthernet(frame []byte) (Ethernet, []byte, error) {
	var h Ethernet
	if len(frame) < EthernetHeaderLen {
		return h, nil, ErrShort
	}
	if len(frame) > MaxFrame {
		return h, nil, ErrTooLong
	}
	copy(h.Dst[:], frame[0:6])
	copy(h.Src[:], frame[6:12])
	h.Type = binary.BigEndian.Uint16(frame[12:14])
	if h.Type < 0x0600 {
		return h, nil, ErrUnsupported // an 802.3 length field, not a type
	}
	return h, frame[EthernetHeaderLen:], nil
}

// AppendEthernet appends h to b.
func AppendEthernet(b []byte, h Ethernet) []byte {
	b = append(b, h.Dst[:]...)
	b = append(b, h.Src[:]...)
	return binary.BigEndian.AppendUint16(b, h.Type)
}

// ARP operations.
const (
	ARPRequest uint16 = 1
	ARPReply   uint16 = 2
)

// ARP is an ARP packet for IPv4 over Ethernet.
type ARP struct {
	Op                   uint16
	SenderMAC, TargetMAC MAC
	SenderIP, TargetIP   IPv4
}

// ParseARP parses an ARP payload (trailing padding is ignored).
func ParseARP(p []byte) (ARP, error) {
	var a ARP
	if len(p) < ARPLen {
		return a, ErrShort
	}
	if binary.BigEndian.Uint16(p[0:2]) != 1 || binary.BigEndian.Uint16(p[2:4]) != EtherTypeIPv4 || p[4] != 6 || p[5] != 4 {
		return a, ErrUnsupported
	}
	a.Op = binary.BigEndian.Uint16(p[6:8])
	if a.Op != ARPRequest && a.Op != ARPReply {
		return a, ErrUnsupported
	}
	copy(a.SenderMAC[:], p[8:14])
	copy(a.SenderIP[:], p[14:18])
	copy(a.TargetMAC[:], p[18:24])
	copy(a.TargetIP[:], p[24:28])
	return a, nil
}

// AppendARP appends a's 28 bytes to b.
func AppendARP(b []byte, a ARP) []byte {
	b = binary.BigEndian.AppendUint16(b, 1)
	b = binary.BigEndian.AppendUint16(b, EtherTypeIPv4)
	b = append(b, 6, 4)
	b = binary.BigEndian.AppendUint16(b, a.Op)
	b = append(b, a.SenderMAC[:]...)
	b = append(b, a.SenderIP[:]...)
	b = append(b, a.TargetMAC[:]...)
	return append(b, a.TargetIP[:]...)
}

// IPv4Header is the part of an IPv4 header this package uses.
type IPv4Header struct {
	Protocol uint8
	TTL      uint8
	ID       uint16
	Src, Dst IPv4
}

// ProtoUDP is IPv4's protocol number for UDP.
const ProtoUDP uint8 = 17

// ParseIPv4 checks an IPv4 packet's version, header length, total length
// and header checksum, refuses fragments, and returns the header and its
// payload (Ethernet padding after the total length is cut off).
func ParseIPv4(p []byte) (IPv4Header, []byte, error) {
	var h IPv4Header
	if len(p) < IPv4HeaderLen {
		return h, nil, ErrShort
	}
	if p[0]>>4 != 4 {
		return h, nil, ErrUnsupported
	}
	ihl := int(p[0]&0x0f) * 4
	if ihl < IPv4HeaderLen || ihl > len(p) {
		return h, nil, ErrBadLength
	}
	total := int(binary.BigEndian.Uint16(p[2:4]))
	if total < ihl || total > len(p) {
		return h, nil, ErrBadLength
	}
	if Checksum(p[:ihl], 0) != 0 {
		return h, nil, ErrBadChecksum
	}
	if frag := binary.BigEndian.Uint16(p[6:8]); frag&0x2000 != 0 || frag&0x1fff != 0 {
		return h, nil, ErrFragment
	}
	h.ID = binary.BigEndian.Uint16(p[4:6])
	h.TTL = p[8]
	h.Protocol = p[9]
	copy(h.Src[:], p[12:16])
	copy(h.Dst[:], p[16:20])
	return h, p[ihl:total], nil
}

// AppendIPv4 appends a 20-byte header for a payload of payloadLen bytes
// (Don't Fragment set, checksum filled in).
func AppendIPv4(b []byte, h IPv4Header, payloadLen int) []byte {
	start := len(b)
	b = append(b, 0x45, 0)
	b = binary.BigEndian.AppendUint16(b, uint16(IPv4HeaderLen+payloadLen))
	b = binary.BigEndian.AppendUint16(b, h.ID)
	b = binary.BigEndian.AppendUint16(b, 0x4000)
	b = append(b, h.TTL, h.Protocol, 0, 0)
	b = append(b, h.Src[:]...)
	b = append(b, h.Dst[:]...)
	binary.BigEndian.PutUint16(b[start+10:], Checksum(b[start:], 0))
	return b
}

// UDP is a parsed UDP header.
type UDP struct {
	SrcPort, DstPort uint16
}

// ParseUDP checks a UDP datagram's length and, when present, its
// checksum over ip's pseudo-header, and returns the header and data.
func ParseUDP(ip IPv4Header, p []byte) (UDP, []byte, error) {
	var u UDP
	if len(p) < UDPHeaderLen {
		return u, nil, ErrShort
	}
	n := int(binary.BigEndian.Uint16(p[4:6]))
	if n < UDPHeaderLen || n > len(p) {
		return u, nil, ErrBadLength
	}
	p = p[:n]
	if binary.BigEndian.Uint16(p[6:8]) != 0 && Checksum(p, pseudoSum(ip.Src, ip.Dst, n)) != 0 {
		return u, nil, ErrBadChecksum
	}
	u.SrcPort = binary.BigEndian.Uint16(p[0:2])
	u.DstPort = binary.BigEndian.Uint16(p[2:4])
	return u, p[UDPHeaderLen:], nil
}

// AppendUDP appends a UDP header and data with its checksum filled in.
func AppendUDP(b []byte, src, dst IPv4, u UDP, data []byte) []byte {
	start := len(b)
	n := UDPHeaderLen + len(data)
	b = binary.BigEndian.AppendUint16(b, u.SrcPort)
	b = binary.BigEndian.AppendUint16(b, u.DstPort)
	b = binary.BigEndian.AppendUint16(b, uint16(n))
	b = append(b, 0, 0)
	b = append(b, data...)
	sum := Checksum(b[start:], pseudoSum(src, dst, n))
	if sum == 0 {
		sum = 0xffff // 0 means "no checksum" in UDP
	}
	binary.BigEndian.PutUint16(b[start+6:], sum)
	return b
}

// pseudoSum is the unfolded sum of UDP's IPv4 pseudo-header.
func pseudoSum(src, dst IPv4, n int) uint32 {
	return uint32(binary.BigEndian.Uint16(src[0:2])) + uint32(binary.BigEndian.Uint16(src[2:4])) +
		uint32(binary.BigEndian.Uint16(dst[0:2])) + uint32(binary.BigEndian.Uint16(dst[2:4])) +
		uint32(ProtoUDP) + uint32(n)
}

// Checksum is the Internet checksum (RFC 1071) of b, starting from the
// unfolded sum initial: 0 over data that includes a correct checksum
// field; over data whose checksum field is zero, the value to put there.
func Checksum(b []byte, initial uint32) uint16 {
	sum := uint64(initial)
	for len(b) >= 2 {
		sum += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint64(b[0]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
