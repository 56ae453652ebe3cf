package failover

import "time"

// pauseAccount is the loop's record of its pauses that NextPause's
// pause-cost figures come from (TriggerInput's PauseFixed, PausePerPage,
// DirtyRate): a line fitted to the recent pauses, exponentially
// weighted. It is pure (times in, figures out) so that the scripts in
// testdata/trigger can replay a trace's pauses through it.
type pauseAccount struct {
	seen      int
	last      time.Time // the last pause's start
	fixed     time.Duration
	perPage   time.Duration
	dirtyRate float64 // pages per second between pauses
}

// pauseWeight is the weight of the newest pause in the line.
const pauseWeight = 0.2

// note adds a pause that began at at, lasted total, of which copy went
// on copying pages dirty pages; idle says the guest waited idle through
// all of it (idlePauser). It returns the time the pause held guest work
// (what the pause fraction bounds).
func (a *pauseAccount) note(at time.Time, total, copy time.Duration, pages int, idle bool) (held time.Duration) {
	ewma := func(old, v float64, first bool) float64 {
		if first {
			return v
		}
		return old + pauseWeight*(v-old)
	}
	first := a.seen == 0
	a.seen++
	fixed, held := total-copy, total
	if idle {
		// Held from no work: the pause takes nothing of the fraction.
		fixed, held = 0, 0
	}
	a.fixed = time.Duration(ewma(float64(a.fixed), float64(fixed), first))
	if pages > 0 {
		a.perPage = time.Duration(ewma(float64(a.perPage), float64(copy)/float64(pages), a.perPage == 0))
	}
	if dt := at.Sub(a.last); dt > 0 && !first {
		a.dirtyRate = ewma(a.dirtyRate, float64(pages)/dt.Seconds(), false)
	}
	a.last = at
	return held
}

// fill sets in's pause-cost figures.
func (a *pauseAccount) fill(in *TriggerInput) {
	in.PauseFixed, in.PausePerPage, in.DirtyRate = a.fixed, a.perPage, a.dirtyRate
}
