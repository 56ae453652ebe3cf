package failover

import (
	"fmt"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/precopy"
)

// DefaultVerifySlicePages is the slice of memory a verifying pause
// re-reads: 2 MiB. On memory without zero pages (the worst case:
// BenchmarkVerifySlice) it costs about 0.45 ms a pause on this project's
// machines, 1.25x a plain copy of the same bytes; zero pages are skipped
// at memory speed. It covers a 1 GiB guest every 512 epochs (12.8 s at
// 40 epochs/s).
const DefaultVerifySlicePages = 512

// verifySlice is one pause's re-read of memory: page indices and their
// hashes as the paused guest held them.
type verifySlice struct {
	index []uint64
	hash  []uint64
}

// slicePages is how many pages a pause re-reads after an epoch of length
// epoch: VerifySlicePages per Interval, so memory is covered at the same
// rate per second however short output-triggered epochs get (a full
// slice at every 1 ms pause would make the check most of the pause), and
// never more than VerifySlicePages.
func (l *EpochLoop) slicePages(epoch time.Duration) int {
	n := l.cfg.VerifySlicePages
	if epoch <= 0 || epoch >= l.cfg.Interval {
		return n
	}
	return max(1, int((int64(n)*int64(epoch)+int64(l.cfg.Interval)-1)/int64(l.cfg.Interval)))
}

// readSlice hashes the next n pages of the paused guest, rotating
// through all of memory. Called with the guest paused.
func (l *EpochLoop) readSlice(vs *verifySlice, n int) {
	vs.index, vs.hash = vs.index[:0], vs.hash[:0]
	regions, total := l.cfg.Guest.Regions(), l.guestPages
	if total == 0 {
		return
	}
	pos := l.vcursor % total
	for left := min(uint64(n), total); left > 0; {
		off := pos
		var r guest.Region
		for _, r = range regions {
			if off < r.Pages() {
				break
			}
			off -= r.Pages()
		}
		run := min(left, r.Pages()-off)
		hashSlice(vs, r, off, run)
		left -= run
		pos = (pos + run) % total
	}
	l.vcursor = pos
}

// hashSlice appends pages [off, off+n) of r to vs. A page the host never
// populated is zero and hashed as one without being read: reading it
// would populate it (a fault, and on hosts without a shared zero page a
// fresh page of RAM: 14 to 18 us each on kvm-pvm guests booted with
// pvm_no_zero_page, where a 2 MiB slice of untouched memory made every
// pause 8 to 20 ms until the cursor had gone once round, and the slice
// filled the whole guest's memory in over time). The guest is paused,
// so what is populated cannot change under the scan.
func hashSlice(vs *verifySlice, r guest.Region, off, n uint64) {
	sub := r.Sub(off, n)
	first := r.FirstPage() + off
	next := uint64(0) // pages of sub hashed so far
	zeros := func(upTo uint64) {
		for ; next < upTo; next++ {
			vs.index = append(vs.index, first+next)
			vs.hash = append(vs.hash, 0) // PageHash of a zero page
		}
	}
	read := func(upTo uint64) {
		for ; next < upTo; next++ {
			vs.index = append(vs.index, first+next)
			vs.hash = append(vs.hash, guest.PageHash(first+next, sub.Mem[next<<guest.PageShift:(next+1)<<guest.PageShift]))
		}
	}
	err := guest.Populated(sub, func(start, m uint64) error {
		zeros(start)
		read(start + m)
		return nil
	})
	if err != nil {
		read(n) // the scan failed part way: read the rest, as before it
		return
	}
	zeros(n)
}

// verifyCapture records a capture's pages in the digest of what was
// shipped, checks the pause's slice against it, and returns the epoch's
// digest (memory as shipped, plus the captured machine state). A slice
// page that differs was written without the dirty log noticing: the
// secondary never got that write, so the replica has diverged.
func (l *EpochLoop) verifyCapture(shipped *guest.MemHash, cp *precopy.Capture, vs *verifySlice) string {
	for _, p := range cp.Pages {
		shipped.Update(p.Index, p.Data)
	}
	for i, idx := range vs.index {
		if shipped.Page(idx) != vs.hash[i] {
			l.mu.Lock()
			last := l.shipped
			l.mu.Unlock()
			l.step(ProtectionEvent{Kind: EvMismatch, Epoch: last, Now: l.clk.Now(),
				Why: fmt.Sprintf("page %d differs from what was shipped: a write escaped dirty tracking (found by the rotating check after epoch %d)", idx, last)})
			break
		}
	}
	return guest.CombineDigest(shipped.Sum(), cp.State).String()
}
