package replica

import (
	"errors"
	"slices"
)

// Write-through: a fresh migration destination's pages go straight into
// the guest's memory as they arrive, instead of through the staging map
// and a second copy at EndEpoch.
//
// Staging exists so that an epoch that fails before its EPOCH-END is
// verified leaves the committed image as it was: a secondary (or a
// Store) falls back to that image, activates it, or lets its primary
// resume the stream after it. A migration destination promises none of
// that. Its guest is built empty for one stream and never ran; on any
// failure of the stream ReceiveMigrationWith closes it (nothing resumes
// from a half-received migration, the source keeps running its guest),
// and it is activated only after an epoch with machine state has been
// verified and committed. So a failed epoch's pages in its memory are
// never seen by anyone; the Image only has to refuse to go on from them
// (torn: later EndEpochs and Activate fail with ErrTorn).
//
// What does not change: the digest (MemHash, Digest) still moves only at
// EndEpoch, from the hashes of the pages the epoch wrote, so it always
// describes committed epochs; an epoch's device state and disk writes
// are still staged and applied at EndEpoch; XOR bases (PageBase) are the
// guest's pages, which hold the latest version either way.

// ErrTorn is a write-through Image whose open epoch failed after its
// pages were written: its memory is neither the last committed epoch nor
// the failed one, and it must be discarded.
var ErrTorn = errors.New("replica: a failed epoch's pages were written through; the image must be discarded")

// writtenPage is a page written through in the open epoch, kept for the
// digest at EndEpoch.
type writtenPage struct {
	index, sum uint64
	zero       bool
}

// WriteThrough makes pages bypass staging (see above). Only for an image
// whose guest is discarded on any failure of its stream and that one
// goroutine owns until then: a migration destination, or a secondary's
// new image until its first consistent epoch (Secondary.Serve: nobody
// else reads or closes its guest before it is adopted, and on a failure
// Serve closes it and the image held before stays). No Activate or
// Close from another goroutine while it receives.
func (im *Image) WriteThrough() { im.writeThrough = true }

// endWriteThrough makes the next epochs stage their pages again: a
// secondary's image once it is adopted, from then on the image a
// failover activates. Receiving goroutine only, between epochs.
func (im *Image) endWriteThrough() { im.writeThrough = false }

// writePage writes one page of the open epoch into guest memory (dst),
// from the kernel's side (guest.MemWriter): at once, or, between the
// Reader's BatchPages and FlushPages, with the rest of the section. An
// all-zero page is written too, as a staged commit writes it: whether
// dst already reads zero is not known without reading it, and reading a
// never-touched page would map it (Populated would then report it).
func (im *Image) writePage(dst []byte, index uint64, data []byte, sum uint64, zero bool) {
	im.mw.Write(dst, data)
	if !im.batching {
		im.mw.Flush() // the caller's slice is only good during the call
	}
	if limit := 2 * im.pages(); uint64(len(im.written)) >= limit {
		// A peer that sends the same pages again and again within one
		// epoch must not grow the record without bound: only each
		// page's last write counts, and there are at most pages() of
		// those, so compacting leaves room for pages() more writes.
		im.written = lastWrites(im.written)
	}
	im.written = append(im.written, writtenPage{index: index, sum: sum, zero: zero})
}

// BatchPages implements checkpoint.PageBatcher: until FlushPages, the
// write-through pages stored are queued with the Reader's slices.
func (im *Image) BatchPages() { im.batching = true }

// FlushPages implements checkpoint.PageBatcher: the section's
// write-through pages go into memory.
func (im *Image) FlushPages() {
	im.mw.Flush()
	im.batching = false
}

// pages is the guest's page count (the most distinct pages an epoch
// writes).
func (im *Image) pages() uint64 {
	var n uint64
	for _, r := range im.regions {
		n += r.Pages()
	}
	return n
}

// lastWrites keeps each page's last write of w, in the order those last
// writes came (what commitWrittenLocked folds in: the same digest).
func lastWrites(w []writtenPage) []writtenPage {
	seen := make(map[uint64]bool, len(w))
	keep := w[:0:0]
	for i := len(w) - 1; i >= 0; i-- {
		if !seen[w[i].index] {
			seen[w[i].index] = true
			keep = append(keep, w[i])
		}
	}
	slices.Reverse(keep)
	return keep
}

// commitWrittenLocked folds the open epoch's written-through pages into
// the digest, in the order they were written (a page written twice ends
// with its last hash). mu held.
func (im *Image) commitWrittenLocked() {
	for _, w := range im.written {
		im.hash.UpdateHashed(w.index, w.sum, w.zero)
	}
	im.written = im.written[:0]
}

// tearLocked marks the image torn if the epoch being dropped wrote pages
// through. mu held.
func (im *Image) tearLocked() {
	if len(im.written) > 0 {
		im.torn = true
		im.written = im.written[:0]
	}
}
