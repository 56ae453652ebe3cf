package precopy

import (
	"fmt"
	"math/bits"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
)

// ref is the obviously correct model every Bitmap test compares against.
type ref map[uint64]bool

func (r ref) sorted() []uint64 {
	out := make([]uint64, 0, len(r))
	for p := range r {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

func collect(b *Bitmap) []uint64 {
	out := []uint64{}
	b.ForEach(func(p uint64) bool { out = append(out, p); return true })
	return out
}

// checkSame compares b with r through every read path and checks the
// summary invariant.
func checkSame(t *testing.T, b *Bitmap, r ref) {
	t.Helper()
	want := r.sorted()
	if got := collect(b); !slices.Equal(got, want) {
		t.Fatalf("ForEach = %v, want %v", trim(got), trim(want))
	}
	if got := b.Count(); got != uint64(len(want)) {
		t.Fatalf("Count = %d, want %d", got, len(want))
	}
	var viaNext []uint64
	for p, ok := b.NextSet(0); ok; p, ok = b.NextSet(p + 1) {
		viaNext = append(viaNext, p)
		if p+1 == 0 {
			break
		}
	}
	if len(viaNext) != len(want) || (len(want) > 0 && !slices.Equal(viaNext, want)) {
		t.Fatalf("NextSet walk = %v, want %v", trim(viaNext), trim(want))
	}
	for _, p := range want {
		if !b.Test(p) {
			t.Fatalf("Test(%d) = false, want true", p)
		}
	}
	checkInvariants(t, b)
}

func trim(s []uint64) []uint64 {
	if len(s) > 20 {
		return s[:20]
	}
	return s
}

// checkInvariants checks, with nothing running concurrently, that every
// non-zero word has its summary and top bits and that no bit lies at or
// beyond Len.
func checkInvariants(t *testing.T, b *Bitmap) {
	t.Helper()
	for ci := range b.chunks {
		c := b.chunks[ci].Load()
		if c == nil {
			if b.top[ci/64]&(1<<(ci%64)) != 0 {
				t.Fatalf("top bit of unallocated chunk %d set", ci)
			}
			continue
		}
		for k, w := range c.words {
			if w == 0 {
				continue
			}
			wi := uint64(ci)*chunkWords + uint64(k)
			if wi >= b.nwords || (wi == b.fullWords && w&^b.tailMask != 0) {
				t.Fatalf("bit beyond Len %d set in word %d: %#x", b.pages, wi, w)
			}
			if c.summary[k/64]&(1<<(k%64)) == 0 {
				t.Fatalf("word %d non-zero but its summary bit is clear", wi)
			}
			if b.top[ci/64]&(1<<(ci%64)) == 0 {
				t.Fatalf("chunk %d has a non-zero word but its top bit is clear", ci)
			}
		}
	}
}

// checkTidy checks that a bitmap with no dirty page has no stale top bit
// left, so the next walk over it costs nothing.
func checkTidy(t *testing.T, b *Bitmap) {
	t.Helper()
	for i, w := range b.top {
		if w != 0 {
			t.Fatalf("clean bitmap has top word %d = %#x", i, w)
		}
	}
}

const past32 = uint64(1)<<32 + 3*chunkPages + 77

func TestBitmapTable(t *testing.T) {
	sizes := []uint64{1, 63, 64, 65, 4097, chunkPages - 1, chunkPages, chunkPages + 1, 3*chunkPages + 5, past32}
	for _, n := range sizes {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			b := NewBitmap(n)
			if b.Len() != n {
				t.Fatalf("Len = %d, want %d", b.Len(), n)
			}
			r := ref{}
			cands := []uint64{0, 1, 62, 63, 64, 65, 127, 4095, chunkPages - 1, chunkPages, chunkPages + 64,
				1<<31 - 1, 1 << 31, 1<<32 - 1, 1 << 32, 1<<32 + 1, 1<<32 + 64, n - 65, n - 64, n - 2, n - 1, n, n + 1, n + 64, 1 << 40, ^uint64(0)}
			for _, p := range cands {
				want := p < n && !r[p]
				if got := b.Set(p); got != want {
					t.Fatalf("Set(%d) = %v, want %v", p, got, want)
				}
				if p < n {
					r[p] = true
				}
				if b.Set(p) {
					t.Fatalf("second Set(%d) reported newly set", p)
				}
			}
			checkSame(t, b, r)
			for _, p := range cands {
				if got := b.Test(p); got != r[p] {
					t.Fatalf("Test(%d) = %v, want %v", p, got, r[p])
				}
			}
			// Clear every other candidate one by one.
			for i, p := range r.sorted() {
				if i%2 == 0 {
					if !b.TestAndClear(p) {
						t.Fatalf("TestAndClear(%d) = false", p)
					}
					if b.TestAndClear(p) {
						t.Fatalf("second TestAndClear(%d) = true", p)
					}
					delete(r, p)
				}
			}
			checkSame(t, b, r)
			b.Clear()
			checkSame(t, b, ref{})
			checkTidy(t, b)
		})
	}
}

