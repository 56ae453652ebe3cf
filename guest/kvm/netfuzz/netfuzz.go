//go:build cgo

package netfuzz

/*
#cgo CFLAGS: -O1 -Wall -Wextra -Werror
#include <stdlib.h>
#include "net.h"
*/
import "C"

import "github.com/tandemvm/tandem/guest/netframe"

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

// NextID is the IPv4 ID of the last datagram the card sent.
func (d *Dev) NextID() uint16 { return uint16(d.nd.next_id) }
