package synth

import (
	"bytes"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/netframe"
)

// NICQueueFrames is how many received frames may wait for the guest;
// Deliver drops beyond it.
const NICQueueFrames = 256

// nic is the synth guest's network card: a receive queue (device state,
// saved and restored like the console's input) and a guest-side stack
// (guest/netframe) whose address, counters and IP ID are device state
// too. The kv vCPU serves one request per UDP datagram; its replies and
// ARP answers go synchronously from the vCPU to the transmit sink.
type nic struct {
	notify chan struct{} // the console's: either kind of input wakes vCPU 0
	sink   atomic.Pointer[func([]byte)]

	// mu guards the fields below.
	mu     sync.Mutex
	closed bool
	ep     netframe.Endpoint
	rx     [][]byte
	full   uint64 // frames dropped because rx was full
}

func newNIC(ep netframe.Endpoint, notify chan struct{}) *nic {
	return &nic{ep: ep, notify: notify}
}

// Deliver queues frame for the guest; it never blocks.
func (n *nic) Deliver(frame []byte) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return fmt.Errorf("synth: nic: %w", guest.ErrClosed)
	}
	if len(n.rx) >= NICQueueFrames {
		n.full++
		return fmt.Errorf("synth: nic receive queue full (%d frames): frame dropped", NICQueueFrames)
	}
	if len(frame) > netframe.MaxFrame {
		n.ep.Counters.Received++
		n.ep.Counters.Dropped[netframe.DropTooLong]++
		return nil
	}
	n.rx = append(n.rx, append([]byte(nil), frame...))
	select {
	case n.notify <- struct{}{}:
	default:
	}
	return nil
}

// SetTransmit sets the sink; nil discards the guest's frames.
func (n *nic) SetTransmit(sink func(frame []byte)) {
	if sink == nil {
		n.sink.Store(nil)
		return
	}
	n.sink.Store(&sink)
}

// Announce is the gratuitous ARP for the guest's address.
func (n *nic) Announce() []byte {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ep.Announce(nil)
}

// Counters are the stack's counts of the frames the guest took in;
// frames dropped on a full queue never reach it (QueueDrops).
func (n *nic) Counters() netframe.Counters {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ep.Counters
}

// QueueDrops counts frames dropped because the receive queue was full.
func (n *nic) QueueDrops() uint64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.full
}

func (n *nic) emit(frame []byte) {
	if s := n.sink.Load(); s != nil {
		(*s)(frame)
	}
}

// take removes the next received frame.
func (n *nic) take() ([]byte, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.rx) == 0 {
		return nil, false
	}
	f := n.rx[0]
	n.rx[0] = nil
	n.rx = n.rx[1:]
	if len(n.rx) == 0 {
		n.rx = nil
	}
	return f, true
}

// input runs the stack over one frame: what to send back at once (an ARP
// reply) and the request a datagram carries, with its sender.
func (n *nic) input(frame []byte) (out, req []byte, from netframe.Peer, ok bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	out, data, from, ok := n.ep.Input(frame, nil)
	if data != nil {
		// One request per datagram; a trailing newline is optional.
		data = bytes.TrimSuffix(bytes.TrimSuffix(data, []byte("\n")), []byte("\r"))
		req = append([]byte(nil), data...)
	}
	return out, req, from, ok
}

// reply builds the frame answering to.
func (n *nic) reply(to netframe.Peer, data []byte) ([]byte, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ep.Reply(nil, to, data)
}

func (n *nic) close() {
	n.mu.Lock()
	n.closed = true
	n.mu.Unlock()
}

// nicState is the card's saved state, version 1: its address (part of
// the guest: it moves with it), the stack's counters and IP ID, and the
// frames received and not yet served.
type nicState struct {
	MAC       [6]byte
	IP        [4]byte
	Port      uint16
	NextID    uint16
	Counters  netframe.Counters
	QueueFull uint64
	RX        [][]byte
}

const nicStateVersion = 1

func (n *nic) save() nicState {
	n.mu.Lock()
	defer n.mu.Unlock()
	s := nicState{MAC: n.ep.MAC, IP: n.ep.IP, Port: n.ep.Port, NextID: n.ep.NextID(), Counters: n.ep.Counters, QueueFull: n.full}
	for _, f := range n.rx {
		s.RX = append(s.RX, append([]byte(nil), f...))
	}
	return s
}

// check refuses state that does not fit this card.
func (n *nic) check(s nicState) error {
	if len(s.RX) > NICQueueFrames {
		return fmt.Errorf("%w: nic: %d queued frames, at most %d", guest.ErrState, len(s.RX), NICQueueFrames)
	}
	for _, f := range s.RX {
		if len(f) > netframe.MaxFrame {
			return fmt.Errorf("%w: nic: a queued frame of %d bytes, at most %d", guest.ErrState, len(f), netframe.MaxFrame)
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if s.IP != n.ep.IP || s.Port != n.ep.Port {
		return fmt.Errorf("%w: nic: state of a card at %v port %d, this guest is configured with %v port %d", guest.ErrState,
			netframe.IPv4(s.IP), s.Port, n.ep.IP, n.ep.Port)
	}
	return nil
}

func (n *nic) load(s nicState) {
	n.mu.Lock()
	n.ep.MAC, n.ep.Counters, n.full = s.MAC, s.Counters, s.QueueFull
	n.ep.SetNextID(s.NextID)
	n.rx = s.RX
	n.mu.Unlock()
	if len(s.RX) > 0 {
		select {
		case n.notify <- struct{}{}:
		default:
		}
	}
}
