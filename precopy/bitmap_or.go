package precopy

import (
	"math/bits"
	"sync/atomic"
)

// OrWords implements guest.DirtyLog: bit i of words[j] marks page
// firstPage+64*j+i dirty. It returns how many pages were newly dirtied.
// Bits for pages at or beyond Len are ignored. firstPage should be a
// multiple of 64; other values work, more slowly. Zero words cost a load
// each; non-zero words one atomic OR.
func (b *Bitmap) OrWords(firstPage uint64, words []uint64) uint64 {
	if firstPage >= b.pages {
		return 0
	}
	fw, shift := firstPage>>6, firstPage&63
	var n uint64
	for j, w := range words {
		if w == 0 {
			continue
		}
		wi := fw + uint64(j)
		if wi >= b.nwords {
			break
		}
		if shift == 0 {
			n += b.orWord(wi, w)
			continue
		}
		n += b.orWord(wi, w<<shift)
		if wi+1 < b.nwords {
			n += b.orWord(wi+1, w>>(64-shift))
		}
	}
	return n
}

// orWord ORs w into word wi (< nwords) and returns the newly set count.
func (b *Bitmap) orWord(wi, w uint64) uint64 {
	if wi == b.fullWords {
		w &= b.tailMask
	}
	if w == 0 {
		return 0
	}
	ci, k := wi>>chunkShift, wi&wordMask
	c := b.chunkFor(ci)
	old := atomic.OrUint64(&c.words[k], w)
	b.mark(ci, c, k)
	return uint64(bits.OnesCount64(w &^ old))
}

// OrCount ORs src into b and returns how many pages were newly dirtied
// (popcount of src AND NOT b), in one pass. Pages of src at or beyond
// b.Len() are ignored. It walks src's summaries, so a sparse src costs time
// in proportion to its dirty words; runs of dense words go through a
// word-at-a-time kernel.
//
// Precondition: no other goroutine uses b or writes src during the call.
func (b *Bitmap) OrCount(src *Bitmap) uint64 {
	if src == nil || src == b {
		return 0
	}
	nch := uint64(min(len(b.chunks), len(src.chunks)))
	limit := min(b.fullWords, src.nwords) // words ORed whole
	var n uint64
	for tw := uint64(0); tw*64 < nch; tw++ {
		t := src.top[tw]
		if rest := nch - tw*64; rest < 64 {
			t &= uint64(1)<<rest - 1
		}
		for ; t != 0; t &= t - 1 {
			ci := tw*64 + uint64(bits.TrailingZeros64(t))
			base := ci << chunkShift
			if base >= limit {
				break
			}
			sc := src.chunks[ci].Load()
			if sc == nil {
				continue
			}
			n += b.orChunk(ci, sc, min(chunkWords, limit-base))
		}
	}
	// The partial last word of b, if any, is ORed through its mask.
	if b.fullWords < b.nwords && b.fullWords < src.nwords {
		wi := b.fullWords
		if sc := src.chunks[wi>>chunkShift].Load(); sc != nil {
			if w := sc.words[wi&wordMask] & b.tailMask; w != 0 {
				ci, k := wi>>chunkShift, wi&wordMask
				dc := b.chunkFor(ci)
				n += uint64(bits.OnesCount64(w &^ dc.words[k]))
				dc.words[k] |= w
				dc.summary[k>>6] |= uint64(1) << (k & 63)
				b.top[ci>>6] |= uint64(1) << (ci & 63)
			}
		}
	}
	return n
}

// orChunk ORs the first nw words of src chunk sc into chunk ci of b.
// Consecutive dense summary words form a run handed to orCountWords in one
// call; words of sparse summary words are ORed one by one.
func (b *Bitmap) orChunk(ci uint64, sc *chunk, nw uint64) uint64 {
	var dc *chunk
	var n uint64
	runStart := -1 // first word of the pending dense run
	nj := int((nw + 63) / 64)
	for j := 0; j < nj; j++ {
		s := sc.summary[j]
		lo := j * 64
		if last := nw - uint64(lo); last < 64 {
			s &= uint64(1)<<last - 1
		}
		dense := bits.OnesCount64(s) >= 48
		if runStart >= 0 && !dense {
			n += orCountWords(dc.words[runStart:lo], sc.words[runStart:lo])
			runStart = -1
		}
		if s == 0 {
			continue
		}
		if dc == nil {
			dc = b.chunkFor(ci)
		}
		if dense {
			// OR the whole block, zero words and all: cheaper than
			// picking out the few clean ones.
			if runStart < 0 {
				runStart = lo
			}
			dc.summary[j] |= s
			continue
		}
		for ; s != 0; s &= s - 1 {
			k := lo + bits.TrailingZeros64(s)
			w := sc.words[k]
			if w == 0 {
				continue
			}
			d := dc.words[k]
			n += uint64(bits.OnesCount64(w &^ d))
			dc.words[k] = d | w
			dc.summary[j] |= s & -s
		}
	}
	if runStart >= 0 {
		n += orCountWords(dc.words[runStart:nw], sc.words[runStart:nw])
	}
	if dc != nil {
		b.top[ci>>6] |= uint64(1) << (ci & 63)
	}
	return n
}

// orCountWordsGeneric is the portable kernel: dst |= src, returning the
// number of bits set in src and not in dst. len(dst) must equal len(src).
func orCountWordsGeneric(dst, src []uint64) uint64 {
	dst = dst[:len(src)]
	var n0, n1, n2, n3 int
	i := 0
	for ; i+4 <= len(src); i += 4 {
		s := src[i : i+4 : i+4]
		d := dst[i : i+4 : i+4]
		s0, s1, s2, s3 := s[0], s[1], s[2], s[3]
		d0, d1, d2, d3 := d[0], d[1], d[2], d[3]
		n0 += bits.OnesCount64(s0 &^ d0)
		n1 += bits.OnesCount64(s1 &^ d1)
		n2 += bits.OnesCount64(s2 &^ d2)
		n3 += bits.OnesCount64(s3 &^ d3)
		d[0], d[1], d[2], d[3] = d0|s0, d1|s1, d2|s2, d3|s3
	}
	for ; i < len(src); i++ {
		n0 += bits.OnesCount64(src[i] &^ dst[i])
		dst[i] |= src[i]
	}
	return uint64(n0 + n1 + n2 + n3)
}
