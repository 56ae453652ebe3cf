package precopy

import (
	"math/bits"
	"sync/atomic"

	"github.com/tandemvm/tandem/guest"
)

// Geometry. A chunk holds chunkWords words (8 KiB, 256 MiB of guest memory)
// and is allocated the first time one of its pages is dirtied, so a huge,
// mostly clean guest costs a pointer per chunk. Each chunk carries a summary
// with one bit per word; the Bitmap carries a top level with one bit per
// chunk. Walks descend top -> summary -> word and so cost time in proportion
// to the dirty words.
const (
	chunkShift   = 10
	chunkWords   = 1 << chunkShift
	chunkPages   = chunkWords * 64
	summaryWords = chunkWords / 64
	wordMask     = chunkWords - 1
	allOnes      = ^uint64(0)
)

// MaxPages is the largest Len a Bitmap can have: 2^36 pages of 4 KiB is a
// 256 TiB guest, well beyond what any hypervisor runs today. NewBitmap clamps
// larger sizes to it, which keeps the chunk table (allocated up front) at
// most 8 MiB; a 64 TiB guest's costs 2 MiB.
const MaxPages = uint64(1) << 36

type chunk struct {
	words [chunkWords]uint64
	// summary bit k%64 of summary[k/64] is set whenever words[k] is
	// non-zero. It may also be set for a zero word (stale); every reader
	// tolerates that and clearing methods tidy it away.
	summary [summaryWords]uint64
}

// Bitmap is a dirty-page bitmap: one bit per 4 KiB guest page, page indices
// uint64 throughout.
//
// Concurrency. Set, Test, TestAndClear, OrWords, NextSet, ForEach, Count,
// TakeBatch, ClearRange and Clear are safe for concurrent use: each bit
// changes by an atomic operation, so a page is never lost and a page is
// taken (TakeBatch, TestAndClear) by at most one caller per time it was set.
// A walk (NextSet, ForEach, Count, TakeBatch) that runs while another
// goroutine clears bits may miss a page set during the walk; that page stays
// set and the next walk finds it. With no concurrent clearing, a walk sees
// every page whose Set or OrWords returned before the walk began.
//
// OrCount is the bulk path and uses plain loads and stores to run at memory
// speed. Precondition: no other goroutine uses the destination or writes the
// source during the call.
//
// The invariant behind the summaries: whoever makes a word non-zero sets the
// word's summary bit and then the chunk's top bit; whoever clears a summary
// bit (or a top bit) re-reads what it covers afterwards and sets the bit
// again if it finds anything. Since Go's atomics are sequentially
// consistent, a non-zero word always ends up with both bits set.
type Bitmap struct {
	pages     uint64
	nwords    uint64 // ceil(pages/64)
	fullWords uint64 // words whose 64 bits all lie below pages
	tailMask  uint64 // valid bits of word fullWords when pages%64 != 0
	chunks    []atomic.Pointer[chunk]
	top       []uint64 // bit ci%64 of top[ci/64]: chunk ci may be dirty; atomic access
}

var _ guest.DirtyLog = (*Bitmap)(nil)

// NewBitmap returns an all-clean bitmap for pages pages (clamped to
// MaxPages). Only the chunk table and top level are allocated up front
// (8 bytes per 256 MiB of guest); chunks are allocated on first dirty.
func NewBitmap(pages uint64) *Bitmap {
	if pages > MaxPages {
		pages = MaxPages
	}
	nwords := (pages + 63) / 64
	nchunks := (nwords + chunkWords - 1) / chunkWords
	b := &Bitmap{
		pages:     pages,
		nwords:    nwords,
		fullWords: pages / 64,
		tailMask:  uint64(1)<<(pages%64) - 1,
		chunks:    make([]atomic.Pointer[chunk], nchunks),
		top:       make([]uint64, (nchunks+63)/64),
	}
	return b
}

// Len is the number of pages the bitmap covers.
func (b *Bitmap) Len() uint64 { return b.pages }