// TestBitmapRandomOps runs random operation sequences against the model,
// on small bitmaps and on one past 2^32 pages whose pages cluster in a few
// windows (so chunk boundaries and the 2^32 edge are hit often).
func TestBitmapRandomOps(t *testing.T) {
	type cfg struct {
		pages   uint64
		windows []uint64 // starts of 3*chunkPages-page windows pages are drawn from
	}
	cfgs := []cfg{
		{pages: 1000, windows: []uint64{0}},
		{pages: 3*chunkPages + 37, windows: []uint64{0}},
		{pages: past32, windows: []uint64{0, 1<<31 - chunkPages, 1<<32 - 2*chunkPages, past32 - 3*chunkPages}},
	}
	for ci, c := range cfgs {
		for seed := uint64(1); seed <= 4; seed++ {
			t.Run(fmt.Sprintf("cfg%d/seed%d", ci, seed), func(t *testing.T) {
				rng := rand.New(rand.NewPCG(seed, uint64(ci)))
				b := NewBitmap(c.pages)
				r := ref{}
				page := func() uint64 {
					w := c.windows[rng.IntN(len(c.windows))]
					span := min(uint64(3*chunkPages), c.pages-w)
					p := w + rng.Uint64N(span+2) // sometimes Len or Len+1
					return p
				}
				for step := 0; step < 3000; step++ {
					switch op := rng.IntN(100); {
					case op < 40:
						p := page()
						want := p < c.pages && !r[p]
						if got := b.Set(p); got != want {
							t.Fatalf("step %d: Set(%d) = %v, want %v", step, p, got, want)
						}
						if p < c.pages {
							r[p] = true
						}
					case op < 55:
						p := page()
						want := r[p]
						if got := b.TestAndClear(p); got != want {
							t.Fatalf("step %d: TestAndClear(%d) = %v, want %v", step, p, got, want)
						}
						delete(r, p)
					case op < 65:
						first := page()
						var n uint64
						switch rng.IntN(4) {
						case 0:
							n = rng.Uint64N(70)
						case 1:
							n = rng.Uint64N(3 * chunkPages)
						case 2:
							n = ^uint64(0) // overflows first+n
						default:
							n = rng.Uint64N(200)
						}
						b.ClearRange(first, n)
						for p := range r {
							if p >= first && (p-first < n) {
								delete(r, p)
							}
						}
					case op < 80:
						first := page()
						if rng.IntN(3) > 0 {
							first &^= 63
						}
						words := make([]uint64, 1+rng.IntN(5))
						for j := range words {
							switch rng.IntN(3) {
							case 0:
							case 1:
								words[j] = allOnes
							default:
								words[j] = rng.Uint64() & rng.Uint64()
							}
						}
						var want uint64
						for j, w := range words {
							for ; w != 0; w &= w - 1 {
								p := first + 64*uint64(j) + uint64(bits.TrailingZeros64(w))
								if p < c.pages && !r[p] {
									r[p] = true
									want++
								}
							}
						}
						if got := b.OrWords(first, words); got != want {
							t.Fatalf("step %d: OrWords(%d, %x) = %d, want %d", step, first, words, got, want)
						}
					case op < 90:
						from := page()
						buf := make([]uint64, rng.IntN(40))
						n, next := b.TakeBatch(buf, from)
						var want []uint64
						for _, p := range r.sorted() {
							if p >= from && len(want) < len(buf) {
								want = append(want, p)
							}
						}
						if !slices.Equal(buf[:n], want) {
							t.Fatalf("step %d: TakeBatch(len %d, %d) = %v, want %v", step, len(buf), from, buf[:n], want)
						}
						wantNext := c.pages
						if n == len(buf) && n > 0 {
							wantNext = want[n-1] + 1
						}
						if len(buf) == 0 {
							wantNext = min(from, c.pages)
						}
						if next != wantNext {
							t.Fatalf("step %d: TakeBatch next = %d, want %d", step, next, wantNext)
						}
						for _, p := range want {
							delete(r, p)
						}
					case op < 97:
						from := page()
						var want uint64
						found := false
						for _, p := range r.sorted() {
							if p >= from {
								want, found = p, true
								break
							}
						}
						got, ok := b.NextSet(from)
						if ok != found || got != want {
							t.Fatalf("step %d: NextSet(%d) = %d,%v want %d,%v", step, from, got, ok, want, found)
						}
					default:
						checkSame(t, b, r)
					}
				}
				checkSame(t, b, r)
				b.Clear()
				checkSame(t, b, ref{})
				checkTidy(t, b)
			})
		}
	}
}

