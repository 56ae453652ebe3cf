package synth

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvproto"
)

// The kv workload keeps its whole state in guest memory, so a checkpoint of
// memory captures it:
//
//	page 0          header: magic, layout version, slot counts, live counts
//	clientOff       client table: clientSlots slots of 512 bytes
//	kvOff           key-value table: kvSlots slots of 512 bytes
//
// Both tables use open addressing with linear probing bounded by
// maxProbe, so one request touches a bounded number of slots and a vCPU's
// work unit stays a few microseconds. A 512-byte slot never spans a page,
// so a request dirties at most three pages (client slot, kv slot, header).
const (
	kvMagic    = "TDMKVTB\x01"
	kvLayoutV1 = 1
	slotSize   = 512
	maxProbe   = 64
	maxClients = 4096
	// maxKVSlots only keeps the slot count in the header's uint32: the
	// table scales with guest memory (issue 11: a 1 GiB guest holds
	// 2,093,048 slots, well over the 1,000,000 keys asked for).
	maxKVSlots    = 1<<32 - 8
	minKVMemory   = 64 << 10
	hdrMagicOff   = 0
	hdrVersionOff = 8
	hdrClientsOff = 12 // uint32 client slots
	hdrKVOff      = 16 // uint32 kv slots
	hdrKVUsedOff  = 20 // uint32 live keys
	hdrClientsUse = 24 // uint32 clients recorded

	// client slot
	csUsed    = 0
	csIDLen   = 1
	csReplyLn = 2 // uint16
	csHighest = 8 // uint64
	csID      = 16
	csReply   = csID + kvproto.MaxClient

	// kv slot
	ksState  = 0 // 0 empty, 1 live, 2 deleted
	ksKeyLen = 1
	ksValLen = 2 // uint16
	ksKey    = 8
	ksValue  = ksKey + kvproto.MaxKey
)

const (
	slotEmpty   = 0
	slotLive    = 1
	slotDeleted = 2
)

// kvLayout is where the tables sit; it is a pure function of memory size,
// so a restored guest of the same size finds them in the same place.
type kvLayout struct {
	clientSlots, kvSlots uint64
	clientOff, kvOff     uint64
}

func layoutFor(memSize uint64) (kvLayout, error) {
	if memSize < minKVMemory {
		return kvLayout{}, fmt.Errorf("%w: --memory %s is too small for the kv workload: want at least 64KiB", guest.ErrConfig, guest.FormatSize(memSize))
	}
	avail := (memSize - guest.PageSize) / slotSize
	clients := min(uint64(maxClients), avail/4/8*8)
	kv := min(uint64(maxKVSlots), (avail-clients)/8*8)
	l := kvLayout{clientSlots: clients, kvSlots: kv, clientOff: guest.PageSize}
	l.kvOff = l.clientOff + clients*slotSize
	return l, nil
}

// kvTable serves requests against the tables in guest memory. Only vCPU 0
// uses it.
type kvTable struct {
	m   *memory
	l   kvLayout
	buf [slotSize]byte // scratch slot image
}

// boot writes an empty table's header.
func (t *kvTable) boot() {
	var h [28]byte
	copy(h[hdrMagicOff:], kvMagic)
	binary.LittleEndian.PutUint32(h[hdrVersionOff:], kvLayoutV1)
	binary.LittleEndian.PutUint32(h[hdrClientsOff:], uint32(t.l.clientSlots))
	binary.LittleEndian.PutUint32(h[hdrKVOff:], uint32(t.l.kvSlots))
	t.m.write(0, h[:])
}

