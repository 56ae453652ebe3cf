package checkpoint

import (
	"bytes"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/tandemvm/tandem/guest"
)

// Benchmarks report page input throughput (b.SetBytes) and "x-smaller",
// input bytes over output bytes, for Tandem's encoder and for baselines
// measured in the same run: copy (memory speed), raw (an uncompressed
// send) and zstd alone over the raw pages.

const benchPages = 4096 // 16 MiB per iteration

// benchHeader covers benchPages pages.
func benchHeader() Header {
	return Header{Build: "bench", Kind: "synth", Regions: []MemRegion{{GPA: 0, Size: benchPages * guest.PageSize}}}
}

// residentMem returns n bytes that are really backed by RAM (fresh
// allocations map the kernel's shared zero page, which reads at L1 speed
// and would flatter any scanner).
func residentMem(n int) []byte {
	m := make([]byte, n)
	for i := range m {
		m[i] = 1
	}
	clear(m)
	return m
}

func pagesOf(mem []byte) []Page {
	ps := make([]Page, len(mem)/guest.PageSize)
	for i := range ps {
		ps[i] = Page{Index: uint64(i), Data: mem[i*guest.PageSize : (i+1)*guest.PageSize]}
	}
	return ps
}

// countingWriter counts and discards.
type countingWriter struct{ n int64 }

func (c *countingWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

func reportRatio(b *testing.B, in, out int64) {
	if out > 0 {
		b.ReportMetric(float64(in)/float64(out), "x-smaller")
	}
}

// encodeEpochs runs b.N epochs of WritePages+EndEpoch, alternating between
// the given page sets, on one Writer.
func encodeEpochs(b *testing.B, opts Options, seed []Page, sets ...[]Page) {
	cw := &countingWriter{}
	w, err := NewWriter(cw, benchHeader(), opts)
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	if seed != nil {
		if err := w.WritePages(seed); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := w.EndEpoch(0); err != nil {
		b.Fatal(err)
	}
	start := cw.n
	b.SetBytes(int64(len(sets[0]) * guest.PageSize))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := w.WritePages(sets[i%len(sets)]); err != nil {
			b.Fatal(err)
		}
		if _, err := w.EndEpoch(uint64(i + 1)); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	reportRatio(b, int64(b.N)*int64(len(sets[0])*guest.PageSize), cw.n-start)
}

// zstdOnly compresses the pages in batches of DefaultBatchPages with zstd's
// fastest level, the obvious alternative to Tandem's encoder.
func zstdOnly(b *testing.B, mem []byte) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(false))
	if err != nil {
		b.Fatal(err)
	}
	defer enc.Close()
	batch := DefaultBatchPages * guest.PageSize
	var out []byte
	var total int64
	b.SetBytes(int64(len(mem)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for off := 0; off < len(mem); off += batch {
			out = enc.EncodeAll(mem[off:min(off+batch, len(mem))], out[:0])
			total += int64(len(out))
		}
	}
	b.StopTimer()
	reportRatio(b, int64(b.N)*int64(len(mem)), total)
}

// rawSend copies the pages into a send buffer, as an uncompressed send would.
func rawSend(b *testing.B, mem []byte) {
	dst := residentMem(len(mem))
	b.SetBytes(int64(len(mem)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		copy(dst, mem)
	}
	b.StopTimer()
	reportRatio(b, 1, 1)
}

func BenchmarkEncodeZeroPages(b *testing.B) {
	mem := residentMem(benchPages * guest.PageSize)
	b.Run("copy", func(b *testing.B) { rawSend(b, mem) })
	b.Run("tandem", func(b *testing.B) { encodeEpochs(b, Options{}, nil, pagesOf(mem)) })
	b.Run("zstd-only", func(b *testing.B) { zstdOnly(b, mem) })
}

// sparsePair returns two versions of benchPages random pages that differ
// in 1 to 16 bytes per page.
func sparsePair() (a, b []byte) {
	rng := rand.New(rand.NewPCG(1, 2))
	a = residentMem(benchPages * guest.PageSize)
	fillRandom(rng, a)
	b = bytes.Clone(a)
	for p := 0; p < benchPages; p++ {
		page := b[p*guest.PageSize : (p+1)*guest.PageSize]
		for k := 0; k < 1+rng.IntN(16); k++ {
			page[rng.IntN(guest.PageSize)] ^= byte(1 + rng.IntN(255))
		}
	}
	return a, b
}

func BenchmarkEncodeSparseDelta(b *testing.B) {
	memA, memB := sparsePair()
	b.Run("copy", func(b *testing.B) { rawSend(b, memB) })
	b.Run("tandem", func(b *testing.B) {
		encodeEpochs(b, Options{}, pagesOf(memA), pagesOf(memB), pagesOf(memA))
	})
	b.Run("zstd-only", func(b *testing.B) { zstdOnly(b, memB) })
}

func randomMem() []byte {
	mem := residentMem(benchPages * guest.PageSize)
	fillRandom(rand.New(rand.NewPCG(3, 4)), mem)
	return mem
}

func BenchmarkEncodeRandom(b *testing.B) {
	mem := randomMem()
	b.Run("copy", func(b *testing.B) { rawSend(b, mem) })
	// No cache: every page is new to the receiver, as in migration round 0.
	b.Run("tandem", func(b *testing.B) { encodeEpochs(b, Options{CacheBytes: -1}, nil, pagesOf(mem)) })
	b.Run("zstd-only", func(b *testing.B) { zstdOnly(b, mem) })
}

// decodeBench decodes stream b.N times into a RegionTarget over mem,
// restoring mem from init before each pass (outside the timer).
func decodeBench(b *testing.B, stream []byte, mem, init []byte, pages int) {
	rt := &RegionTarget{Regions: []guest.Region{{GPA: 0, Mem: mem}}}
	b.SetBytes(int64(pages * guest.PageSize))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if init != nil {
			b.StopTimer()
			copy(mem, init)
			b.StartTimer()
		}
		if _, err := Restore(bytes.NewReader(stream), Limits{}, rt); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	reportRatio(b, int64(pages*guest.PageSize), int64(len(stream)))
}

func encodeStream(b *testing.B, opts Options, seed []Page, sets ...[]Page) []byte {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, benchHeader(), opts)
	if err != nil {
		b.Fatal(err)
	}
	for _, p := range seed {
		w.SeedPage(p.Index, p.Data)
	}
	for i, s := range sets {
		if err := w.WritePages(s); err != nil {
			b.Fatal(err)
		}
		if _, err := w.EndEpoch(uint64(i)); err != nil {
			b.Fatal(err)
		}
	}
	if err := w.EndStream(); err != nil {
		b.Fatal(err)
	}
	return buf.Bytes()
}

func BenchmarkDecodeZeroPages(b *testing.B) {
	src := residentMem(benchPages * guest.PageSize)
	stream := encodeStream(b, Options{}, nil, pagesOf(src))
	dst := residentMem(len(src))
	b.Run("copy", func(b *testing.B) { rawSend(b, src) })
	b.Run("tandem", func(b *testing.B) { decodeBench(b, stream, dst, nil, benchPages) })
}

func BenchmarkDecodeSparseDelta(b *testing.B) {
	memA, memB := sparsePair()
	// Two epochs, A->B then B->A, so every pass starts and ends at A.
	stream := encodeStream(b, Options{}, pagesOf(memA), pagesOf(memB), pagesOf(memA))
	dst := residentMem(len(memA))
	copy(dst, memA)
	b.Run("copy", func(b *testing.B) { rawSend(b, memA) })
	b.Run("tandem", func(b *testing.B) { decodeBench(b, stream, dst, nil, 2*benchPages) })
	zs := zstdStream(b, memB)
	b.Run("zstd-only", func(b *testing.B) { zstdOnlyDecode(b, zs, len(memB)) })
}

func BenchmarkDecodeRandom(b *testing.B) {
	mem := randomMem()
	stream := encodeStream(b, Options{CacheBytes: -1}, nil, pagesOf(mem))
	dst := residentMem(len(mem))
	b.Run("copy", func(b *testing.B) { rawSend(b, mem) })
	b.Run("tandem", func(b *testing.B) { decodeBench(b, stream, dst, nil, benchPages) })
	zs := zstdStream(b, mem)
	b.Run("zstd-only", func(b *testing.B) { zstdOnlyDecode(b, zs, len(mem)) })
}

func zstdStream(b *testing.B, mem []byte) [][]byte {
	enc, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(false))
	defer enc.Close()
	var out [][]byte
	batch := DefaultBatchPages * guest.PageSize
	for off := 0; off < len(mem); off += batch {
		out = append(out, enc.EncodeAll(mem[off:min(off+batch, len(mem))], nil))
	}
	return out
}