// chunkFor returns chunk ci, allocating it if no one has yet.
func (b *Bitmap) chunkFor(ci uint64) *chunk {
	p := &b.chunks[ci]
	if c := p.Load(); c != nil {
		return c
	}
	c := new(chunk)
	if p.CompareAndSwap(nil, c) {
		return c
	}
	return p.Load()
}

// mark sets the summary bit of word k of chunk ci and then the chunk's top
// bit. Call it after making the word non-zero. The loads first keep the
// common case (bits already set) free of locked instructions.
func (b *Bitmap) mark(ci uint64, c *chunk, k uint64) {
	sw, sbit := &c.summary[k>>6], uint64(1)<<(k&63)
	if atomic.LoadUint64(sw)&sbit == 0 {
		atomic.OrUint64(sw, sbit)
	}
	b.markTop(ci)
}

func (b *Bitmap) markTop(ci uint64) {
	tw, tbit := &b.top[ci>>6], uint64(1)<<(ci&63)
	if atomic.LoadUint64(tw)&tbit == 0 {
		atomic.OrUint64(tw, tbit)
	}
}

// tidyBlock clears the summary bits z of summary word j of chunk ci, whose
// words the caller found zero, then puts back the bits of any word that
// became non-zero meanwhile. It reports whether the summary word may now be
// zero, in which case the caller should tidyTop the chunk.
func (b *Bitmap) tidyBlock(ci uint64, c *chunk, j uint64, z uint64) bool {
	if hookBeforeTidy != nil {
		hookBeforeTidy("block")
	}
	sw := &c.summary[j]
	old := atomic.AndUint64(sw, ^z)
	var back uint64
	for m := old & z; m != 0; m &= m - 1 {
		k := j*64 + uint64(bits.TrailingZeros64(m))
		if atomic.LoadUint64(&c.words[k]) != 0 {
			back |= m & -m
		}
	}
	if back != 0 {
		atomic.OrUint64(sw, back)
		b.markTop(ci)
		return false
	}
	return old&^z == 0
}

// hookBeforeTidy, when set by a test, runs between a clearer zeroing a word
// and tidying its summary bit ("block"), and between a summary word going
// zero and tidying the chunk's top bit ("top"): the windows a racing Set
// must survive.
var hookBeforeTidy func(level string)

// tidyTop clears chunk ci's top bit if its whole summary is zero, by the
// same clear-then-recheck rule as tidyBlock.
func (b *Bitmap) tidyTop(ci uint64, c *chunk) {
	if hookBeforeTidy != nil {
		hookBeforeTidy("top")
	}
	tw, tbit := &b.top[ci>>6], uint64(1)<<(ci&63)
	if atomic.AndUint64(tw, ^tbit)&tbit == 0 {
		return
	}
	for j := range c.summary {
		if atomic.LoadUint64(&c.summary[j]) != 0 {
			atomic.OrUint64(tw, tbit)
			return
		}
	}
}

// Set marks page dirty and reports whether it was clean before. Pages at or
// beyond Len are ignored and report false.
func (b *Bitmap) Set(page uint64) bool {
	if page >= b.pages {
		return false
	}
	wi := page >> 6
	ci, k := wi>>chunkShift, wi&wordMask
	c := b.chunkFor(ci)
	bit := uint64(1) << (page & 63)
	old := atomic.OrUint64(&c.words[k], bit)
	b.mark(ci, c, k)
	return old&bit == 0
}

// Test reports whether page is dirty; false for pages at or beyond Len.
func (b *Bitmap) Test(page uint64) bool {
	if page >= b.pages {
		return false
	}
	wi := page >> 6
	c := b.chunks[wi>>chunkShift].Load()
	if c == nil {
		return false
	}
	return atomic.LoadUint64(&c.words[wi&wordMask])&(uint64(1)<<(page&63)) != 0
}

// TestAndClear clears page and reports whether it was dirty; false for
// pages at or beyond Len.
func (b *Bitmap) TestAndClear(page uint64) bool {
	if page >= b.pages {
		return false
	}
	wi := page >> 6
	ci, k := wi>>chunkShift, wi&wordMask
	c := b.chunks[ci].Load()
	if c == nil {
		return false
	}
	bit := uint64(1) << (page & 63)
	if atomic.LoadUint64(&c.words[k])&bit == 0 {
		return false
	}
	old := atomic.AndUint64(&c.words[k], ^bit)
	if old&bit == 0 {
		return false
	}
	if old == bit && b.tidyBlock(ci, c, k>>6, uint64(1)<<(k&63)) {
		b.tidyTop(ci, c)
	}
	return true
}

