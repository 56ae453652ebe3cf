package kvm

import (
	"encoding/binary"
	"math"

	"github.com/hashicorp/go-msgpack/v2/codec"
)

// A vCPU's state is encoded at every epoch's pause, and the reflective
// msgpack encoder spent most of its time on two lists: the CPUID (fixed
// once the vCPU exists) and the MSRs (fixed indices, new values). The
// encoding below writes the very same bytes (TestEncodeStateMatchesCodec)
// with the CPUID encoded once per vCPU and the MSRs by hand, so neither
// the format nor its version changes.

// vcpuStateV1Enc is vcpuStateV1 with its two lists already encoded: the
// same field names, so the same map (in the encoder's order: by name).
type vcpuStateV1Enc struct {
	CPUID     codec.Raw
	MPState   uint32
	Regs      Regs
	Sregs     Sregs
	XSAVE     []byte
	XCRs      []XCR
	DebugRegs DebugRegs
	TSC       uint64
	MSRs      codec.Raw
	Events    []byte
}

// rawHandle is msgpackHandle that writes codec.Raw values as they are.
var rawHandle = func() *codec.MsgpackHandle {
	h := &codec.MsgpackHandle{}
	h.WriteExt = true
	h.Raw = true
	return h
}()

// encodeState encodes s, a state of v whose CPUID is v.cpuid, as
// encode(*s) would.
func (v *vcpu) encodeState(s *vcpuStateV1) ([]byte, error) {
	if v.cpuidEnc == nil {
		b, err := encode(v.cpuid)
		if err != nil {
			return nil, err
		}
		v.cpuidEnc = b
	}
	cpuid := v.cpuidEnc
	if len(s.CPUID) != len(v.cpuid) || len(s.CPUID) > 0 && &s.CPUID[0] != &v.cpuid[0] {
		b, err := encode(s.CPUID) // not v's own: no cache
		if err != nil {
			return nil, err
		}
		cpuid = b
	}
	e := vcpuStateV1Enc{CPUID: cpuid, MPState: s.MPState, Regs: s.Regs, Sregs: s.Sregs, XSAVE: s.XSAVE,
		XCRs: s.XCRs, DebugRegs: s.DebugRegs, TSC: s.TSC, MSRs: appendMSRs(nil, s.MSRs), Events: s.Events}
	var b []byte
	if err := codec.NewEncoderBytes(&b, rawHandle).Encode(&e); err != nil {
		return nil, err
	}
	return b, nil
}

// appendMSRs appends ms as msgpack encodes a []MSR: nil as nil, else an
// array of maps {Data, Index, Reserved} (the encoder writes a struct's
// fields sorted by name), each number in its shortest form.
func appendMSRs(b []byte, ms []MSR) []byte {
	if ms == nil {
		return append(b, 0xc0)
	}
	switch n := len(ms); {
	case n < 16:
		b = append(b, 0x90|byte(n))
	case n < 1<<16:
		b = binary.BigEndian.AppendUint16(append(b, 0xdc), uint16(n))
	default:
		b = binary.BigEndian.AppendUint32(append(b, 0xdd), uint32(n))
	}
	for _, m := range ms {
		b = append(b, 0x83)
		b = append(append(b, 0xa4), "Data"...)
		b = appendUint(b, m.Data)
		b = append(append(b, 0xa5), "Index"...)
		b = appendUint(b, uint64(m.Index))
		b = append(append(b, 0xa8), "Reserved"...)
		b = appendUint(b, uint64(m.Reserved))
	}
	return b
}

// appendUint appends u as msgpack's encoder does (positive fixint, then
// uint 8, 16, 32 or 64).
func appendUint(b []byte, u uint64) []byte {
	switch {
	case u <= math.MaxInt8:
		return append(b, byte(u))
	case u <= math.MaxUint8:
		return append(b, 0xcc, byte(u))
	case u <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, 0xcd), uint16(u))
	case u <= math.MaxUint32:
		return binary.BigEndian.AppendUint32(append(b, 0xce), uint32(u))
	}
	return binary.BigEndian.AppendUint64(append(b, 0xcf), u)
}
