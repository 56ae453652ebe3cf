package replica

import (
	"slices"
	"sync"
	"sync/atomic"

	"github.com/tandemvm/tandem/guest"
)

// Populating a migration destination's memory ahead of the stream.
//
// A destination stores every resident page of the source into memory
// its host has never backed. Where the host is itself a virtual machine,
// that first touch is most of the destination's work: 39 to 59 % of its
// CPU was the kernel zeroing fresh huge pages (perf on `tandem receive`,
// 2026-12-01, a kvm-pvm guest host), done by the receiving goroutine
// between reading one section and the next, while the other core sat
// partly idle. The source knows which memory it holds: it names its long
// resident runs in the Hello (ResidentHint), and the destination
// populates them on a goroutine of its own while the stream arrives
// (populateAhead), so zeroing overlaps receiving.
//
// It changes no content: MADV_POPULATE_WRITE backs a missing page with
// zeros and leaves a present page alone, so a page the stream stored
// first keeps its data and a populated page the stream never stores
// stays zero, as the source's (it was resident there, so the
// destination's footprint does not outgrow the source's). Only runs of
// at least MinResidentRun pages are named: scattered pages of a sparse
// guest are populated as they arrive, as before.

// MinResidentRun and MaxResidentRuns bound Hello.Resident: runs of at
// least a huge page, at most 1,024 of them (about 30 KiB of JSON, well
// inside a control line).
const (
	MinResidentRun  = guest.HugeBlockPages
	MaxResidentRuns = 1024
)

// aheadChunk is the pages populated per call: short enough that a stop
// waits little, long enough that calls are few (4 MiB).
const aheadChunk = 1024

// ResidentHint is the runs of at least MinResidentRun pages the host
// holds of g's memory, as [first page, pages] in guest page indices,
// ascending, at most MaxResidentRuns of them (the first ones).
func ResidentHint(g guest.Guest) [][2]uint64 {
	var runs [][2]uint64
	for _, r := range g.Regions() {
		_ = guest.Populated(r, func(first, n uint64) error {
			if n >= MinResidentRun && len(runs) < MaxResidentRuns {
				runs = append(runs, [2]uint64{r.FirstPage() + first, n})
			}
			return nil
		})
	}
	return runs
}

// aheadRuns is a peer's Hello.Resident made safe to act on: at most
// MaxResidentRuns runs, each clipped to the guest's regions (a run
// across two regions becomes two), ascending and disjoint. Runs that
// break the order, or fall outside memory, are dropped: it is a hint.
func aheadRuns(hint [][2]uint64, regions []guest.Region) [][2]uint64 {
	var out [][2]uint64
	var next uint64 // runs must start at or after it
	for _, h := range hint[:min(len(hint), MaxResidentRuns)] {
		first, n := h[0], h[1]
		if n == 0 || first+n < first || first < next {
			continue
		}
		for _, r := range regions {
			lo, hi := max(first, r.FirstPage()), min(first+n, r.FirstPage()+r.Pages())
			if lo < hi {
				out = append(out, [2]uint64{lo, hi - lo})
			}
		}
		next = first + n
	}
	slices.SortFunc(out, func(a, b [2]uint64) int { return cmpUint(a[0], b[0]) })
	return out
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// ahead is a running populateAhead.
type ahead struct {
	runs [][2]uint64
	// done: every page of runs below it is populated. recv: the
	// receiving goroutine has populated (or is populating) its runs up to
	// here itself, so the goroutine skips what lies below.
	done, recv atomic.Uint64
	stop       chan struct{}
	wg         sync.WaitGroup
}

// populateAhead starts populating the hinted runs (aheadRuns) of the
// image's memory on a goroutine, in order, ahead of the receiving
// goroutine's writes, and returns the function that stops it and waits
// for it (one call of at most aheadChunk pages). Only for a write-through
// image, before the first epoch is read; the returned stop must run
// before the guest is closed or handed over.
func (im *Image) populateAhead(hint [][2]uint64) (stop func()) {
	runs := aheadRuns(hint, im.regions)
	if len(runs) == 0 || !im.writeThrough || !guest.PrefaultSupported() {
		return func() {}
	}
	a := &ahead{runs: runs, stop: make(chan struct{})}
	im.ahead = a
	regions, huge := im.regions, im.huge
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.run(regions, huge)
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(a.stop)
			a.wg.Wait()
			im.ahead = nil
		})
	}
}

// run populates a.runs in chunks, skipping what the receiving goroutine
// has reached, until done or stopped.
func (a *ahead) run(regions []guest.Region, huge bool) {
	for _, run := range a.runs {
		end := run[0] + run[1]
		for p := run[0]; p < end; {
			select {
			case <-a.stop:
				return
			default:
			}
			q := min((p/aheadChunk+1)*aheadChunk, end)
			if r := a.recv.Load(); r > p {
				p = min(r, q) // the receiver did this part
			}
			if p < q {
				guest.PrefaultPages(regions, p, q-p, huge)
			}
			a.done.Store(q)
			p = q
		}
	}
}

// from is the first page of [first, first+n) the receiving goroutine
// must populate itself: past what the goroutine has done, when the run
// lies inside one hinted run (a run across a gap populates itself whole).
// It records that the receiver reaches first+n.
func (a *ahead) from(first, n uint64) uint64 {
	end := first + n
	if end > a.recv.Load() {
		a.recv.Store(end) // receiving goroutine only: no other writer
	}
	i, _ := slices.BinarySearchFunc(a.runs, first, func(r [2]uint64, p uint64) int {
		return cmpUint(r[0]+r[1], p+1)
	})
	if i == len(a.runs) || a.runs[i][0] > first || a.runs[i][0]+a.runs[i][1] < end {
		return first
	}
	return min(max(first, a.done.Load()), end)
}