// fill dirties b in one of several patterns and returns the model.
func fill(rng *rand.Rand, b *Bitmap, pattern int) ref {
	r := ref{}
	set := func(p uint64) {
		if b.Set(p) != (p < b.Len() && !r[p]) {
			panic("Set disagrees with the model")
		}
		if p < b.Len() {
			r[p] = true
		}
	}
	n := b.Len()
	switch pattern {
	case 0: // empty
	case 1: // sparse
		for i := 0; i < 50; i++ {
			set(rng.Uint64N(n))
		}
	case 2: // dense random over a few long runs, via OrWords
		for i := 0; i < 3; i++ {
			start := rng.Uint64N(n) &^ 63
			words := make([]uint64, 1+rng.IntN(700)) // up to 10 summary words: dense runs
			for j := range words {
				words[j] = rng.Uint64()
			}
			b.OrWords(start, words)
			for j, w := range words {
				for ; w != 0; w &= w - 1 {
					if p := start + 64*uint64(j) + uint64(bits.TrailingZeros64(w)); p < n {
						r[p] = true
					}
				}
			}
		}
	default: // mixed: dense blocks with holes, then clear some back
		for i := 0; i < 4000; i++ {
			set(rng.Uint64N(min(n, 70000)))
		}
		for i := 0; i < 20; i++ {
			first, cnt := rng.Uint64N(n), rng.Uint64N(500)
			b.ClearRange(first, cnt)
			for p := range r {
				if p >= first && p-first < cnt {
					delete(r, p)
				}
			}
		}
	}
	return r
}

// TestOrCountProperty checks OrCount against the model for random pairs
// of bitmaps of equal and unequal sizes and assorted densities.
func TestOrCountProperty(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	sizes := []uint64{1, 64, 100, 4096*64 + 13, chunkPages, 2*chunkPages + 63, 3 * chunkPages}
	for iter := 0; iter < 120; iter++ {
		dn, sn := sizes[rng.IntN(len(sizes))], sizes[rng.IntN(len(sizes))]
		dp, sp := rng.IntN(4), rng.IntN(4)
		dst, src := NewBitmap(dn), NewBitmap(sn)
		rd, rs := fill(rng, dst, dp), fill(rng, src, sp)
		var want uint64
		for p := range rs {
			if p < dn && !rd[p] {
				rd[p] = true
				want++
			}
		}
		if got := dst.OrCount(src); got != want {
			t.Fatalf("iter %d (dst %d/%d, src %d/%d): OrCount = %d, want %d", iter, dn, dp, sn, sp, got, want)
		}
		checkSame(t, dst, rd)
		checkSame(t, src, rs)
		if got := dst.OrCount(src); got != 0 {
			t.Fatalf("iter %d: second OrCount = %d, want 0", iter, got)
		}
	}
}

