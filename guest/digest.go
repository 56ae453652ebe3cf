package guest

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
)

// Digest is a SHA-256 over a guest's memory and machine state, taken while
// the guest is paused. Two guests with equal digests hold the same memory
// at the same guest-physical addresses and the same device state.
type Digest [32]byte

func (d Digest) String() string { return hex.EncodeToString(d[:]) }


// MemoryDigest hashes every non-zero page of regions with its page index, so
// that an all-zero page and an absent page hash the same (a restored guest
// need not touch pages that were zero). Precondition: the guest is paused or
// the caller accepts a torn view.
func MemoryDigest(regions []Region) Digest {
	h := sha256.New()
	var idx [8]byte
	for _, r := range regions {
		first := r.FirstPage()
		for p := uint64(0); p < r.Pages(); p++ {
			page := r.Mem[p<<PageShift : (p+1)<<PageShift]
			if isZero(page) {
				continue
			}
			binary.LittleEndian.PutUint64(idx[:], first+p)
			h.Write(idx[:])
			h.Write(page)
		}
	}
	var d Digest
	h.Sum(d[:0])
	return d
}

// StateDigest hashes a machine state in a canonical order (the order the
// backend saved its devices in, which backends keep stable).
func StateDigest(s MachineState) Digest {
	h := sha256.New()
	str := func(v string) {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(v)))
		h.Write(n[:])
		h.Write([]byte(v))
	}
	u := func(v uint64) {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], v)
		h.Write(n[:])
	}
	str(s.Kind)
	u(uint64(len(s.Devices)))
	for _, d := range s.Devices {
		str(d.Name)
		u(uint64(d.Instance))
		u(uint64(d.Version))
		str(string(d.Fields))
		u(uint64(len(d.Subsections)))
		for _, sub := range d.Subsections {
			str(sub.Name)
			u(uint64(sub.Version))
			str(string(sub.Fields))
		}
	}
	var d Digest
	h.Sum(d[:0])
	return d
}

// SwitchoverDigest combines memory and state digests into the one figure
// both ends of a migration report.
func SwitchoverDigest(regions []Region, s MachineState) Digest {
	m, st := MemoryDigest(regions), StateDigest(s)
	return sha256.Sum256(append(m[:], st[:]...))
}

// isZero reports whether p is all zero bytes, eight bytes at a time.
func isZero(p []byte) bool {
	for len(p) >= 64 {
		w := binary.LittleEndian.Uint64(p) | binary.LittleEndian.Uint64(p[8:]) |
			binary.LittleEndian.Uint64(p[16:]) | binary.LittleEndian.Uint64(p[24:]) |
			binary.LittleEndian.Uint64(p[32:]) | binary.LittleEndian.Uint64(p[40:]) |
			binary.LittleEndian.Uint64(p[48:]) | binary.LittleEndian.Uint64(p[56:])
		if w != 0 {
			return false
		}
		p = p[64:]
	}
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

// IsZeroPage reports whether a page is all zeros.
func IsZeroPage(p []byte) bool { return isZero(p) }
