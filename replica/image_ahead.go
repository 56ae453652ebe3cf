package replica

import (
	"cmp"
	"errors"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/tandemvm/tandem/guest"
)

// Populating a receiver's memory ahead of the stream.
//
// A migration destination, or a secondary catching up, stores every
// resident page of the sender into memory its host has never backed.
// Where the host is itself a virtual machine, that first touch is most
// of the receiver's work: 39 to 59 % of a destination's CPU was the
// kernel zeroing fresh huge pages (perf on `tandem receive`, 2026-12-01,
// a kvm-pvm guest host), done by the receiving goroutine between one
// section and the next while the other core sat partly idle. The sender
// knows which memory it holds: it names its long resident runs in the
// Hello (ResidentHint), and the receiver populates them on a goroutine
// of its own while the stream arrives (populateAhead), so zeroing
// overlaps receiving.
//
// It changes no content: MADV_POPULATE_WRITE backs a missing page with
// zeros and leaves a present page alone, so a page the stream stored
// first keeps its data, and a populated page the stream never stores
// stays zero, as it would unpopulated. The goroutine stays at most
// aheadWindow pages past the furthest page the stream has reached, so a
// hint makes the receiver populate no further than pages actually sent
// would. Only runs of at least MinResidentRun pages are named: the
// scattered pages of a sparse guest are populated as they arrive, as
// before. Not under post-copy, where a page populated but never sent
// would have to be dropped again at the switch.

// MinResidentRun and MaxResidentRuns bound Hello.Resident: runs of at
// least a huge page, at most 1,024 of them (about 30 KiB of JSON, well
// inside a control line).
const (
	MinResidentRun  = guest.HugeBlockPages
	MaxResidentRuns = 1024
)

// aheadChunk is the pages populated per call, one huge page: a stop
// waits for at most one (0.3 to 6 ms on the kvm-pvm host above).
const aheadChunk = guest.HugeBlockPages

// aheadWindow is how far, in pages, the goroutine may run past the
// stream (256 MiB).
const aheadWindow = 65536

// ResidentHint is the runs of at least MinResidentRun pages the host
// holds of g's memory, as [first page, pages] in guest page indices,
// ascending, at most MaxResidentRuns of them (the first ones). Nil where
// the host cannot say (guest.ResidencyKnown): every page would look
// resident.
func ResidentHint(g guest.Guest) [][2]uint64 {
	if !guest.ResidencyKnown() {
		return nil
	}
	var runs [][2]uint64
	for _, r := range g.Regions() {
		err := guest.Populated(r, func(first, n uint64) error {
			if len(runs) == MaxResidentRuns {
				return errEnoughRuns
			}
			if n >= MinResidentRun {
				runs = append(runs, [2]uint64{r.FirstPage() + first, n})
			}
			return nil
		})
		if err != nil {
			break
		}
	}
	return runs
}

// errEnoughRuns stops ResidentHint's scan at MaxResidentRuns.
var errEnoughRuns = errors.New("enough runs")

// aheadRuns is a peer's Hello.Resident made safe to act on: its first
// MaxResidentRuns runs, each clipped to the guest's regions (a run
// across two regions becomes two, so there may be a few more), ascending
// and disjoint. Runs that are empty, wrap around, overlap or go
// backwards are dropped: it is a hint.
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
	slices.SortFunc(out, func(a, b [2]uint64) int { return cmp.Compare(a[0], b[0]) })
	return out
}

// ahead is a running populateAhead. The goroutine populates runs in
// order; the receiving goroutine reads done and publishes reach.
type ahead struct {
	runs   [][2]uint64
	window uint64
	// done: every page of runs below it is populated (the goroutine's
	// prefix, never skipped). reach: one past the furthest page the
	// stream has stored so far; kick wakes a goroutine waiting for it.
	done, reach atomic.Uint64
	kick        chan struct{}
	stop        chan struct{}
	halted      sync.Once
	wg          sync.WaitGroup
}

// populateAhead starts populating the hinted runs (aheadRuns) of the
// image's memory on a goroutine, ahead of the receiving goroutine's
// writes. The receiving goroutine calls it before it reads the first
// epoch. The goroutine ends when it is done, at haltAhead (which does
// not wait), or at stopAhead, Activate or Close (which wait for its
// current call); one of the latter runs before the guest is closed.
// Populating a guest that was handed over and runs meanwhile changes no
// content either.
func (im *Image) populateAhead(hint [][2]uint64) { im.startAhead(hint, aheadWindow) }

