package precopy

import "sync"

// DirtyTap shares a guest's dirty log between two users. Reading the log
// clears it, so only one Core may read it: the owner (a protected
// guest's epoch loop), which adds to its tap every page each of its
// syncs found dirty (Core.SetTap). The other (a migration of that guest,
// Core.From) takes them from the tap instead of the log. What the tap
// holds is a superset of the pages written since the last take (the
// owner's pending pages come with them), which only costs pages sent
// twice.
type DirtyTap struct {
	mu sync.Mutex
	b  *Bitmap
	// spare is the emptied bitmap take swaps in (nil while a take
	// works on it).
	spare *Bitmap
}

// NewDirtyTap makes an empty tap for a guest of pages pages (the length
// of its Cores' Dirty).
func NewDirtyTap(pages uint64) *DirtyTap {
	return &DirtyTap{b: NewBitmap(pages), spare: NewBitmap(pages)}
}

// add marks every page set in src.
func (t *DirtyTap) add(src *Bitmap) {
	t.mu.Lock()
	t.b.OrCount(src)
	t.mu.Unlock()
}

// take marks in dst every page the tap holds, empties the tap and
// returns how many pages were new in dst.
func (t *DirtyTap) take(dst *Bitmap) uint64 {
	// add runs inside the owner's epoch pause: take swaps in the empty
	// spare under mu and merges and clears the full bitmap outside it.
	t.mu.Lock()
	full := t.b
	t.b, t.spare = t.spare, nil
	if t.b == nil { // another take holds the spare
		t.b = NewBitmap(full.Len())
	}
	t.mu.Unlock()
	n := dst.OrCount(full)
	full.Clear()
	t.mu.Lock()
	t.spare = full
	t.mu.Unlock()
	return n
}