// TestOrCountPast2to32 syncs a sparse source with pages beyond 2^32 into
// bitmaps of the same and of smaller size.
func TestOrCountPast2to32(t *testing.T) {
	src := NewBitmap(past32)
	pages := []uint64{5, 1<<31 + 3, 1<<32 - 1, 1 << 32, 1<<32 + 64*chunkWords, past32 - 1}
	for _, p := range pages {
		src.Set(p)
	}
	dst := NewBitmap(past32)
	dst.Set(1 << 32)
	if got := dst.OrCount(src); got != uint64(len(pages)-1) {
		t.Fatalf("OrCount = %d, want %d", got, len(pages)-1)
	}
	r := ref{}
	for _, p := range pages {
		r[p] = true
	}
	checkSame(t, dst, r)

	small := NewBitmap(1<<32 + 1) // partial last word: only page 2^32 of the tail fits
	if got := small.OrCount(src); got != 4 {
		t.Fatalf("OrCount into smaller = %d, want 4", got)
	}
	checkSame(t, small, ref{5: true, 1<<31 + 3: true, 1<<32 - 1: true, 1 << 32: true})
}

func TestOutOfRange(t *testing.T) {
	b := NewBitmap(100)
	for _, p := range []uint64{100, 101, 128, 1 << 40, ^uint64(0)} {
		if b.Set(p) || b.Test(p) || b.TestAndClear(p) {
			t.Fatalf("page %d beyond Len reported set", p)
		}
		if _, ok := b.NextSet(p); ok {
			t.Fatalf("NextSet(%d) found a page", p)
		}
	}
	if n := b.OrWords(64, []uint64{allOnes, allOnes, allOnes}); n != 36 {
		t.Fatalf("OrWords clipped at Len set %d, want 36", n)
	}
	if n := b.OrWords(1<<63, []uint64{allOnes}); n != 0 {
		t.Fatalf("OrWords far beyond Len set %d", n)
	}
	if n := b.OrWords(^uint64(0)-63, []uint64{allOnes}); n != 0 {
		t.Fatalf("OrWords at the top of uint64 set %d", n)
	}
	b.ClearRange(90, ^uint64(0))
	if b.Count() != 26 {
		t.Fatalf("Count after ClearRange(90, max) = %d, want 26", b.Count())
	}
	if n, next := b.TakeBatch(nil, 7); n != 0 || next != 7 {
		t.Fatalf("TakeBatch(nil) = %d, %d", n, next)
	}
	if n, next := b.TakeBatch(make([]uint64, 4), 1000); n != 0 || next != 100 {
		t.Fatalf("TakeBatch past Len = %d, %d", n, next)
	}
	checkInvariants(t, b)

	z := NewBitmap(0)
	z.Set(0)
	z.OrWords(0, []uint64{1})
	z.ClearRange(0, 10)
	if z.Count() != 0 || z.OrCount(b) != 0 || b.OrCount(z) != 0 || b.OrCount(nil) != 0 {
		t.Fatal("empty bitmap is not empty")
	}
	if got := NewBitmap(MaxPages + 1).Len(); got != MaxPages {
		t.Fatalf("Len of oversized bitmap = %d, want %d", got, MaxPages)
	}
}