// startAhead is populateAhead with the window given (tests).
func (im *Image) startAhead(hint [][2]uint64, window uint64) {
	runs := aheadRuns(hint, im.regions)
	if len(runs) == 0 || !guest.PrefaultSupported() || im.ahead.Load() != nil {
		return
	}
	a := &ahead{runs: runs, window: window, kick: make(chan struct{}, 1), stop: make(chan struct{})}
	im.ahead.Store(a)
	// Huge pages wherever the guest's memory takes them (im.huge: only
	// where the kernel refuses to write the pages itself, NewImage),
	// within the image's budget of advised runs. A staging image's own
	// populate never asks for them, since its commit waits for it and a huge
	// page's allocation may compact memory first; here the goroutine
	// waits, not the commit, and a secondary's catch-up then writes a
	// whole huge page per 2 MiB: after a 4 KiB populate, the first
	// user-mode write to each page still cost about 5 us on a kvm-pvm
	// host (shadow page tables), 57 % of a secondary's catch-up CPU.
	// Only the hinted runs are advised, so a page outside them faults
	// as a 4 KiB page as before. A commit populating a page of a run
	// the goroutine has not reached takes a huge page (and may wait for
	// compaction): during a catch-up, which holds no output, and after
	// it only until the goroutine has finished its runs, which the end
	// of the catch-up lets it do at once.
	huge := im.huge && im.hugeRuns+len(runs) <= maxHugeRuns
	if huge {
		im.hugeRuns += len(runs)
	}
	regions := im.regions
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.run(regions, huge)
	}()
}

// haltAhead tells a running populateAhead to stop, without waiting.
func (im *Image) haltAhead() {
	if a := im.ahead.Load(); a != nil {
		a.halt()
	}
}

// stopAhead stops a running populateAhead and waits for it.
func (im *Image) stopAhead() {
	if a := im.ahead.Load(); a != nil {
		a.halt()
		a.wg.Wait()
	}
}

func (a *ahead) halt() { a.halted.Do(func() { close(a.stop) }) }

// run populates a.runs in order, a chunk at a time, staying within the
// window past the stream, until done or halted.
func (a *ahead) run(regions []guest.Region, huge bool) {
	for i, run := range a.runs {
		end := run[0] + run[1]
		for p := run[0]; p < end; {
			q := min((p/aheadChunk+1)*aheadChunk, end)
			for q > a.reach.Load()+a.window {
				select {
				case <-a.stop:
					return
				case <-a.kick:
				}
			}
			select {
			case <-a.stop:
				return
			default:
			}
			if huge && p == run[0] {
				// The whole run at once: a commit that outruns the
				// goroutine then populates huge pages too, in parallel
				// with it. Advising only the goroutine's prefix (so a
				// commit would fault 4 KiB pages instead) made a
				// secondary's catch-up of 512 MiB take 3.0 to 3.4 s
				// against 2.4 s (two runs each, 2026-12-01).
				guest.AdviseHugePages(regions, run[0], run[1])
			}
			guest.PrefaultPages(regions, p, q-p, false)
			a.done.Store(q)
			p = q
		}
		if i+1 < len(a.runs) {
			a.done.Store(a.runs[i+1][0]) // nothing between runs is owed
		}
	}
}

// from is the first page of [first, first+n) the receiving goroutine
// must populate itself: past the goroutine's done prefix, when the run
// lies inside one hinted run (a run across a gap populates itself
// whole). It records that the stream reaches first+n.
func (a *ahead) from(first, n uint64) uint64 {
	end := first + n
	if end > a.reach.Load() {
		a.reach.Store(end) // receiving goroutine only: no other writer
		select {
		case a.kick <- struct{}{}:
		default:
		}
	}
	i, _ := slices.BinarySearchFunc(a.runs, first, func(r [2]uint64, p uint64) int {
		return cmp.Compare(r[0]+r[1], p+1)
	})
	if i == len(a.runs) || a.runs[i][0] > first || a.runs[i][0]+a.runs[i][1] < end {
		return first
	}
	return min(max(first, a.done.Load()), end)
}
