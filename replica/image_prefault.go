package replica

import (
	"slices"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/precopy"
)

// Populating the guest's memory ahead of the pages an epoch stores.
//
// An Image's guest is built empty: none of its memory is populated, and
// the first write to each page takes a page fault. A migration's round 0
// or a joining secondary's catch-up writes hundreds of thousands of
// pages for the first time; one MADV_POPULATE_WRITE per run of them
// (guest.PrefaultWrite) costs a twentieth of the faults on a kvm-pvm
// host and less everywhere. The Image remembers which pages it has
// populated so (populated, a sparse bitmap): a steady epoch stream
// rewrites pages it holds already and makes no call at all. The record
// is only a hint: a page populated elsewhere is populated again for
// nothing (cheap), a page the kernel dropped faults as before.

// Prefault implements checkpoint.Prefaulter: a write-through image
// populates the run's pages it has not yet populated before the Reader
// writes them. A staging image notes its fresh pages as they are staged
// (noteStaged) and populates them when it commits (prefaultStaged).
func (im *Image) Prefault(first, n uint64) {
	if !im.writeThrough {
		return
	}
	im.prefaultAhead(first, n, im.huge)
}

// prefaultAhead is prefaultRun of the part of [first, first+n) a running
// populateAhead has not done; the part it did is recorded.
func (im *Image) prefaultAhead(first, n uint64, huge bool) {
	if a := im.ahead.Load(); a != nil {
		from := a.from(first, n)
		pop := im.populatedPages()
		for p := first; p < from; p++ {
			pop.Set(p)
		}
		first, n = from, first+n-from
	}
	im.prefaultRun(first, n, huge)
}

// populatedPages is the record of pages populated ahead of writes, made
// on first use.
func (im *Image) populatedPages() *precopy.Bitmap {
	if im.populated == nil {
		im.populated = precopy.NewBitmap(guest.PageLimit(im.regions))
	}
	return im.populated
}

// prefaultRun populates the pages of [first, first+n) not populated yet,
// a call per run of them, and records them; with huge, whole 2 MiB
// blocks as huge pages. Receiving goroutine only.
func (im *Image) prefaultRun(first, n uint64, huge bool) {
	pop := im.populatedPages()
	end := min(first+n, pop.Len())
	for p := first; p < end; {
		q := p
		for q < end && pop.Set(q) { // newly set: not populated before
			q++
		}
		if q > p {
			h := huge && q-p >= guest.HugeBlockPages && im.hugeRuns < maxHugeRuns
			if h {
				im.hugeRuns++
			}
			guest.PrefaultPages(im.regions, p, q-p, h)
		}
		p = q + 1 // page q was populated already (or q is end)
	}
}

// adviseWholeWrites advises huge pages, once, on the ranges the guest
// writes every page of (guest.WholeWriter), where its memory takes them:
// a secondary's adopted image, whose commits copy each epoch into
// memory. At 100,000 whole-page rewrites a second a commit's copy into
// 4 KiB pages long populated cost 5 to 12 us a page on a kvm-pvm host
// (the hypervisor's shadow page tables), 1.3 to 1.6 us into huge pages
// (2026-12-01). Not before the image is adopted: a catch-up's first
// touch of fresh memory already takes huge pages in the runs the
// primary names (populateAhead), and advising the whole range from the
// start made a migration destination zero more huge pages of memory the
// host had not backed (total 0.81-1.04 s -> 1.23-1.37 s, the same day).
// Receiving goroutine only.
//
// Not where the image takes no huge pages (NewImage: its writes come
// from the kernel's side, which the advice would not speed up).
func (im *Image) adviseWholeWrites() {
	if im.wholeAdvised || !im.huge {
		return
	}
	im.wholeAdvised = true
	guest.AdviseWholeWrites(im.g)
}

// maxHugeRuns bounds the runs an Image advises as huge pages: each may
// split the guest's mapping once (guest.PrefaultWrite).
const maxHugeRuns = 4096

// noteStaged records a page newly staged in the open epoch if it has not
// been populated, for prefaultStaged. Receiving goroutine only.
func (im *Image) noteStaged(index uint64) {
	if !im.populatedPages().Test(index) {
		im.fresh = append(im.fresh, index)
	}
}

// prefaultStaged populates the open epoch's fresh staged pages, in runs
// of consecutive pages, before the commit copies them into memory; an
// epoch of pages the image holds already has none. EndEpoch (or, behind
// the acknowledgement, Settle) calls it without mu (committing keeps the
// guest from being handed over or closed meanwhile). It never advises
// huge pages itself, since a huge page's allocation may compact memory
// first (THP defrag=madvise); but memory the guest advised already takes
// them here too: the runs a populateAhead advised, and the range an
// adopted image advised (adviseWholeWrites), whose first write to each 2 MiB
// block may then wait for compaction once, on a staged epoch's copy
// behind the acknowledgement or during a write-through catch-up, which
// holds no output.
func (im *Image) prefaultStaged() {
	fresh := im.fresh
	im.fresh = im.fresh[:0]
	slices.Sort(fresh)
	for i := 0; i < len(fresh); {
		j := i + 1
		for j < len(fresh) && fresh[j] == fresh[j-1]+1 {
			j++
		}
		im.prefaultAhead(fresh[i], uint64(j-i), false)
		i = j
	}
}
