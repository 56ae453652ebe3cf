package checkpoint

import "time"

// Leaving the delta cache alone while it wins nothing.
//
// Every non-zero page sent is copied into the delta cache (the
// receiver's copy, a base for its next send) and, when the cache holds
// an older copy, XORed against it. A guest that rewrites whole pages
// with fresh data (the worst profile: random 4 KiB writes) never gets a
// delta worth sending, and at 100,000 pages/s the copy and the failed
// XOR scans were a quarter of a primary's encoding (perf, 2026-12-01).
// So the writer counts, among the pages that had a base, those sent as
// deltas; when fewer than 1 in bypassMinWin of bypassWindow such pages
// won, the next bypassPages non-zero pages (or those of the next
// bypassTime, if that ends first: a slow writer would otherwise go
// without deltas for minutes) skip the cache: no lookup, no copy, and
// their slots are invalidated, which keeps the cache's
// invariant (a tagged slot holds exactly what the receiver holds). Then
// the cache is used again, and the pages sent since re-seed it; a
// workload whose pages become deltable wins again within a window of
// pages with bases.
//
// Pages sent for the first time have no base and are not counted, so a
// migration's first pass or a catch-up (which fill the cache for the
// rounds after) never turns it off.
const (
	bypassWindow = 1024
	bypassMinWin = 64
)

// bypassPages is how long a bypass lasts, in pages (vars for tests):
// 2.6 s at 100,000 pages/s; bypassTime bounds it in time.
var bypassPages = 1 << 18

var bypassTime = 3 * time.Second

// endStaleBypass ends a bypass older than bypassTime; WritePages calls
// it once per call.
func (w *Writer) endStaleBypass() {
	if w.bypass > 0 && time.Since(w.bypassFrom) > bypassTime {
		w.bypass = 0
	}
}

// deltaBase is the cached base for page index, or nil: none cached, or
// the cache is being bypassed.
func (w *Writer) deltaBase(index uint64) []byte {
	if w.bypass > 0 {
		return nil
	}
	return w.cache.get(index)
}

// noteDelta counts a page that had a base; won: it went as a delta.
func (w *Writer) noteDelta(won bool) {
	w.deltaTried++
	if won {
		w.deltaWon++
	}
	if w.deltaTried < bypassWindow {
		return
	}
	if w.deltaWon*bypassMinWin < w.deltaTried {
		w.bypass, w.bypassFrom = bypassPages, time.Now()
		w.bypasses++
	}
	w.deltaTried, w.deltaWon = 0, 0
}

// CacheBypasses is how many times the writer has turned to bypassing
// its delta cache.
func (w *Writer) CacheBypasses() uint64 { return w.bypasses }
