package replica

import (
	"slices"

	"github.com/tandemvm/tandem/guest"
)

// Populating the guest's memory ahead of the pages an epoch stores.
//
// An Image's guest is built empty: none of its memory is populated, and
// the first write to each page takes a page fault. A migration's round 0
// or a joining secondary's catch-up writes hundreds of thousands of
// pages for the first time; one MADV_POPULATE_WRITE per run of them
// (guest.PrefaultWrite) costs a twentieth of the faults on a kvm-pvm
// host and less everywhere. The Image remembers which pages it has
// populated so (populated, a bit per page): a steady epoch stream
// rewrites pages it holds already and makes no call at all. The record
// is only a hint: a page populated elsewhere is populated again for
// nothing (cheap), a page the kernel dropped faults as before.

// Prefault implements checkpoint.Prefaulter: a write-through image
// populates the run's pages it has not yet populated before the Reader
// writes them. A staging image writes memory only at EndEpoch, which
// populates there (prefaultStaged).
func (im *Image) Prefault(first, n uint64) {
	if im.writeThrough {
		im.prefaultRun(first, n, im.huge)
	}
}

// prefaultRun populates the pages of [first, first+n) not populated yet,
// a call per sub-run, and records them; with huge, whole 2 MiB blocks as
// huge pages. Receiving goroutine only.
func (im *Image) prefaultRun(first, n uint64, huge bool) {
	limit := guest.PageLimit(im.regions)
	if im.populated == nil {
		im.populated = make([]uint64, (limit+63)/64)
	}
	end := min(first+n, limit)
	for p := first; p < end; {
		if im.populated[p/64]&(1<<(p%64)) != 0 {
			p++
			continue
		}
		q := p
		for q < end && im.populated[q/64]&(1<<(q%64)) == 0 {
			im.populated[q/64] |= 1 << (q % 64)
			q++
		}
		h := huge && q-p >= guest.HugeBlockPages && im.hugeRuns < maxHugeRuns
		if h {
			im.hugeRuns++
		}
		guest.PrefaultPages(im.regions, p, q-p, h)
		p = q
	}
}

// maxHugeRuns bounds the runs an Image advises as huge pages: each may
// split the guest's mapping once (guest.PrefaultWrite).
const maxHugeRuns = 4096

// prefaultStaged populates, before a commit copies the staged pages into
// memory, those of them not populated yet, in runs of consecutive pages.
// Once every page the stream rewrites is populated it costs a bit test
// per staged page. Never huge pages: this runs under mu, and a huge
// page's allocation may compact memory first (THP defrag=madvise).
func (im *Image) prefaultStaged() {
	fresh := im.fresh[:0]
	for idx := range im.staged {
		if im.populated == nil || idx/64 >= uint64(len(im.populated)) || im.populated[idx/64]&(1<<(idx%64)) == 0 {
			fresh = append(fresh, idx)
		}
	}
	im.fresh = fresh
	if len(fresh) == 0 {
		return
	}
	slices.Sort(fresh)
	for i := 0; i < len(fresh); {
		j := i + 1
		for j < len(fresh) && fresh[j] == fresh[j-1]+1 {
			j++
		}
		im.prefaultRun(fresh[i], uint64(j-i), false)
		i = j
	}
}
