package checkpoint

import (
	"bytes"
	"io"
	"testing"

	"github.com/tandemvm/tandem/guest"
)

// fuzzStream is a small stream: a few pages of every encoding over two
// epochs, with devices and disk writes.
func fuzzStream(tb testing.TB, opts Options) []byte {
	var buf bytes.Buffer
	h := Header{Build: "fuzz", Kind: "synth", Regions: []MemRegion{{GPA: 0, Size: 64 * guest.PageSize}}}
	w, err := NewWriter(&buf, h, opts)
	if err != nil {
		tb.Fatal(err)
	}
	page := func(fill func(p []byte)) []byte {
		p := make([]byte, guest.PageSize)
		fill(p)
		return p
	}
	text := page(func(p []byte) {
		for i := range p {
			p[i] = "abcabd"[i%6]
		}
	})
	rnd := page(func(p []byte) {
		x := uint32(1)
		for i := range p {
			x = x*1664525 + 1013904223
			p[i] = byte(x >> 24)
		}
	})
	zero := make([]byte, guest.PageSize)
	ep1 := []Page{{0, zero}, {1, zero}, {2, text}, {3, text}, {4, text}, {5, rnd}, {9, text}}
	text2 := bytes.Clone(text)
	text2[100] ^= 0xff
	text2[4000] = 7
	ep2 := []Page{{2, text2}, {9, zero}, {5, rnd}, {63, text}}
	ms := guest.MachineState{Kind: "synth", Devices: []guest.DeviceState{{Name: "vcpu", Version: 1, Fields: []byte{0x80},
		Subsections: []guest.Subsection{{Name: "fpu", Version: 1, Fields: []byte{0xc0}}}}}}
	for e, pages := range [][]Page{ep1, ep2} {
		if err := w.WritePages(pages); err != nil {
			tb.Fatal(err)
		}
		if err := w.WriteDevices(ms); err != nil {
			tb.Fatal(err)
		}
		if err := w.WriteDisk([]guest.DiskWrite{{Offset: uint64(e) * 512, Data: []byte("sector")}}); err != nil {
			tb.Fatal(err)
		}
		if _, err := w.EndEpoch(uint64(e + 1)); err != nil {
			tb.Fatal(err)
		}
	}
	if err := w.EndStream(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// FuzzReader feeds arbitrary bytes to the Reader. It must never panic,
// every failure must be one of the package's typed errors, nothing from a
// failed section may reach the target, and nothing from an epoch whose
// EPOCH-END failed may be committed. Seeds: valid streams (compressed and
// not, and with the CRCs of mutations recomputed so mutations get past
// the checksum into the decoders) plus truncated and flipped copies.
func FuzzReader(f *testing.F) {
	for _, opts := range []Options{{}, {Compression: CompressNone}} {
		s := fuzzStream(f, opts)
		f.Add(s)
		f.Add(s[:len(s)/2])
		for _, at := range frames(s) {
			bad := bytes.Clone(s)
			bad[at+frameLen+1] ^= 0x41
			fixCRC(bad, at)
			f.Add(bad)
		}
	}
	f.Add([]byte(Magic))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		// Let mutations reach the decoders: recompute every CRC the
		// input's framing allows half of the time.
		if len(data) > 0 && data[len(data)-1]&1 == 1 && len(data) >= headerFixedLen+4 && string(data[:8]) == Magic {
			data = bytes.Clone(data)
			if n := headerLen(data); n <= len(data) && n >= headerFixedLen+4 {
				fixHeaderCRC(data)
				for off := n; off+frameLen <= len(data); {
					l := int(uint32(data[off+1]) | uint32(data[off+2])<<8 | uint32(data[off+3])<<16 | uint32(data[off+4])<<24)
					if l < 0 || off+frameLen+l > len(data) {
						break
					}
					fixCRC(data, off)
					off += frameLen + l
				}
			}
		}
		lim := Limits{MaxSectionSize: 1 << 20, MaxPagesPerBatch: 64, MaxDevices: 16, MaxDeviceBytes: 1 << 16, MaxDiskWrites: 64, MaxDiskWriteSize: 1 << 16}
		r, err := NewReader(bytes.NewReader(data), lim)
		if err != nil {
			if !anyTyped(err) {
				t.Fatalf("NewReader: untyped error %v", err)
			}
			return
		}
		tgt := newRecordingTarget()
		for {
			before := *tgt
			_, err := r.Next(tgt)
			if err == io.EOF {
				break
			}
			if err != nil {
				if !anyTyped(err) {
					t.Fatalf("untyped error %v", err)
				}
				// Nothing of the failed section reached the target, and
				// no epoch was committed by it.
				if tgt.epochs != before.epochs || tgt.pages != before.pages || tgt.devices != before.devices || tgt.disks != before.disks {
					t.Fatalf("failed section reached the target: %v", err)
				}
				return
			}
		}
	})
}

// The analyzer must survive the same inputs.
func FuzzAnalyze(f *testing.F) {
	f.Add(fuzzStream(f, Options{}))
	f.Fuzz(func(t *testing.T, data []byte) {
		rep, err := Analyze(bytes.NewReader(data))
		if err != nil && rep.Error == "" {
			t.Fatal("error not in report")
		}
		var buf bytes.Buffer
		if err := rep.WriteText(&buf); err != nil {
			t.Fatal(err)
		}
	})
}
