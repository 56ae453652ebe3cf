package kvm

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/netframe"
)

// Offsets in struct netdev (microguest/net.h, which asserts them).
const (
	ndMagic    = 0
	ndMAC      = 8
	ndIP       = 14
	ndPort     = 18
	ndRxProd   = 24
	ndRxCons   = 28
	ndTxCons   = 36
	ndRxLen    = 40
	ndTxLen    = 168
	ndCounters = 296 // received, arp_replies, datagrams, sent, dropped[7]: u64 each
)

// NICQueueFrames bounds the received frames waiting on the host for the
// guest's next poll; Deliver drops beyond it.
const NICQueueFrames = 256

// nic is the micro-guest's network card, host side. Everything the card
// is lives in guest memory (microguest/net.h): its address, written at
// boot, the rings' indices and lengths, the guest stack's counters and
// IPv4 ID. So the card moves with memory and needs no device section.
// The host keeps only frames received and not yet in the RX ring: a
// failover or a migration loses them, like frames on a wire.
//
// Tandem writes the rings only on vCPU 0's thread, in the guest's own
// port exits (the console poll fills the RX ring, the doorbell sends the
// TX ring), marking what it wrote dirty. So the guest never sees a ring
// change under it, a pause (which waits for the exit to complete) never
// splits a write, and the dirty log covers every byte. Each index and
// length read from guest memory is bounded: the guest is input too.
type nic struct {
	g    *Guest
	ep   netframe.Endpoint // the configured address
	sink atomic.Pointer[func([]byte)]

	// mu guards the fields below.
	mu     sync.Mutex
	closed bool
	rx     []rxFrame // received, waiting for the guest's poll
	full   uint64    // frames Deliver dropped on a full queue
	badTx  uint64    // TX descriptors the guest got wrong, skipped
	// last is the counters as last read from guest memory (kept at
	// close, and returned while the card's page is owed); owed says the
	// page had not arrived at the last Counters (post-copy).
	last netframe.Counters
	owed bool
}

// rxFrame is a received frame and its length on the wire: a frame longer
// than a ring buffer keeps only its length (the guest counts it too long).
type rxFrame struct {
	data []byte
	wire int
}

func newNIC(g *Guest, ep netframe.Endpoint) *nic { return &nic{g: g, ep: ep} }

// NIC implements guest.Networked; nil without --guest-ip.
func (g *Guest) NIC() guest.NIC {
	if g.nic == nil {
		return nil
	}
	return g.nic
}

// Deliver queues frame for the guest; it never blocks. A frame too long
// for a buffer is queued without its bytes: the guest counts it too long.
func (n *nic) Deliver(frame []byte) error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return fmt.Errorf("kvm: nic: %w", guest.ErrClosed)
	}
	if len(n.rx) >= NICQueueFrames {
		n.full++
		n.mu.Unlock()
		return fmt.Errorf("kvm: nic receive queue full (%d frames): frame dropped", NICQueueFrames)
	}
	f := rxFrame{wire: len(frame)}
	if len(frame) <= netBuf {
		f.data = append([]byte(nil), frame...)
	}
	n.rx = append(n.rx, f)
	n.mu.Unlock()
	select {
	case n.g.vcpus[0].wake <- struct{}{}:
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

// Announce is the gratuitous ARP for the address the card has in guest
// memory (the configured one before boot or after Close). Tandem builds
// it, not the guest, so the guest's Sent counter does not include it
// (synth's card counts its announcements).
func (n *nic) Announce() []byte {
	n.mu.Lock()
	defer n.mu.Unlock()
	ep := netframe.Endpoint{MAC: n.ep.MAC, IP: n.ep.IP}
	// Memory goes with Close; a page a post-copy source still owes is
	// not waited for under mu (the configured address is the one the
	// memory was checked to hold when the state was loaded).
	if !n.closed && n.g.arrived(netGPA, guest.PageSize) {
		if nd := n.page(); nd != nil {
			copy(ep.MAC[:], nd[ndMAC:ndMAC+6])
			copy(ep.IP[:], nd[ndIP:ndIP+4])
		}
	}
	return ep.Announce(nil)
}

// Counters are the guest stack's counts, read from guest memory; frames
// dropped on a full host queue never reach it (QueueDrops). While the
// card's page is one a post-copy source still owes, they are the last
// read (zero if none was) and CountersUnavailable says so: a read would
// wait for the page under mu, and with the source gone forever, while
// status waits for mu.
func (n *nic) Counters() netframe.Counters {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return n.last
	}
	if n.owed = !n.g.arrived(netGPA, guest.PageSize); n.owed {
		return n.last
	}
	n.last = n.readCounters()
	return n.last
}

// CountersUnavailable says why the last Counters are not the guest's
// counts now ("": they are).
func (n *nic) CountersUnavailable() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.owed {
		return "the card's page in guest memory has not arrived from the post-copy source yet"
	}
	return ""
}

// QueueDrops counts frames dropped because the host queue was full.
func (n *nic) QueueDrops() uint64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.full
}

// page is struct netdev in guest memory, or nil when the guest's memory
// holds no card (never booted with one). Precondition: mu held, or the
// caller is vCPU 0's thread.
func (n *nic) page() []byte {
	nd, ok := n.g.guestBytes(netGPA, guest.PageSize)
	if !ok || binary.LittleEndian.Uint64(nd[ndMagic:]) != netMagic {
		return nil
	}
	return nd
}

// readCounters reads the counters the guest updates as it runs: one
// 8-byte load each, so none is torn. Precondition: mu held, not closed.
func (n *nic) readCounters() netframe.Counters {
	var c netframe.Counters
	nd := n.page()
	if nd == nil {
		return c
	}
	at := func(i int) uint64 { return atomic.LoadUint64((*uint64)(unsafe.Pointer(&nd[ndCounters+8*i]))) }
	c.Received, c.ARPReplies, c.Datagrams, c.Sent = at(0), at(1), at(2), at(3)
	for i := range c.Dropped {
		c.Dropped[i] = at(4 + i)
	}
	return c
}

// hasPending reports whether frames wait for the guest (an idle vCPU 0
// returns at once to poll).
func (n *nic) hasPending() bool {
	if n == nil {
		return false
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.rx) > 0
}

// close keeps the last counters and refuses further frames; the caller
// unmaps guest memory afterwards.
func (n *nic) close() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.closed {
		if n.g.arrived(netGPA, guest.PageSize) {
			n.last = n.readCounters()
		}
		n.closed = true
		n.rx = nil
	}
}

// dropQueued forgets the frames not yet in guest memory (LoadState: they
// were received for the guest the loaded state replaces).
func (n *nic) dropQueued() {
	n.mu.Lock()
	n.rx = nil
	n.mu.Unlock()
}
