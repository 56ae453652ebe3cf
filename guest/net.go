package guest

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/tandemvm/tandem/guest/netframe"
)

// Net configures a guest's network card. The zero value means no card.
type Net struct {
	// IP is the guest's address with its prefix length, "10.0.0.10/24".
	IP string `json:",omitempty"`
	// MAC is the card's address; "" derives one from IP (52:54:00 and
	// the address's last three bytes), the same on every node, so the
	// address and the card move together.
	MAC string `json:",omitempty"`
	// Port is the UDP port the kv service answers on; 0 means
	// DefaultKVPort.
	Port uint16 `json:",omitempty"`
}

// DefaultKVPort is the kv service's UDP port when Net.Port is 0.
const DefaultKVPort = 7000

// Enabled reports whether n configures a card.
func (n Net) Enabled() bool { return n.IP != "" }

// Endpoint checks n and returns the guest's address on the network. The
// error is one line naming the flag and the accepted form.
func (n Net) Endpoint() (netframe.Endpoint, error) {
	var ep netframe.Endpoint
	p, err := netip.ParsePrefix(n.IP)
	if err != nil || !p.Addr().Is4() || p.Bits() < 1 || p.Bits() > 32 {
		return ep, fmt.Errorf("%w: --guest-ip %q: want an IPv4 address with a prefix length, like 10.0.0.10/24", ErrConfig, n.IP)
	}
	a := p.Addr().As4()
	if a[0] == 0 || a[0] == 127 || a[0] >= 224 || p.Addr() == p.Masked().Addr() {
		return ep, fmt.Errorf("%w: --guest-ip %q: want a unicast host address (not 0/8, 127/8, multicast or the network address)", ErrConfig, n.IP)
	}
	ep.IP = netframe.IPv4(a)
	ep.MAC = netframe.MAC{0x52, 0x54, 0x00, a[1], a[2], a[3]}
	if n.MAC != "" {
		m, err := parseMAC(n.MAC)
		if err != nil {
			return ep, fmt.Errorf("%w: --guest-mac %q: %v", ErrConfig, n.MAC, err)
		}
		ep.MAC = m
	}
	ep.Port = n.Port
	if ep.Port == 0 {
		ep.Port = DefaultKVPort
	}
	return ep, nil
}

// parseMAC reads a unicast Ethernet address (net.ParseMAC's forms, six
// bytes).
func parseMAC(s string) (netframe.MAC, error) {
	var m netframe.MAC
	hw, err := net.ParseMAC(s)
	if err != nil || len(hw) != len(m) {
		return m, fmt.Errorf("want six hex pairs separated by ':', like 52:54:00:12:34:56")
	}
	copy(m[:], hw)
	if m[0]&1 != 0 || m == (netframe.MAC{}) {
		return m, fmt.Errorf("a multicast or all-zero address cannot be a card's")
	}
	return m, nil
}

// NIC is a guest's network card. Frames the host receives go in with
// Deliver; frames the guest sends go to the one sink set with
// SetTransmit, synchronously and in order from the vCPU that sent them,
// so (as with Console) every frame sent before a Pause has reached the
// sink when Pause returns, and output commit sits in the sink.
type NIC interface {
	// Deliver queues a received frame for the guest. It never blocks;
	// when the guest's receive queue is full the frame is dropped and
	// an error says so (a real card drops too).
	Deliver(frame []byte) error
	// SetTransmit sets where the guest's frames go; nil discards them.
	SetTransmit(sink func(frame []byte))
	// Announce is the gratuitous ARP for the guest's address, for the
	// node that starts running the guest to send.
	Announce() []byte
	// Counters are the card's frame counts (received, answered, dropped
	// by reason).
	Counters() netframe.Counters
}

// Networked is implemented by guests that can have a network card; NIC
// returns nil when this one has none.
type Networked interface {
	NIC() NIC
}

// NICOf is g's network card, or nil.
func NICOf(g Guest) NIC {
	if n, ok := g.(Networked); ok {
		return n.NIC()
	}
	return nil
}