// TestOrWordsMisaligned checks the shifted path of OrWords.
func TestOrWordsMisaligned(t *testing.T) {
	for shift := uint64(1); shift < 64; shift += 7 {
		b := NewBitmap(300)
		first := 64 + shift
		n := b.OrWords(first, []uint64{1 | 1<<63, allOnes})
		want := ref{first: true, first + 63: true}
		for i := uint64(0); i < 64; i++ {
			if p := first + 64 + i; p < 300 {
				want[p] = true
			}
		}
		if n != uint64(len(want)) {
			t.Fatalf("shift %d: OrWords = %d, want %d", shift, n, len(want))
		}
		checkSame(t, b, want)
	}
}

// TestConcurrentSet has writers race on overlapping pages while readers
// walk: each page must be reported newly set exactly once.
func TestConcurrentSet(t *testing.T) {
	const pages = 3*chunkPages + 100
	b := NewBitmap(pages)
	var newly atomic.Uint64
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			for i := 0; i < 20000; i++ {
				p := rng.Uint64N(pages)
				if i%3 == 0 {
					p = uint64(i) % 5000 // hot pages every writer hits
				}
				if b.Set(p) {
					newly.Add(1)
				}
				if i%1000 == 0 {
					w := rng.Uint64()
					newly.Add(b.OrWords(rng.Uint64N(pages)&^63, []uint64{w}))
				}
			}
		}(g)
	}
	var readers sync.WaitGroup
	readers.Add(1)
	go func() {
		defer readers.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			prev := uint64(0)
			first := true
			b.ForEach(func(p uint64) bool {
				if !first && p <= prev {
					t.Errorf("ForEach out of order: %d after %d", p, prev)
				}
				prev, first = p, false
				return true
			})
			_ = b.Count()
			b.NextSet(rand.Uint64N(pages))
		}
	}()
	wg.Wait()
	close(stop)
	readers.Wait()
	if got := b.Count(); got != newly.Load() {
		t.Fatalf("Count = %d, but Set/OrWords reported %d newly set", got, newly.Load())
	}
	checkInvariants(t, b)
}

// TestConcurrentTake races setters against several TakeBatch drainers and
// TestAndClear: every time a page is newly set it must be taken exactly
// once, and nothing may be lost.
func TestConcurrentTake(t *testing.T) {
	const pages = 2*chunkPages + 4096
	b := NewBitmap(pages)
	var setCount, takeCount [pages]atomic.Int32
	var setters, takers sync.WaitGroup
	done := make(chan struct{})
	for g := 0; g < 3; g++ {
		setters.Add(1)
		go func(g int) {
			defer setters.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 2))
			for i := 0; i < 30000; i++ {
				p := rng.Uint64N(pages)
				if i%2 == 0 {
					p = rng.Uint64N(300) // contended
				}
				if i%4 == 1 {
					p = chunkPages - 64 + rng.Uint64N(128) // contended, across a chunk edge
				}
				if b.Set(p) {
					setCount[p].Add(1)
				}
			}
		}(g)
	}
	take := func(buf []uint64) int {
		total := 0
		for from := uint64(0); ; {
			n, next := b.TakeBatch(buf, from)
			for _, p := range buf[:n] {
				takeCount[p].Add(1)
			}
			total += n
			if n < len(buf) {
				return total
			}
			from = next
		}
	}
	for g := 0; g < 2; g++ {
		takers.Add(1)
		go func(g int) {
			defer takers.Done()
			buf := make([]uint64, 1+g*37)
			for {
				select {
				case <-done:
					return
				default:
				}
				take(buf)
				if p := rand.Uint64N(pages); b.TestAndClear(p) {
					takeCount[p].Add(1)
				}
			}
		}(g)
	}
	setters.Wait()
	close(done)
	takers.Wait()
	// A lost summary or top bit would hide a dirty word from every walk,
	// so look at the raw words before draining.
	checkInvariants(t, b)
	take(make([]uint64, 64))
	if c := b.Count(); c != 0 {
		t.Fatalf("%d pages left after the final drain", c)
	}
	checkTidy(t, b)
	for p := range setCount {
		if s, k := setCount[p].Load(), takeCount[p].Load(); s != k {
			t.Fatalf("page %d newly set %d times but taken %d times", p, s, k)
		}
	}
}

