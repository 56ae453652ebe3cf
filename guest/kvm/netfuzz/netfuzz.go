//go:build cgo

package netfuzz

/*
#cgo CFLAGS: -O1 -Wall -Wextra -Werror
#include <stdlib.h>
#include <string.h>
#include "harness.h"

// ring_poll is one console poll of the guest with the VMM's side around
// it: n frames (lengths in lens, bytes in frames, NET_BUF apart) put in
// the RX ring from index start on, txbusy TX slots already taken and not
// sent, net_poll run once. Everything is C
// memory, freed here; the sent frames stay in harness.
static u32 ring_poll(u32 start, u32 txbusy, const u8 *frames, const u32 *lens, u32 n, int consume, struct netdev *out)
{
	struct netdev *nd = calloc(1, sizeof *nd);
	u8 *rx = calloc(NET_SLOTS, NET_BUF), *tx = calloc(NET_SLOTS, NET_BUF);
	*nd = *out;
	nd->rx_prod = nd->rx_cons = nd->tx_cons = start;
	nd->tx_prod = start + txbusy;
	for (u32 i = 0; i < n && i < NET_SLOTS; i++, nd->rx_prod++) {
		u32 slot = nd->rx_prod % NET_SLOTS;
		memcpy(rx + slot * NET_BUF, frames + i * NET_BUF, lens[i] < NET_BUF ? lens[i] : NET_BUF);
		nd->rx_len[slot] = lens[i];
	}
	memset(&harness, 0, sizeof harness);
	harness.nd = nd;
	harness.tx = tx;
	harness.consume = consume;
	u32 taken = net_poll(nd, rx, tx);
	*out = *nd;
	free(nd);
	free(rx);
	free(tx);
	return taken;
}
*/
import "C"

import (
	"unsafe"

	"github.com/tandemvm/tandem/guest/netframe"
)

// Dev is one card's struct netdev in host memory.
type Dev struct{ nd C.struct_netdev }

// NewDev is a configured card at mac, ip and port.
func NewDev(mac netframe.MAC, ip netframe.IPv4, port uint16) *Dev {
	d := &Dev{}
	d.nd.magic = C.NET_MAGIC
	for i := range mac {
		d.nd.mac[i] = C.u8(mac[i])
	}
	for i := range ip {
		d.nd.ip[i] = C.u8(ip[i])
	}
	d.nd.port = C.u16(port)
	return d
}

// Input runs frame through net_input and returns the reply frame, nil
// for none.
func (d *Dev) Input(frame []byte) []byte {
	in := C.CBytes(append(frame, 0)) // C memory: net.c may keep no Go pointer, and an empty frame still has an address
	defer C.free(in)
	out := C.malloc(C.NET_BUF)
	defer C.free(out)
	n := C.net_input(&d.nd, (*C.u8)(in), C.u32(len(frame)), (*C.u8)(out))
	if n == 0 {
		return nil
	}
	return C.GoBytes(out, C.int(n))
}

// Counters are the card's counts.
func (d *Dev) Counters() netframe.Counters {
	c := netframe.Counters{Received: uint64(d.nd.received), ARPReplies: uint64(d.nd.arp_replies),
		Datagrams: uint64(d.nd.datagrams), Sent: uint64(d.nd.sent)}
	for i := range c.Dropped {
		c.Dropped[i] = uint64(d.nd.dropped[i])
	}
	return c
}

// Poll is one guest poll over a ring whose indices all start at start
// (free-running: near 2^32 they wrap) holding frames (at most NET_SLOTS),
// with txBusy TX slots taken already: the frames the guest took, the
// frames sent at its doorbells (none when consume is false: a VMM that
// never empties the TX ring), and how many doorbells it rang. The card's
// counters and indices are d's after.
func (d *Dev) Poll(start, txBusy uint32, frames [][]byte, consume bool) (taken int, sent [][]byte, doorbells int) {
	buf := make([]byte, len(frames)*C.NET_BUF+1)
	lens := make([]C.u32, len(frames)+1)
	for i, f := range frames {
		copy(buf[i*C.NET_BUF:], f[:min(len(f), C.NET_BUF)])
		lens[i] = C.u32(len(f))
	}
	cbuf, clens := C.CBytes(buf), C.CBytes(unsafe.Slice((*byte)(unsafe.Pointer(&lens[0])), 4*len(lens)))
	defer C.free(cbuf)
	defer C.free(clens)
	c := 0
	if consume {
		c = 1
	}
	n := C.ring_poll(C.u32(start), C.u32(txBusy), (*C.u8)(cbuf), (*C.u32)(clens), C.u32(len(frames)), C.int(c), &d.nd)
	for i := C.u32(0); i < C.harness.nsent; i++ {
		sent = append(sent, C.GoBytes(unsafe.Pointer(&C.harness.sent[i*C.NET_BUF]), C.int(C.harness.sent_len[i])))
	}
	return int(n), sent, int(C.harness.doorbells)
}

// Indices are the rings' indices: RX producer and consumer, TX producer
// and consumer.
func (d *Dev) Indices() [4]uint32 {
	return [4]uint32{uint32(d.nd.rx_prod), uint32(d.nd.rx_cons), uint32(d.nd.tx_prod), uint32(d.nd.tx_cons)}
}

// NextID is the IPv4 ID of the last datagram the card sent.
func (d *Dev) NextID() uint16 { return uint16(d.nd.next_id) }
