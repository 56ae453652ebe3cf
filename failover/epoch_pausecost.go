package failover

import "time"

// pauseAccount is the loop's record of its pauses that NextPause's
// pause-cost figures come from (TriggerInput's PauseFixed, PausePerPage,
// DirtyRate, Credit): a line fitted to the recent pauses, exponentially
// weighted, and the pause fraction's credit. It is pure (times in,
// figures out) so that the scripts in testdata/trigger can replay a
// trace's pauses through it.
//
// The credit is a bucket: it fills at a little under MaxPauseFraction
// of the elapsed time (creditRate) up to creditCap, and each pause takes
// from it the time it held the guest's work. The line alone forgot slowly: after a pipelined window of
// busy 1.5 ms pauses it predicted 1.5 ms for the synchronous client's
// idle ones and spaced them 15 ms, then 12, 9.6... for about 100 ms; and
// one pause charged in full (the vCPU caught just after writing its
// reply, 2 ms on a loaded host) spaced the next ones 4 ms. With the
// credit, time the guest was not paused counts for the next pause, so
// such a pause goes at once when the window before it left room.
type pauseAccount struct {
	seen      int
	last      time.Time // the last pause's start
	fixed     time.Duration
	perPage   time.Duration
	dirtyRate float64       // pages per second between pauses
	credit    time.Duration // after the last pause's charge
}

// creditCap is the most credit the pause fraction saves up: two
// intervals' share (5 ms at the defaults), enough for one busy pause
// after a clock epoch's (kvm's pipelined pauses take 1 to 2 ms), and at
// most a quarter of the fraction's share of the status's window
// (pauseWindow).
func creditCap(c TriggerConfig) time.Duration {
	return time.Duration(c.MaxPauseFraction * float64(min(2*c.Interval, pauseWindow/4)))
}

// creditRate is the credit's filling, paused seconds per second: the
// fraction less the cap spread over pauseWindow, so that a full bucket
// spent at once and the filling over the rest of the window together
// stay within MaxPauseFraction of any pauseWindow (held_ms_per_second's
// window; a first run without the deduction showed 103 ms/s in one
// window of six on kvm's dirtying guest, BenchmarkFTKVDirty). Over any
// window W the guest is held at most creditRate x W + creditCap, plus
// what a pause cost beyond its prediction and the clock's pauses while
// the credit was overdrawn (TestPauseFractionOverWindows).
func creditRate(c TriggerConfig) float64 {
	return c.MaxPauseFraction - creditCap(c).Seconds()/pauseWindow.Seconds()
}

// pauseWeight is the weight of the newest pause in the line.
const pauseWeight = 0.2

// note adds a pause that began at at, lasted total, of which copy went
// on copying pages dirty pages; idle says the guest waited idle through
// all of it (idlePauser). It returns the time the pause held guest work
// (what the pause fraction bounds).
func (a *pauseAccount) note(c TriggerConfig, at time.Time, total, copy time.Duration, pages int, idle bool) (held time.Duration) {
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
	full := creditCap(c)
	if first {
		a.credit = full
	} else {
		a.credit = min(a.credit+accrued(c, at.Sub(a.last)), full)
	}
	// Debt below one bucket is the clock's pauses' (no early pause is
	// taken without the credit for its predicted cost): forgotten, so that a window of
	// costly clock epochs does not hold early ones back long after it.
	a.credit = max(a.credit-held, -full)
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
	in.Credit = a.credit
}

// accrued is the pause fraction's credit for d of elapsed time.
func accrued(c TriggerConfig, d time.Duration) time.Duration {
	return time.Duration(creditRate(c) * float64(max(d, 0)))
}