// check verifies that memory holds a table (after a restore). A table
// laid out by an older build (before the table scaled with memory: at most
// 65,536 kv slots) is adopted as it is, if it fits this guest's memory.
func (t *kvTable) check() error {
	t.m.faultIn(0, 28)
	h := t.m.mem[:28]
	clients := uint64(binary.LittleEndian.Uint32(h[hdrClientsOff:]))
	kv := uint64(binary.LittleEndian.Uint32(h[hdrKVOff:]))
	if string(h[:8]) == kvMagic && binary.LittleEndian.Uint32(h[hdrVersionOff:]) == kvLayoutV1 &&
		clients > 0 && kv > 0 && guest.PageSize+(clients+kv)*slotSize <= uint64(len(t.m.mem)) {
		t.l = kvLayout{clientSlots: clients, kvSlots: kv, clientOff: guest.PageSize}
		t.l.kvOff = t.l.clientOff + clients*slotSize
	}
	switch {
	case string(h[:8]) != kvMagic:
		return fmt.Errorf("%w: kv table header missing from guest memory (restore memory before resuming)", guest.ErrState)
	case binary.LittleEndian.Uint32(h[hdrVersionOff:]) != kvLayoutV1:
		return fmt.Errorf("%w: kv table layout version %d, want %d", guest.ErrState, binary.LittleEndian.Uint32(h[hdrVersionOff:]), kvLayoutV1)
	case uint64(binary.LittleEndian.Uint32(h[hdrClientsOff:])) != t.l.clientSlots ||
		uint64(binary.LittleEndian.Uint32(h[hdrKVOff:])) != t.l.kvSlots:
		return fmt.Errorf("%w: kv table has %d client and %d kv slots, this guest's memory gives %d and %d",
			guest.ErrState, binary.LittleEndian.Uint32(h[hdrClientsOff:]), binary.LittleEndian.Uint32(h[hdrKVOff:]), t.l.clientSlots, t.l.kvSlots)
	}
	return nil
}

func fnv(b []byte) uint64 {
	h := uint64(14695981039346656037)
	for _, c := range b {
		h ^= uint64(c)
		h *= 1099511628211
	}
	return h
}

func (t *kvTable) clientSlot(i uint64) []byte {
	off := t.l.clientOff + i*slotSize
	t.m.faultIn(off, slotSize)
	return t.m.mem[off : off+slotSize]
}

func (t *kvTable) kvSlot(i uint64) []byte {
	off := t.l.kvOff + i*slotSize
	t.m.faultIn(off, slotSize)
	return t.m.mem[off : off+slotSize]
}

func (t *kvTable) bumpHeader(off uint64, delta int) {
	t.m.faultIn(off, 4)
	v := binary.LittleEndian.Uint32(t.m.mem[off:])
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], uint32(int64(v)+int64(delta)))
	t.m.write(off, b[:])
}

// findClient returns the slot recording client, or the free slot where it
// would go (found false), or ok false if its probe run is full.
func (t *kvTable) findClient(id []byte) (slot uint64, found, ok bool) {
	n := t.l.clientSlots
	h := fnv(id) % n
	for i := uint64(0); i < min(maxProbe, n); i++ {
		s := (h + i) % n
		b := t.clientSlot(s)
		if b[csUsed] == 0 {
			return s, false, true
		}
		if int(b[csIDLen]) == len(id) && bytes.Equal(b[csID:csID+len(id)], id) {
			return s, true, true
		}
	}
	return 0, false, false
}

// findKey returns the live slot holding key (found), else the first free
// slot on its probe run (ok false if there is none).
func (t *kvTable) findKey(key []byte) (slot uint64, found, ok bool) {
	n := t.l.kvSlots
	h := fnv(key) % n
	free, haveFree := uint64(0), false
	for i := uint64(0); i < min(maxProbe, n); i++ {
		s := (h + i) % n
		b := t.kvSlot(s)
		switch b[ksState] {
		case slotEmpty:
			if !haveFree {
				free, haveFree = s, true
			}
			return free, false, true
		case slotDeleted:
			if !haveFree {
				free, haveFree = s, true
			}
		case slotLive:
			if int(b[ksKeyLen]) == len(key) && bytes.Equal(b[ksKey:ksKey+len(key)], key) {
				return s, true, true
			}
		}
	}
	return free, false, haveFree
}