// TestKernels runs every OrCount kernel built for this architecture, and
// the portable one, against a per-bit loop.
func TestKernels(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	for _, k := range kernels() {
		t.Run(k.name, func(t *testing.T) {
			for n := 0; n < 300; n += 1 + n/8 {
				src, dst := make([]uint64, n), make([]uint64, n)
				for i := range src {
					src[i], dst[i] = rng.Uint64()&rng.Uint64(), rng.Uint64()
					if i%7 == 0 {
						src[i] = allOnes
					}
				}
				want := slices.Clone(dst)
				var wantN uint64
				for i := range src {
					for bit := 0; bit < 64; bit++ {
						if src[i]>>bit&1 == 1 && want[i]>>bit&1 == 0 {
							want[i] |= 1 << bit
							wantN++
						}
					}
				}
				if got := k.fn(dst, src); got != wantN || !slices.Equal(dst, want) {
					t.Fatalf("n=%d: count %d want %d, equal words %v", n, got, wantN, slices.Equal(dst, want))
				}
			}
		})
	}
}

// TestHugeSparse uses two bitmaps of MaxPages (a 256 TiB guest): setting,
// syncing and draining a handful of pages must touch only their chunks.
func TestHugeSparse(t *testing.T) {
	log, round := NewBitmap(MaxPages), NewBitmap(MaxPages)
	pages := []uint64{0, 1<<32 + 5, 1 << 35, MaxPages - 1}
	for _, p := range pages {
		log.Set(p)
	}
	if n := round.OrCount(log); n != uint64(len(pages)) {
		t.Fatalf("OrCount = %d, want %d", n, len(pages))
	}
	allocated := 0
	for i := range round.chunks {
		if round.chunks[i].Load() != nil {
			allocated++
		}
	}
	if allocated != len(pages) {
		t.Fatalf("%d chunks allocated for %d pages", allocated, len(pages))
	}
	buf := make([]uint64, 3)
	n, next := round.TakeBatch(buf, 0)
	if n != 3 || !slices.Equal(buf, pages[:3]) || next != pages[2]+1 {
		t.Fatalf("TakeBatch = %d %v next %d", n, buf, next)
	}
	if n, next = round.TakeBatch(buf, next); n != 1 || buf[0] != MaxPages-1 || next != MaxPages {
		t.Fatalf("second TakeBatch = %d %v next %d", n, buf[:n], next)
	}
	checkSame(t, round, ref{})
	checkTidy(t, round)
	log.Clear()
	checkTidy(t, log)
}

// TestSetDuringTidy makes a Set land in the windows between a clearer
// zeroing a word and clearing that word's summary bit, and between a
// summary word going zero and clearing the chunk's top bit. The Set sees
// the bit still set and does not set it again, so only the clearer's
// re-check keeps the page visible.
func TestSetDuringTidy(t *testing.T) {
	for _, level := range []string{"block", "top"} {
		for _, clear := range []string{"TestAndClear", "TakeBatch", "ClearRange"} {
			t.Run(level+"/"+clear, func(t *testing.T) {
				b := NewBitmap(10000)
				b.Set(130)
				racer := uint64(131) // same word
				if level == "top" {
					racer = 5000 // same chunk, another summary word
				}
				hookBeforeTidy = func(l string) {
					if l == level {
						hookBeforeTidy = nil
						b.Set(racer)
					}
				}
				defer func() { hookBeforeTidy = nil }()
				switch clear {
				case "TestAndClear":
					b.TestAndClear(130)
				case "TakeBatch":
					b.TakeBatch(make([]uint64, 1), 0)
				default:
					b.ClearRange(130, 1)
				}
				if hookBeforeTidy != nil {
					t.Fatal("the clear did not tidy")
				}
				checkSame(t, b, ref{racer: true})
			})
		}
	}
}