// nextChunk returns the first chunk index >= ci whose top bit is set.
func (b *Bitmap) nextChunk(ci uint64) (uint64, bool) {
	n := uint64(len(b.chunks))
	for ci < n {
		tw := ci >> 6
		t := atomic.LoadUint64(&b.top[tw]) & (allOnes << (ci & 63))
		if t != 0 {
			return tw*64 + uint64(bits.TrailingZeros64(t)), true
		}
		ci = (tw + 1) * 64
	}
	return 0, false
}

// nextMarked returns the first word index >= wi whose summary bit is set,
// with its chunk. The word itself may be zero (stale summary).
func (b *Bitmap) nextMarked(wi uint64) (uint64, *chunk, bool) {
	for wi < b.nwords {
		ci, ok := b.nextChunk(wi >> chunkShift)
		if !ok {
			return 0, nil, false
		}
		if ci != wi>>chunkShift {
			wi = ci << chunkShift
		}
		c := b.chunks[ci].Load()
		if c != nil {
			k := wi & wordMask
			first := allOnes << (k & 63)
			for j := k >> 6; j < summaryWords; j++ {
				s := atomic.LoadUint64(&c.summary[j]) & first
				first = allOnes
				if s != 0 {
					return ci<<chunkShift + j*64 + uint64(bits.TrailingZeros64(s)), c, true
				}
			}
		}
		wi = (ci + 1) << chunkShift
	}
	return 0, nil, false
}

// NextSet returns the first dirty page >= from, or false if there is none.
func (b *Bitmap) NextSet(from uint64) (uint64, bool) {
	if from >= b.pages {
		return 0, false
	}
	wi := from >> 6
	mask := allOnes << (from & 63)
	for {
		mi, c, ok := b.nextMarked(wi)
		if !ok {
			return 0, false
		}
		if mi != wi {
			mask = allOnes
		}
		if w := atomic.LoadUint64(&c.words[mi&wordMask]) & mask; w != 0 {
			return mi*64 + uint64(bits.TrailingZeros64(w)), true
		}
		wi, mask = mi+1, allOnes
	}
}

// ForEach calls fn for every dirty page in ascending order until fn returns
// false. fn may call any method of b except OrCount, including clearing the
// page it was given.
func (b *Bitmap) ForEach(fn func(page uint64) bool) {
	for wi := uint64(0); ; wi++ {
		mi, c, ok := b.nextMarked(wi)
		if !ok {
			return
		}
		w := atomic.LoadUint64(&c.words[mi&wordMask])
		for ; w != 0; w &= w - 1 {
			if !fn(mi*64 + uint64(bits.TrailingZeros64(w))) {
				return
			}
		}
		wi = mi
	}
}

// Count returns the number of dirty pages, in time proportional to the
// dirty words.
func (b *Bitmap) Count() uint64 {
	var n uint64
	for ci, ok := b.nextChunk(0); ok; ci, ok = b.nextChunk(ci + 1) {
		c := b.chunks[ci].Load()
		if c == nil {
			continue
		}
		for j := range c.summary {
			s := atomic.LoadUint64(&c.summary[j])
			for ; s != 0; s &= s - 1 {
				k := j*64 + bits.TrailingZeros64(s)
				n += uint64(bits.OnesCount64(atomic.LoadUint64(&c.words[k])))
			}
		}
	}
	return n
}

