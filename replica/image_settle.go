package replica

// Acknowledging an epoch before its pages are copied into memory.
//
// A staging Image commits an epoch in two parts: the digest, the state
// and the epoch number (what the acknowledgement reports), and the copy
// of every staged page into the guest's memory. At 100,000 whole-page
// rewrites a second the copy was most of a secondary's commit (1.3 to
// 1.6 us a page into huge pages, 5 to 12 us into 4 KiB pages on a
// kvm-pvm host), and the primary's output waited for it. With
// AckBeforeCopy, EndEpoch does the first part and leaves the copy to
// Settle, which the receiving goroutine calls once the acknowledgement
// is written (and before anything reads the memory or stages the next
// epoch: every Target method that stages or reads, Discard and the
// Store's reads of memory settle first; Prefault needs not, as it does
// nothing on a staging image). A secondary with a Store settles before
// the store's writes and fsync (which precede the acknowledgement under
// --sync disk, and follow it under --sync memory), so that an
// activation, which waits for the copy, never waits for the disk: with
// a data directory the copy stays in front of the acknowledgement, as
// before. Until then committing stays set, so Activate and Close wait for
// the copy exactly as they wait for a commit's disk writes: a guest is
// never handed over or closed with an acknowledged epoch missing from
// its memory. The acknowledgement's promise is the same as before: the
// epoch is whole in this process's memory (staged, then copied), and
// under --sync disk the store has it before the acknowledgement (the
// Store settles before it copies the commit out).

// AckBeforeCopy makes EndEpoch leave the copy of a staged epoch's pages
// to Settle. Receiving goroutine only, before the stream starts.
func (im *Image) AckBeforeCopy() { im.ackBeforeCopy = true }

// Settle copies the last committed epoch's staged pages into memory if
// EndEpoch left them (AckBeforeCopy), and lets Activate and Close go on.
// A no-op otherwise. Receiving goroutine only.
func (im *Image) Settle() {
	if !im.copyPending {
		return
	}
	// Both without mu, so status readers do not wait for the copy:
	// committing holds off Activate and Close, and nothing else touches
	// the staging or the guest's memory.
	im.prefaultStaged()
	im.copyStaged()
	im.mu.Lock()
	im.copyPending = false
	im.committing = false
	im.idle.Broadcast()
	im.mu.Unlock()
}

// copyStaged copies the staged pages into memory and empties the
// staging for the next epoch. mu held, or committing set (Settle).
func (im *Image) copyStaged() {
	for idx, p := range im.staged {
		im.mw.Write(im.page(idx), p.data)
		im.free = append(im.free, p.data) // reused only after the Flush below
	}
	im.mw.Flush()
	im.trimStaging()
	im.stagedBytes = 0
}
