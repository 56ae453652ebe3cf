package checkpoint

import (
	"bytes"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// TestCacheBypass: whole-page rewrites with fresh data turn the delta
// cache off for a while (no page goes as a delta, none needs to); a
// first pass over pages sent once never does; once the bypass ends,
// small changes go as deltas again; and through all of it the receiver
// ends with exactly the sender's pages (no delta against a base it was
// never sent).
func TestCacheBypass(t *testing.T) {
	defer func(n int, d time.Duration) { bypassPages, bypassTime = n, d }(bypassPages, bypassTime)
	bypassPages = 4096
	bypassTime = time.Hour // only the page count ends a bypass, until the end
	const pages = 2048
	rng := rand.New(rand.NewPCG(9, 9))
	mem := make([][]byte, pages)
	for i := range mem {
		mem[i] = make([]byte, guest.PageSize)
		fillRandom(rng, mem[i])
	}
	var buf bytes.Buffer
	w, err := NewWriter(&buf, testHeader(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	var epoch uint64
	send := func(idx []int) EpochSummary {
		t.Helper()
		ps := make([]Page, len(idx))
		for i, x := range idx {
			ps[i] = Page{Index: uint64(x), Data: bytes.Clone(mem[x])}
		}
		if err := w.WritePages(ps); err != nil {
			t.Fatal(err)
		}
		epoch++
		s, err := w.EndEpoch(epoch)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	all := make([]int, pages)
	for i := range all {
		all[i] = i
	}
	small := func() EpochSummary { // a few bytes of every page
		for _, p := range mem {
			p[rng.IntN(guest.PageSize)]++
		}
		return send(all)
	}
	send(all) // the first pass: no page has a base
	if n := w.CacheBypasses(); n != 0 {
		t.Fatalf("a first pass turned the cache off %d times", n)
	}
	if s := small(); s.Encodings.XOR != pages {
		t.Fatalf("small changes after the first pass: %d of %d pages as deltas", s.Encodings.XOR, pages)
	}
	// Whole rewrites: after a window of failed deltas the cache is off.
	for range 2 {
		for _, p := range mem {
			fillRandom(rng, p)
		}
		send(all)
	}
	if w.CacheBypasses() != 1 || w.bypass == 0 {
		t.Fatalf("after %d whole rewrites: %d bypasses, %d pages left", 2*pages, w.CacheBypasses(), w.bypass)
	}
	// While bypassed, small changes go whole: the pages sent meanwhile
	// left the cache, so no stale base may be used.
	if s := small(); s.Encodings.XOR != 0 {
		t.Fatalf("%d deltas while the cache is bypassed", s.Encodings.XOR)
	}
	// The bypass (4,096 pages) ran out half way through the last epoch;
	// the pages sent since seed the cache again, and deltas come back.
	small()
	if w.bypass != 0 {
		t.Fatalf("bypass still on, %d pages left", w.bypass)
	}
	small() // seeds
	if s := small(); s.Encodings.XOR != pages {
		t.Fatalf("after the bypass: %d of %d pages as deltas", s.Encodings.XOR, pages)
	}
	// A bypass ends after bypassTime even if its pages are not used up.
	for range 2 {
		for _, p := range mem {
			fillRandom(rng, p)
		}
		send(all)
	}
	if w.CacheBypasses() != 2 || w.bypass == 0 {
		t.Fatalf("second run of whole rewrites: %d bypasses, %d pages left", w.CacheBypasses(), w.bypass)
	}
	bypassTime = 3 * time.Second
	w.bypassFrom = w.bypassFrom.Add(-bypassTime - time.Second)
	small() // ends the bypass first: these pages are remembered
	if w.bypass != 0 {
		t.Fatalf("a bypass older than %v still on", bypassTime)
	}
	if s := small(); s.Encodings.XOR != pages {
		t.Fatalf("after a bypass that timed out: %d of %d pages as deltas", s.Encodings.XOR, pages)
	}
	if err := w.EndStream(); err != nil {
		t.Fatal(err)
	}
	tgt := NewMemTarget()
	if _, err := Restore(bytes.NewReader(buf.Bytes()), Limits{}, tgt); err != nil {
		t.Fatal(err)
	}
	for i, p := range mem {
		if !bytes.Equal(tgt.Page(uint64(i)), p) {
			t.Fatalf("page %d differs at the receiver", i)
		}
	}
}
