package kvm

import (
	"encoding/binary"
	"fmt"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/netframe"
)

// writeConfig gives a booting guest its card: the address in struct
// netdev, the magic last (the guest reads it first). The page is marked
// dirty like the rest of the machine.
func (n *nic) writeConfig() {
	nd, ok := n.g.guestBytes(netGPA, guest.PageSize)
	if !ok {
		return // MinMemory covers netGPA; a smaller guest is refused before
	}
	le := binary.LittleEndian
	copy(nd[ndMAC:], n.ep.MAC[:])
	copy(nd[ndIP:], n.ep.IP[:])
	le.PutUint16(nd[ndPort:], n.ep.Port)
	le.PutUint64(nd[ndMagic:], netMagic)
	n.g.MarkDirty(netGPA>>guest.PageShift, 1)
}

// checkMemory refuses a restored guest whose memory disagrees with this
// node's card: a card at another address or port, a card this node was
// not given, or none where it was. Memory is in place before LoadState
// (NewEmpty's contract), so the check sees the guest that will run.
func (g *Guest) checkNICMemory() error {
	nd, ok := g.guestBytes(netGPA, guest.PageSize)
	has := ok && binary.LittleEndian.Uint64(nd[ndMagic:]) == netMagic
	switch {
	case g.nic == nil && has:
		return fmt.Errorf("%w: kvm: the state's guest has a network card, this guest has no --guest-ip", guest.ErrState)
	case g.nic == nil:
		return nil
	case !has:
		return fmt.Errorf("%w: kvm: the state's guest has no network card, this guest's --guest-ip needs one", guest.ErrState)
	}
	var ip netframe.IPv4
	copy(ip[:], nd[ndIP:ndIP+4])
	port := binary.LittleEndian.Uint16(nd[ndPort:])
	if ip != g.nic.ep.IP || port != g.nic.ep.Port {
		return fmt.Errorf("%w: kvm: the state's card is at %v port %d, this guest is configured with %v port %d",
			guest.ErrState, ip, port, g.nic.ep.IP, g.nic.ep.Port)
	}
	return nil
}

// fill moves queued frames into the RX ring's free slots. It runs on
// vCPU 0's thread in the guest's console poll (the guest is stopped
// there), and marks what it wrote dirty. A ring whose indices the guest
// corrupted (more in use than it has slots) counts as full.
//
// On a post-copy destination the ring's pages may still be owed: they
// are faulted in before mu is taken, so vCPU 0 waits for them (as the
// guest itself would) without holding up Counters and Deliver, whose
// callers (status, the TAP reader) must not wait for the source.
func (n *nic) fill() {
	if !n.hasPending() {
		return
	}
	n.g.faultInGPA(netGPA, guest.PageSize)
	n.g.faultInGPA(netRxGPA, netSlots*netBuf)
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.rx) == 0 || n.closed {
		return
	}
	nd := n.page()
	if nd == nil {
		return
	}
	le := binary.LittleEndian
	prod, cons := le.Uint32(nd[ndRxProd:]), le.Uint32(nd[ndRxCons:])
	used := prod - cons
	moved := 0
	for ; used < netSlots && moved < len(n.rx); used, prod, moved = used+1, prod+1, moved+1 {
		slot := uint64(prod % netSlots)
		buf, ok := n.g.guestBytes(netRxGPA+slot*netBuf, netBuf)
		if !ok {
			return
		}
		f := n.rx[moved]
		copy(buf, f.data)
		le.PutUint32(nd[ndRxLen+4*slot:], uint32(f.wire))
		n.g.MarkDirty((netRxGPA+slot*netBuf)>>guest.PageShift, 1)
	}
	if moved == 0 {
		return
	}
	le.PutUint32(nd[ndRxProd:], prod)
	n.g.MarkDirty(netGPA>>guest.PageShift, 1)
	clear(n.rx[:moved])
	n.rx = n.rx[moved:]
	if len(n.rx) == 0 {
		n.rx = nil
	}
}

// transmit sends the TX ring's frames from the host's index up to prod
// (the doorbell's value) to the sink, synchronously and in order on
// vCPU 0's thread, so every frame sent before a Pause has reached the
// sink when Pause returns. Each sink call gets its own copy: the guest
// reuses the slot. A doorbell claiming more frames than the ring holds,
// or a length outside an Ethernet frame's, is a guest bug: those frames
// are skipped and counted, never read beyond their slot.
func (n *nic) transmit(prod uint32) {
	// Fault the ring in before mu, as fill does.
	n.g.faultInGPA(netGPA, guest.PageSize)
	n.g.faultInGPA(netTxGPA, netSlots*netBuf)
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	nd := n.page()
	if nd == nil {
		n.mu.Unlock()
		return
	}
	le := binary.LittleEndian
	cons := le.Uint32(nd[ndTxCons:])
	if prod-cons > netSlots {
		n.badTx += uint64(prod - cons)
		cons = prod
	}
	var frames [][]byte
	for ; cons != prod; cons++ {
		slot := uint64(cons % netSlots)
		l := uint64(le.Uint32(nd[ndTxLen+4*slot:]))
		buf, ok := n.g.guestBytes(netTxGPA+slot*netBuf, netBuf)
		if !ok || l < netframe.EthernetHeaderLen || l > netframe.MaxFrame {
			n.badTx++
			continue
		}
		frames = append(frames, append([]byte(nil), buf[:l]...))
	}
	le.PutUint32(nd[ndTxCons:], cons)
	n.g.MarkDirty(netGPA>>guest.PageShift, 1)
	n.mu.Unlock()
	// The sink runs without mu: it may take its time (the output gate's
	// lock), and Counters must not wait for it.
	if s := n.sink.Load(); s != nil {
		for _, f := range frames {
			(*s)(f)
		}
	}
}
