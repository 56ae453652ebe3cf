package precopy

import (
	"math/rand/v2"
	"testing"
	"time"
)

// The dense benchmarks use the bitmap of a 16 GiB guest (2^22 pages,
// 512 KiB of bits) filled with random words: the worst case for a sync,
// every word dirty. OrCount, the per-bit loop and copy run over the same
// bytes, and BenchmarkBitmapOrCount also times the other two in the same
// run and reports the ratios (x-copy: OrCount's bytes/s over copy's;
// x-perbit: how many times faster than the per-bit loop).
const densePages = 1 << 22

type denseData struct {
	src, dst   *Bitmap
	srcW, dstW []uint64 // the same bits as flat slices, for the baselines
}

func newDense() *denseData {
	rng := rand.New(rand.NewPCG(1, 2))
	d := &denseData{src: NewBitmap(densePages), dst: NewBitmap(densePages)}
	d.srcW, d.dstW = make([]uint64, densePages/64), make([]uint64, densePages/64)
	for i := range d.srcW {
		d.srcW[i], d.dstW[i] = rng.Uint64(), rng.Uint64()
	}
	d.src.OrWords(0, d.srcW)
	d.dst.OrWords(0, d.dstW)
	return d
}

// orCountPerBit is the naive reference: test and set one bit at a time.
func orCountPerBit(dst, src []uint64) uint64 {
	var n uint64
	for i := 0; i < len(src)*64; i++ {
		w, m := i>>6, uint64(1)<<(i&63)
		if src[w]&m != 0 && dst[w]&m == 0 {
			dst[w] |= m
			n++
		}
	}
	return n
}

func BenchmarkBitmapOrCount(b *testing.B) {
	d := newDense()
	b.SetBytes(densePages / 8)
	b.ResetTimer()
	for b.Loop() {
		d.dst.OrCount(d.src)
	}
	b.StopTimer()
	orPer := float64(b.Elapsed()) / float64(b.N)

	reps := max(b.N, 20)
	start := time.Now()
	for range reps {
		copy(d.dstW, d.srcW)
	}
	copyPer := float64(time.Since(start)) / float64(reps)

	start = time.Now()
	orCountPerBit(d.dstW, d.srcW)
	perBit := float64(time.Since(start))

	b.ReportMetric(copyPer/orPer, "x-copy")
	b.ReportMetric(perBit/orPer, "x-perbit")
}

func BenchmarkBitmapOrCountPerBit(b *testing.B) {
	d := newDense()
	b.SetBytes(densePages / 8)
	b.ResetTimer()
	for b.Loop() {
		orCountPerBit(d.dstW, d.srcW)
	}
}

func BenchmarkBitmapCopy(b *testing.B) {
	d := newDense()
	b.SetBytes(densePages / 8)
	b.ResetTimer()
	for b.Loop() {
		copy(d.dstW, d.srcW)
	}
}

// BenchmarkBitmapSparseSync is one round on an 8 TiB guest (2^31 pages)
// with 1,000 dirty pages: OrCount the guest's log into the round's bitmap,
// then drain it with TakeBatch as a sender would. Both walk summaries, so
// the round costs in proportion to the 1,000 pages, not the 2^31.
func BenchmarkBitmapSparseSync(b *testing.B) {
	const pages = 1 << 31
	rng := rand.New(rand.NewPCG(3, 4))
	log, round := NewBitmap(pages), NewBitmap(pages)
	for dirty := 0; dirty < 1000; {
		if log.Set(rng.Uint64N(pages)) {
			dirty++
		}
	}
	buf := make([]uint64, 256)
	b.ResetTimer()
	for b.Loop() {
		if n := round.OrCount(log); n != 1000 {
			b.Fatalf("OrCount = %d, want 1000", n)
		}
		taken := 0
		for from := uint64(0); ; {
			n, next := round.TakeBatch(buf, from)
			taken += n
			if n < len(buf) {
				break
			}
			from = next
		}
		if taken != 1000 {
			b.Fatalf("took %d pages, want 1000", taken)
		}
	}
}