// TakeBatch is how senders drain the bitmap. It clears up to len(dst) dirty
// pages at or after from, writes their indices to dst in ascending order,
// and returns how many it took and where the next call should start. When
// n < len(dst) no dirty page at or after from was left (next is Len); an
// empty dst takes nothing and returns next = min(from, Len). A page
// dirtied behind next is found by the next pass starting from 0. Each page
// is claimed by an atomic AND, so several senders may drain one bitmap at
// once without sending a page twice for one Set.
//
//	for from := uint64(0); ; {
//		n, next := b.TakeBatch(buf, from)
//		send(buf[:n])
//		if n < len(buf) { break }
//		from = next
//	}
func (b *Bitmap) TakeBatch(dst []uint64, from uint64) (n int, next uint64) {
	if from >= b.pages {
		return 0, b.pages
	}
	if len(dst) == 0 {
		return 0, from
	}
	wi := from >> 6
	mask := allOnes << (from & 63)
	for n < len(dst) {
		mi, c, ok := b.nextMarked(wi)
		if !ok {
			break
		}
		if mi != wi {
			mask = allOnes
		}
		ci, k := mi>>chunkShift, mi&wordMask
		wp := &c.words[k]
		zeroed := false
		for n < len(dst) {
			w := atomic.LoadUint64(wp)
			if w == 0 {
				zeroed = true
				break
			}
			w &= mask
			if w == 0 {
				break
			}
			take := w
			if room := len(dst) - n; bits.OnesCount64(w) > room {
				take = lowBits(w, room)
			}
			old := atomic.AndUint64(wp, ^take)
			for got := old & take; got != 0; got &= got - 1 {
				dst[n] = mi*64 + uint64(bits.TrailingZeros64(got))
				n++
			}
			if old&^take == 0 {
				zeroed = true
				break
			}
		}
		if zeroed && b.tidyBlock(ci, c, k>>6, uint64(1)<<(k&63)) {
			b.tidyTop(ci, c)
		}
		wi, mask = mi+1, allOnes
	}
	if n < len(dst) {
		return n, b.pages
	}
	return n, dst[n-1] + 1
}

// lowBits returns the r lowest set bits of w; r < OnesCount64(w).
func lowBits(w uint64, r int) uint64 {
	var out uint64
	for ; r > 0; r-- {
		out |= w & -w
		w &= w - 1
	}
	return out
}

// ClearRange marks pages [first, first+n) clean; the part at or beyond Len
// is ignored. It costs time in proportion to the dirty words in the range.
func (b *Bitmap) ClearRange(first, n uint64) {
	if first >= b.pages || n == 0 {
		return
	}
	end := first + n
	if end < first || end > b.pages {
		end = b.pages
	}
	fw, lw := first>>6, (end-1)>>6
	headMask := allOnes << (first & 63)
	tailMask := allOnes >> (63 - (end-1)&63)
	for ci, ok := b.nextChunk(fw >> chunkShift); ok && ci <= lw>>chunkShift; ci, ok = b.nextChunk(ci + 1) {
		c := b.chunks[ci].Load()
		if c == nil {
			continue
		}
		base := ci << chunkShift
		kLo, kHi := uint64(0), uint64(chunkWords-1)
		if fw > base {
			kLo = fw - base
		}
		if lw < base+chunkWords-1 {
			kHi = lw - base
		}
		emptied := false
		for j := kLo >> 6; j <= kHi>>6; j++ {
			s := atomic.LoadUint64(&c.summary[j])
			if j == kLo>>6 {
				s &= allOnes << (kLo & 63)
			}
			if j == kHi>>6 {
				s &= allOnes >> (63 - kHi&63)
			}
			var zeroed uint64
			for ; s != 0; s &= s - 1 {
				k := j*64 + uint64(bits.TrailingZeros64(s))
				m := allOnes
				if base+k == fw {
					m &= headMask
				}
				if base+k == lw {
					m &= tailMask
				}
				w := atomic.LoadUint64(&c.words[k])
				if w&m != 0 {
					w = atomic.AndUint64(&c.words[k], ^m) &^ m
				}
				if w == 0 {
					zeroed |= s & -s
				}
			}
			if zeroed != 0 && b.tidyBlock(ci, c, j, zeroed) {
				emptied = true
			}
		}
		if emptied {
			b.tidyTop(ci, c)
		}
	}
}

// Clear marks every page clean, in time proportional to the dirty words.
// Chunks stay allocated for the next round.
func (b *Bitmap) Clear() { b.ClearRange(0, b.pages) }