// diskWrite is a write the workload asks the disk for.
type diskWrite struct {
	off  uint64
	data []byte
}

// serve handles one request line and returns the reply (without newline)
// and, for a change to the table, the slot image to write to the disk.
func (t *kvTable) serve(line []byte) (reply []byte, dw *diskWrite) {
	req, err := kvproto.Parse(line)
	if err != nil {
		if pe, ok := err.(*kvproto.ParseError); ok {
			return pe.Reply(), nil
		}
		return []byte("ERR " + err.Error()), nil
	}
	id := []byte(req.Client)
	cs, known, ok := t.findClient(id)
	if !ok {
		// Not recorded: there is no slot to record it in.
		return kvproto.ErrReply(req.Client, req.Seq, "too many clients"), nil
	}
	if known {
		b := t.clientSlot(cs)
		if req.Seq <= binary.LittleEndian.Uint64(b[csHighest:]) {
			n := int(binary.LittleEndian.Uint16(b[csReplyLn:]))
			return append([]byte(nil), b[csReply:csReply+n]...), nil
		}
	}
	reply, dw = t.apply(req)
	// Record the reply before it leaves (the caller emits it after serve
	// returns, in the same work unit), so a retry is answered identically.
	c := t.buf[:csReply+len(reply)]
	clear(c[:csReply])
	c[csUsed] = 1
	c[csIDLen] = byte(len(id))
	binary.LittleEndian.PutUint16(c[csReplyLn:], uint16(len(reply)))
	binary.LittleEndian.PutUint64(c[csHighest:], req.Seq)
	copy(c[csID:], id)
	copy(c[csReply:], reply)
	t.m.write(t.l.clientOff+cs*slotSize, c)
	if !known {
		t.bumpHeader(hdrClientsUse, 1)
	}
	return reply, dw
}

func (t *kvTable) apply(req kvproto.Request) ([]byte, *diskWrite) {
	key := []byte(req.Key)
	s, found, ok := t.findKey(key)
	switch req.Op {
	case kvproto.OpGet:
		if !found {
			return kvproto.NotFoundReply(req.Client, req.Seq), nil
		}
		b := t.kvSlot(s)
		n := int(binary.LittleEndian.Uint16(b[ksValLen:]))
		return kvproto.OKReply(req.Client, req.Seq, b[ksValue:ksValue+n]), nil
	case kvproto.OpSet:
		if !found && !ok {
			return kvproto.ErrReply(req.Client, req.Seq, "table full"), nil
		}
		c := t.buf[:ksValue+len(req.Value)]
		clear(c[:ksValue])
		c[ksState] = slotLive
		c[ksKeyLen] = byte(len(key))
		binary.LittleEndian.PutUint16(c[ksValLen:], uint16(len(req.Value)))
		copy(c[ksKey:], key)
		copy(c[ksValue:], req.Value)
		off := t.l.kvOff + s*slotSize
		t.m.write(off, c)
		if !found {
			t.bumpHeader(hdrKVUsedOff, 1)
		}
		img := make([]byte, slotSize)
		copy(img, c)
		return kvproto.OKReply(req.Client, req.Seq, nil), &diskWrite{off: s * slotSize, data: img}
	case kvproto.OpDel:
		if !found {
			return kvproto.NotFoundReply(req.Client, req.Seq), nil
		}
		t.m.write(t.l.kvOff+s*slotSize, []byte{slotDeleted})
		t.bumpHeader(hdrKVUsedOff, -1)
		img := make([]byte, slotSize)
		img[ksState] = slotDeleted
		return kvproto.OKReply(req.Client, req.Seq, nil), &diskWrite{off: s * slotSize, data: img}
	}
	return kvproto.ErrReply(req.Client, req.Seq, "unknown command"), nil
}
