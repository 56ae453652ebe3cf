package checkpoint

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/tandemvm/tandem/guest"
)

// memStream writes epochs of a 1,024-page memory (mixed content: zero,
// sparse, text and random pages, and runs of equal pages) to sink, each
// epoch sending a dirty subset in one WritePages call whose pages are
// slices of one copy (so stored pages lie side by side, as a live round's
// snapshot), and returns the final memory.
func memStream(t *testing.T, sink io.Writer, opts Options, epochs int) []byte {
	t.Helper()
	const pages = 1024
	mem := make([]byte, pages*guest.PageSize)
	for p := uint64(0); p < pages; p++ {
		guest.FillPage(mem[p*guest.PageSize:(p+1)*guest.PageSize], guest.FillKindMixed, 7, p)
	}
	for p := 100; p < 140; p++ { // a run of equal pages
		copy(mem[p*guest.PageSize:(p+1)*guest.PageSize], mem[99*guest.PageSize:100*guest.PageSize])
	}
	w, err := NewWriter(sink, Header{Build: "test", Kind: "synth", Regions: []MemRegion{{Size: pages * guest.PageSize}}}, opts)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	snap := make([]byte, len(mem))
	for e := 1; e <= epochs; e++ {
		var batch []Page
		for p := uint64(0); p < pages; p++ {
			if e > 1 && rng.IntN(3) != 0 {
				continue // a third of the pages dirty after the first epoch
			}
			page := mem[p*guest.PageSize : (p+1)*guest.PageSize]
			switch rng.IntN(4) {
			case 0:
				fillRandom(rng, page) // a fresh random page
			case 1:
				page[rng.IntN(guest.PageSize)] ^= 0x5a // a sparse change: an XOR delta
			}
			s := snap[len(batch)*guest.PageSize : (len(batch)+1)*guest.PageSize]
			copy(s, page)
			batch = append(batch, Page{Index: p, Data: s})
		}
		if err := w.WritePages(batch); err != nil {
			t.Fatal(err)
		}
		if _, err := w.EndEpoch(uint64(e)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.EndStream(); err != nil {
		t.Fatal(err)
	}
	if f, ok := sink.(*bufio.Writer); ok {
		if err := f.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	return mem
}

// TestEncodersSameStream: the stream does not depend on how many
// goroutines encode it, nor on whether its stored pages go through the
// sink's buffer or around it; it decodes to the memory it was written
// from.
func TestEncodersSameStream(t *testing.T) {
	for _, comp := range []Compression{CompressNone, CompressDefault} {
		var want []byte
		for _, enc := range []int{0, 2, 5} {
			for _, buffered := range []bool{false, true} {
				t.Run(fmt.Sprintf("%v/encoders=%d/bufio=%v", comp, enc, buffered), func(t *testing.T) {
					var out bytes.Buffer
					var sink io.Writer = &out
					if buffered {
						sink = bufio.NewWriterSize(&out, 64<<10)
					}
					mem := memStream(t, sink, Options{Compression: comp, Encoders: enc, BatchPages: 64, CacheBytes: 256 << 10}, 3)
					if want == nil {
						want = bytes.Clone(out.Bytes())
						tgt := NewMemTarget()
						if _, err := Restore(bytes.NewReader(want), Limits{}, tgt); err != nil {
							t.Fatal(err)
						}
						for p := uint64(0); p < uint64(len(mem)/guest.PageSize); p++ {
							got := tgt.Page(p)
							if got == nil {
								got = zeroPage[:]
							}
							if !bytes.Equal(got, mem[p*guest.PageSize:(p+1)*guest.PageSize]) {
								t.Fatalf("page %d differs after decoding", p)
							}
						}
						return
					}
					if !bytes.Equal(out.Bytes(), want) {
						t.Fatalf("stream of %d bytes differs from the single encoder's %d", out.Len(), len(want))
					}
				})
			}
		}
	}
}

func TestEncodersBadInput(t *testing.T) {
	for _, n := range []int{-1, MaxEncoders + 1} {
		if _, err := NewWriter(io.Discard, testHeader(), Options{Encoders: n}); !errors.Is(err, ErrBadInput) {
			t.Errorf("Encoders %d: %v, want ErrBadInput", n, err)
		}
	}
}

// failAfter fails every write after the first n bytes.
type failAfter struct{ n int }

func (f *failAfter) Write(p []byte) (int, error) {
	if len(p) > f.n {
		return 0, errors.New("link down")
	}
	f.n -= len(p)
	return len(p), nil
}

// TestEncodersWriteError: a write error in the middle of a parallel call
// is returned, sticks, and leaves no encoder running (the race detector
// and the test's end would see one).
func TestEncodersWriteError(t *testing.T) {
	w, err := NewWriter(&failAfter{n: 1 << 20}, testHeader(), Options{Encoders: 4, BatchPages: 64})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	mem := make([]byte, 2048*guest.PageSize)
	fillRandom(rng, mem)
	if err := w.WritePages(pagesOf(mem)); err == nil || !errors.Is(w.WritePages(pagesOf(mem[:guest.PageSize])), err) {
		t.Fatalf("WritePages = %v; want the sink's error, sticky", err)
	}
}

// OnPageHash sees every page written, in order, with its XXH64 (or zero),
// whatever the encoders and compression: a digest kept from it
// (guest.MemHash) equals a scan of the memory the stream leaves.
func TestOnPageHash(t *testing.T) {
	const pages = 1024
	for _, comp := range []Compression{CompressNone, CompressDefault} {
		for _, enc := range []int{1, 3} {
			t.Run(fmt.Sprintf("%v/encoders=%d", comp, enc), func(t *testing.T) {
				mem := make([]byte, pages*guest.PageSize)
				for p := uint64(0); p < pages; p++ {
					guest.FillPage(mem[p*guest.PageSize:(p+1)*guest.PageSize], guest.FillKindMixed, 9, p)
				}
				w, err := NewWriter(io.Discard, Header{Build: "test", Kind: "synth", Regions: []MemRegion{{Size: pages * guest.PageSize}}},
					Options{Compression: comp, Encoders: enc, BatchPages: 64, CacheBytes: 256 << 10})
				if err != nil {
					t.Fatal(err)
				}
				shipped := guest.NewMemHash()
				var seen int
				var last uint64
				w.OnPageHash(func(index, sum uint64, zero bool) {
					if seen > 0 && index <= last {
						t.Fatalf("page %d after %d: not in stream order", index, last)
					}
					seen, last = seen+1, index
					shipped.UpdateHashed(index, sum, zero)
				})
				rng := rand.New(rand.NewPCG(5, 6))
				snap := make([]byte, len(mem))
				for e := 1; e <= 4; e++ {
					var batch []Page
					for p := uint64(0); p < pages; p++ {
						if e > 1 && rng.IntN(3) != 0 {
							continue
						}
						page := mem[p*guest.PageSize : (p+1)*guest.PageSize]
						switch rng.IntN(5) {
						case 0:
							fillRandom(rng, page)
						case 1:
							page[rng.IntN(guest.PageSize)] ^= 0x5a
						case 2:
							clear(page)
						}
						s := snap[len(batch)*guest.PageSize : (len(batch)+1)*guest.PageSize]
						copy(s, page)
						batch = append(batch, Page{Index: p, Data: s})
					}
					seen = 0
					if err := w.WritePages(batch); err != nil {
						t.Fatal(err)
					}
					if seen != len(batch) {
						t.Fatalf("epoch %d: %d pages seen of %d written", e, seen, len(batch))
					}
					if _, err := w.EndEpoch(uint64(e)); err != nil {
						t.Fatal(err)
					}
				}
				if got, scan := shipped.Sum(), guest.MemorySum([]guest.Region{{Mem: mem}}); got != scan {
					t.Fatalf("digest from OnPageHash %x, scan of memory %x", got, scan)
				}
			})
		}
	}
}
