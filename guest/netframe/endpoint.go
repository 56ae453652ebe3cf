package netframe

import "errors"

// Drop reasons an Endpoint counts, indexes into Counters.Dropped.
const (
	DropShort       = iota // shorter than its headers
	DropTooLong            // longer than the MTU
	DropBadLength          // a length field disagrees with the frame
	DropBadChecksum        // IPv4 header or UDP checksum wrong
	DropFragment           // an IPv4 fragment (never reassembled)
	DropUnsupported        // another EtherType, protocol, ARP form or IP version
	DropNotOurs            // for another MAC, IP address or UDP port
	NumDropReasons
)

// DropNames names the drop reasons, for status and metrics.
var DropNames = [NumDropReasons]string{"short", "too_long", "bad_length", "bad_checksum", "fragment", "unsupported", "not_ours"}

// Counters are an Endpoint's frame counts.
type Counters struct {
	Received   uint64 // frames handed to Input
	ARPReplies uint64 // ARP requests for our address answered
	Datagrams  uint64 // UDP datagrams delivered to the service
	Sent       uint64 // frames built by Reply and Announce
	Dropped    [NumDropReasons]uint64
}

// DroppedTotal is the sum of Dropped.
func (c Counters) DroppedTotal() uint64 {
	var n uint64
	for _, d := range c.Dropped {
		n += d
	}
	return n
}

// Peer is where a datagram came from, and so where its reply goes.
type Peer struct {
	MAC  MAC
	IP   IPv4
	Port uint16
}

// Endpoint is a guest's own address on the network and the stack that
// serves it: ARP for IP, UDP on Port. The zero TTL means 64.
type Endpoint struct {
	MAC      MAC
	IP       IPv4
	Port     uint16
	TTL      uint8
	Counters Counters
	nextID   uint16
}

// Input handles one received frame. An ARP request for the endpoint's
// address yields the reply frame in out (appended to buf); a UDP datagram
// for its address and port yields data (a slice of frame) and its sender.
// Anything else is dropped and counted; Input never fails otherwise.
func (e *Endpoint) Input(frame, buf []byte) (out []byte, data []byte, from Peer, ok bool) {
	e.Counters.Received++
	eth, p, err := ParseEthernet(frame)
	if err != nil {
		e.drop(err)
		return nil, nil, from, false
	}
	if eth.Dst != e.MAC && eth.Dst != Broadcast {
		e.Counters.Dropped[DropNotOurs]++
		return nil, nil, from, false
	}
	switch eth.Type {
	case EtherTypeARP:
		a, err := ParseARP(p)
		if err != nil {
			e.drop(err)
			return nil, nil, from, false
		}
		if a.Op != ARPRequest || a.TargetIP != e.IP {
			e.Counters.Dropped[DropNotOurs]++
			return nil, nil, from, false
		}
		e.Counters.ARPReplies++
		e.Counters.Sent++
		return e.arp(buf, ARPReply, a.SenderMAC, a.SenderMAC, a.SenderIP), nil, from, true
	case EtherTypeIPv4:
		ip, p, err := ParseIPv4(p)
		if err != nil {
			e.drop(err)
			return nil, nil, from, false
		}
		if ip.Protocol != ProtoUDP {
			e.Counters.Dropped[DropUnsupported]++
			return nil, nil, from, false
		}
		if ip.Dst != e.IP {
			e.Counters.Dropped[DropNotOurs]++
			return nil, nil, from, false
		}
		u, d, err := ParseUDP(ip, p)
		if err != nil {
			e.drop(err)
			return nil, nil, from, false
		}
		if u.DstPort != e.Port {
			e.Counters.Dropped[DropNotOurs]++
			return nil, nil, from, false
		}
		e.Counters.Datagrams++
		return nil, d, Peer{MAC: eth.Src, IP: ip.Src, Port: u.SrcPort}, true
	}
	e.Counters.Dropped[DropUnsupported]++
	return nil, nil, from, false
}

// NextID is the IPv4 identification the next reply follows (state that
// a saved guest carries, so a restored one does not repeat IDs).
func (e *Endpoint) NextID() uint16 { return e.nextID }

// SetNextID restores NextID.
func (e *Endpoint) SetNextID(id uint16) { e.nextID = id }

// MaxData is the most UDP data one reply frame carries.
const MaxData = MaxFrame - EthernetHeaderLen - IPv4HeaderLen - UDPHeaderLen

// ErrDataTooLong is Reply's refusal of more than MaxData bytes.
var ErrDataTooLong = errors.New("UDP data longer than one frame carries")

// Reply appends to buf the frame that sends data from the endpoint's
// address and port to to.
func (e *Endpoint) Reply(buf []byte, to Peer, data []byte) ([]byte, error) {
	if len(data) > MaxData {
		return buf, ErrDataTooLong
	}
	start := len(buf)
	buf = AppendEthernet(buf, Ethernet{Dst: to.MAC, Src: e.MAC, Type: EtherTypeIPv4})
	ttl := e.TTL
	if ttl == 0 {
		ttl = 64
	}
	e.nextID++
	buf = AppendIPv4(buf, IPv4Header{Protocol: ProtoUDP, TTL: ttl, ID: e.nextID, Src: e.IP, Dst: to.IP}, UDPHeaderLen+len(data))
	buf = AppendUDP(buf, e.IP, to.IP, UDP{SrcPort: e.Port, DstPort: to.Port}, data)
	e.Counters.Sent++
	return pad(buf, start), nil
}

// Announce appends a gratuitous ARP: a broadcast request from and for
// the endpoint's own address, which makes every host and switch on the
// segment learn where the address now lives (after a failover, a
// switchover or a migration).
func (e *Endpoint) Announce(buf []byte) []byte {
	e.Counters.Sent++
	return e.arp(buf, ARPRequest, Broadcast, MAC{}, e.IP)
}

func (e *Endpoint) arp(buf []byte, op uint16, dst, targetMAC MAC, targetIP IPv4) []byte {
	start := len(buf)
	buf = AppendEthernet(buf, Ethernet{Dst: dst, Src: e.MAC, Type: EtherTypeARP})
	buf = AppendARP(buf, ARP{Op: op, SenderMAC: e.MAC, SenderIP: e.IP, TargetMAC: targetMAC, TargetIP: targetIP})
	return pad(buf, start)
}

// pad zero-fills the frame that starts at start to MinFrame bytes.
func pad(buf []byte, start int) []byte {
	for len(buf)-start < MinFrame {
		buf = append(buf, 0)
	}
	return buf
}

func (e *Endpoint) drop(err error) {
	switch {
	case errors.Is(err, ErrShort):
		e.Counters.Dropped[DropShort]++
	case errors.Is(err, ErrTooLong):
		e.Counters.Dropped[DropTooLong]++
	case errors.Is(err, ErrBadLength):
		e.Counters.Dropped[DropBadLength]++
	case errors.Is(err, ErrBadChecksum):
		e.Counters.Dropped[DropBadChecksum]++
	case errors.Is(err, ErrFragment):
		e.Counters.Dropped[DropFragment]++
	default:
		e.Counters.Dropped[DropUnsupported]++
	}
}