func zstdOnlyDecode(b *testing.B, frames [][]byte, n int) {
	dec, _ := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
	defer dec.Close()
	var total int64
	for _, f := range frames {
		total += int64(len(f))
	}
	buf := make([]byte, 0, DefaultBatchPages*guest.PageSize)
	b.SetBytes(int64(n))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, f := range frames {
			if _, err := dec.DecodeAll(f, buf[:0]); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.StopTimer()
	reportRatio(b, int64(n), total)
}

var _ = io.Discard

// BenchmarkXORDelta: one page's delta attempt against its cached base,
// per page, for the rewrites the profiles make: 8 bytes, 256 bytes and
// the whole page (fresh random data, which no delta can carry: the
// attempt is pure cost). Beside it, copy of the page (what sending it raw
// costs the encoder at least).
//
//	go test ./checkpoint/ -run '^$' -bench XORDelta -count 5
func BenchmarkXORDelta(b *testing.B) {
	rng := rand.New(rand.NewPCG(5, 6))
	base := make([]byte, guest.PageSize)
	fillRandom(rng, base)
	cases := []struct {
		name    string
		changed int // bytes rewritten at offset 1000 (the whole page if PageSize)
		want    bool
	}{{"8B", 8, true}, {"256B", 256, true}, {"whole-page", guest.PageSize, false}}
	for _, c := range cases {
		page := bytes.Clone(base)
		if c.changed == guest.PageSize {
			fillRandom(rng, page)
		} else {
			fillRandom(rng, page[1000:1000+c.changed])
		}
		b.Run(c.name, func(b *testing.B) {
			dst := make([]byte, 0, 2*guest.PageSize)
			b.SetBytes(guest.PageSize)
			for b.Loop() {
				if _, ok := appendXORDelta(dst[:0], page, base); ok != c.want {
					b.Fatalf("delta accepted %v, want %v", ok, c.want)
				}
			}
		})
	}
	b.Run("copy", func(b *testing.B) {
		dst := make([]byte, guest.PageSize)
		b.SetBytes(guest.PageSize)
		for b.Loop() {
			copy(dst, base)
		}
	})
}
