package checkpoint

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/tandemvm/tandem/guest"
)

// testHeader is a 64 MiB guest in two regions, with a hole.
func testHeader() Header {
	return Header{Build: "test", Kind: "synth", Regions: []MemRegion{{GPA: 0, Size: 32 << 20}, {GPA: 1 << 32, Size: 32 << 20}}}
}

// fakeGuest is a reference image the tests mutate and stream.
type fakeGuest struct {
	rng   *rand.Rand
	pages map[uint64][]byte
}

func newFakeGuest(seed uint64) *fakeGuest {
	return &fakeGuest{rng: rand.New(rand.NewPCG(seed, seed^0x9e37)), pages: map[uint64][]byte{}}
}

func (g *fakeGuest) randomIndex() uint64 {
	i := g.rng.Uint64N(2 * 8192)
	if i >= 8192 {
		return (1<<32)>>guest.PageShift + i - 8192
	}
	return i
}

// mutate changes n pages in assorted ways and returns them as a batch.
func (g *fakeGuest) mutate(n int) []Page {
	var out []Page
	for k := 0; k < n; k++ {
		idx := g.randomIndex()
		p, ok := g.pages[idx]
		if !ok {
			p = make([]byte, guest.PageSize)
			g.pages[idx] = p
		}
		switch g.rng.IntN(6) {
		case 0: // zero
			clear(p)
		case 1: // random
			fillRandom(g.rng, p)
		case 2: // text-like
			for i := range p {
				p[i] = "tandem guest memory "[g.rng.IntN(20)]
			}
		default: // sparse change
			for j := 0; j < 1+g.rng.IntN(16); j++ {
				p[g.rng.IntN(len(p))] ^= byte(1 + g.rng.IntN(255))
			}
		}
		out = append(out, Page{Index: idx, Data: bytes.Clone(p)})
	}
	return out
}

func fillRandom(rng *rand.Rand, p []byte) {
	for i := 0; i+8 <= len(p); i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8; j++ {
			p[i+j] = byte(v >> (8 * j))
		}
	}
}

func (g *fakeGuest) state(epoch int) guest.MachineState {
	return guest.MachineState{Kind: "synth", Devices: []guest.DeviceState{
		{Name: "vcpu", Instance: 0, Version: 1, Fields: []byte{0x91, byte(epoch & 0x7f)}},
		{Name: "serial", Instance: 0, Version: 2, Fields: []byte{0xc0}, Subsections: []guest.Subsection{{Name: "fifo", Version: 1, Fields: []byte{0x90}}}},
	}}
}

// writeStream writes epochs epochs of mutations and returns the bytes and
// the final reference image.
func writeStream(t testing.TB, opts Options, epochs int, seed uint64) ([]byte, *fakeGuest) {
	t.Helper()
	var buf bytes.Buffer
	w, err := NewWriter(&buf, testHeader(), opts)
	if err != nil {
		t.Fatal(err)
	}
	g := newFakeGuest(seed)
	for e := 1; e <= epochs; e++ {
		if err := w.WritePages(g.mutate(300)); err != nil {
			t.Fatal(err)
		}
		if err := w.WriteDevices(g.state(e)); err != nil {
			t.Fatal(err)
		}
		if err := w.WriteDisk([]guest.DiskWrite{{Offset: uint64(e) * 512, Data: bytes.Repeat([]byte{byte(e)}, 512)}}); err != nil {
			t.Fatal(err)
		}
		if _, err := w.EndEpoch(uint64(e)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.EndStream(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), g
}
