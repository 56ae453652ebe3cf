package precopy

import (
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// Action is what the engine must do next.
type Action int

// Actions of a Decision.
const (
	// Continue: run another iterative round.
	Continue Action = iota
	// TryComplete: pause, flush within FlushBudget, final sync, send the
	// rest and the state. On a missed flush deadline resume at once and
	// call CompletionAborted.
	TryComplete
	// Fail: stop the migration cleanly; Decision.Err says why. The guest
	// keeps running on the source.
	Fail
)

func (a Action) String() string {
	switch a {
	case Continue:
		return "continue"
	case TryComplete:
		return "try-complete"
	case Fail:
		return "fail"
	}
	return fmt.Sprintf("action(%d)", int(a))
}

// RoundStats is what one iterative round observed. The engine reports a
// round after its send and after the dirty sync that follows it, so
// RemainingPages is exactly what a stop-and-copy would have to send now.
type RoundStats struct {
	// Round is 0 for the full pass, then 1, 2, ...
	Round int
	// PagesSent is how many guest pages the round sent (zero pages that
	// were skipped do not count), BytesSent how many bytes that put on
	// the wire after zero detection, delta and compression, and SendTime
	// how long the sending took.
	PagesSent, BytesSent uint64
	SendTime             time.Duration
	// PagesDirtied is how many pages the sync found newly dirty, over
	// DirtyInterval: the time since the previous sync (for round 0, since
	// dirty logging started).
	PagesDirtied  uint64
	DirtyInterval time.Duration
	// RemainingPages is how many pages are dirty and unsent after the sync.
	RemainingPages uint64
}

// Decision is the Controller's answer to a finished round.
type Decision struct {
	Action Action
	// Throttle is the per cent the vCPUs must be throttled to from now on
	// (0 = not at all). The engine applies it with guest.Throttler when it
	// differs from what it last applied.
	Throttle int
	// ExpectedDowntime is the predicted stop-and-copy time; valid only
	// when Predicted is true (there is a bandwidth measurement, or there
	// is nothing left to send).
	ExpectedDowntime time.Duration
	Predicted        bool
	// Reason is one line for logs and status saying why.
	Reason string
	// Err is set for Fail.
	Err error
}

// Stats is a snapshot of the Controller's figures, for status and metrics.
type Stats struct {
	Rounds             int
	CompletionAttempts int
	AbortedCompletions int
	LastAbortReason    string
	ThrottlePercent    int
	// DirtyRate is the smoothed dirty rate in pages per second.
	DirtyRate float64
	// Bandwidth is the smoothed wire rate in bytes per second and
	// TransferRate the smoothed guest bytes moved per second (higher than
	// Bandwidth when zero detection and compression help).
	Bandwidth, TransferRate float64
	ExpectedDowntime        time.Duration
	Predicted               bool
	RemainingPages          uint64
	StateSaveEstimate       time.Duration
}

// BandwidthMbps converts Stats.Bandwidth to megabits per second.
func (s Stats) BandwidthMbps() float64 { return s.Bandwidth * 8 / 1e6 }

// Controller decides, round after round, whether a precopy run continues,
// tries to complete, throttles the guest or fails. It does no I/O and reads
// no clock: every call takes the time it happens at. One goroutine (the
// engine) drives it; the accessors may be called from any goroutine.
type Controller struct {
	policy Policy
	start  time.Time

	// mu guards everything below.
	mu       sync.Mutex
	wire     RateEstimator // wire bytes per second
	transfer RateEstimator // guest bytes moved per second
	// dirtyMoved is the guest bytes per second of the dirty rounds
	// (round 1 on) and final is that of completed final sends: pages
	// like the ones a stop-and-copy sends, unlike round 0's, whose mostly
	// untouched or compressible pages inflate transfer. The prediction
	// takes the slowest rate known.
	dirtyMoved RateEstimator
	final      RateEstimator
	dirty      RateEstimator // pages dirtied per second
	// growth is how much larger final syncs have found the dirty set
	// than the round their attempt was decided on (at least 1): a guest
	// that dirties a burst between the last round and the pause makes
	// later decisions count on it.
	growth        float64
	stateSave     time.Duration
	stateSaveSeen bool
	throttle      int
	highRounds    int // consecutive rounds whose dirty rate was over the trigger
	// prevRemaining is the dirty set the last round left (prevKnown:
	// there was a round), against which the next round's is judged.
	prevRemaining  uint64
	prevKnown      bool
	rounds         int
	attempts       int
	aborted        int
	lastAbort      time.Time
	lastAbortWhy   string
	expected       time.Duration
	predicted      bool
	remainingPages uint64
	failed         error
}

// NewController returns a controller for a run that started at start.
func NewController(p Policy, start time.Time) (*Controller, error) {
	p = p.withDefaults()
	if err := p.validate(); err != nil {
		return nil, err
	}
	return &Controller{
		policy:     p,
		start:      start,
		wire:       NewRateEstimator(p.RateTimeConstant),
		transfer:   NewRateEstimator(p.RateTimeConstant),
		dirtyMoved: NewRateEstimator(p.RateTimeConstant),
		final:      NewRateEstimator(p.RateTimeConstant),
		dirty:      NewRateEstimator(p.RateTimeConstant),
		stateSave:  p.StateSaveEstimate,
		growth:     1,
	}, nil
}

// Policy returns the policy in force, defaults filled in.
func (c *Controller) Policy() Policy { return c.policy }

// Deadline returns when the run fails for running too long, and false when
// it has no limit. The engine bounds its rounds' contexts with it, so a long
// round 0 cannot overrun MaxTime waiting for RoundDone.
func (c *Controller) Deadline() (time.Time, bool) {
	if c.policy.MaxTime < 0 {
		return time.Time{}, false
	}
	return c.start.Add(c.policy.MaxTime), true
}

// RoundDone takes a finished round's figures and returns what to do next.
// A TryComplete decision counts as a completion attempt: the engine must
// either complete or call CompletionAborted.
func (c *Controller) RoundDone(r RoundStats, now time.Time) Decision {
	c.mu.Lock()
	defer c.mu.Unlock()

	c.rounds++
	c.observe(r)
	c.remainingPages = r.RemainingPages
	c.expected, c.predicted = c.predictLocked(r.RemainingPages)

	d := Decision{Throttle: c.throttle, ExpectedDowntime: c.expected, Predicted: c.predicted}

	if c.failed != nil {
		d.Action, d.Err, d.Reason = Fail, c.failed, c.failed.Error()
		return d
	}
	if dl, ok := c.Deadline(); ok && !now.Before(dl) {
		c.failed = fmt.Errorf("%w: %v after %d rounds, %d pages still dirty",
			ErrMaxTime, c.policy.MaxTime, c.rounds, r.RemainingPages)
		d.Action, d.Err, d.Reason = Fail, c.failed, c.failed.Error()
		return d
	}

	prev, prevKnown := c.prevRemaining, c.prevKnown
	if r.Round == 0 || !prevKnown {
		// Round 0 started from every page it sent.
		prev, prevKnown = r.PagesSent, true
	}
	c.prevRemaining, c.prevKnown = r.RemainingPages, true

	complete, why := c.completeLocked(r.RemainingPages, prev, prevKnown)
	if complete {
		if !c.lastAbort.IsZero() {
			if next := c.lastAbort.Add(c.policy.MinRetryInterval); now.Before(next) {
				d.Reason = fmt.Sprintf("%s but the last attempt aborted %v ago; next attempt after %v",
					why, now.Sub(c.lastAbort), c.policy.MinRetryInterval)
				// A guest that converges but whose flushes keep
				// missing is not helped by throttling, so the
				// throttle is left alone here.
				c.highRounds = 0
				return d
			}
		}
		c.attempts++
		c.highRounds = 0
		d.Action = TryComplete
		d.Reason = why
		return d
	}
	if c.predicted && c.expected <= c.policy.DowntimeLimit {
		// Converging on its own: another round shortens the pause,
		// and throttling a guest that converges buys nothing.
		c.highRounds = 0
		d.Reason = why
		return d
	}

	d.Reason = c.convergeLocked(r)
	d.Throttle = c.throttle
	return d
}

// shrinkPercent: a round whose remaining set is at most this per cent of
// the set before it still shrinks it (the guest converges on its own and
// another round shortens the pause); above it the set has stopped
// shrinking.
const shrinkPercent = 75

// completeLocked is the completion rule, given the pages left after a
// round and before it. The limit is a ceiling, not the goal: complete when
// the prediction fits the target, or fits the limit and the dirty set has
// stopped shrinking (another round would not shorten the pause much, or
// would lengthen it). A prediction over the limit never completes. It
// returns the reason line either way.
func (c *Controller) completeLocked(remaining, prev uint64, prevKnown bool) (bool, string) {
	limit, target := c.policy.DowntimeLimit, c.policy.DowntimeTarget
	switch {
	case !c.predicted:
		return false, "expected downtime unknown: no bandwidth measured yet"
	case c.expected <= target:
		return true, fmt.Sprintf("expected downtime %v fits the target %v", c.expected, target)
	case c.expected > limit:
		return false, fmt.Sprintf("expected downtime %v over %v", c.expected, limit)
	case !prevKnown || remaining*100 > prev*shrinkPercent:
		return true, fmt.Sprintf("expected downtime %v fits %v and the dirty set stopped shrinking (%d pages, %d before the round)",
			c.expected, limit, remaining, prev)
	}
	return false, fmt.Sprintf("expected downtime %v fits %v but not the target %v and the dirty set shrinks (%d pages from %d): another round",
		c.expected, limit, target, remaining, prev)
}

// observe feeds the estimators. Rounds that sent nothing say nothing about
// the link (an idle link is not a slow one), so they are not fed to the
// bandwidth estimators.
func (c *Controller) observe(r RoundStats) {
	if r.BytesSent > 0 {
		c.wire.Observe(r.BytesSent, r.SendTime)
	}
	if moved := movedBytes(r); moved > 0 {
		c.transfer.Observe(moved, r.SendTime)
		if r.Round > 0 && r.PagesSent >= minDirtyRoundPages {
			c.dirtyMoved.Observe(moved, r.SendTime)
		}
	}
	c.dirty.Observe(r.PagesDirtied, r.DirtyInterval)
}

// movedBytes is the guest memory a round moved. A caller that only knows
// wire bytes gets a prediction in wire bytes, which errs on the safe side.
func movedBytes(r RoundStats) uint64 {
	if r.PagesSent > 0 {
		return satMul(r.PagesSent, guest.PageSize)
	}
	return r.BytesSent
}

// transferRateLocked is the rate the stop-and-copy is predicted to move
// guest memory at: the measured one, scaled down if the wire rate it was
// measured with ran above MaxBandwidth (a burst), since the final send
// is held to the cap too.
func (c *Controller) transferRateLocked() (float64, bool) {
	rate, ok := c.transfer.Rate()
	if !ok || rate <= 0 {
		return 0, false
	}
	for _, e := range []*RateEstimator{&c.dirtyMoved, &c.final} {
		if r, ok := e.Rate(); ok && r > 0 && r < rate {
			rate = r
		}
	}
	if max := float64(c.policy.MaxBandwidth); max > 0 {
		if wire, ok := c.wire.Rate(); ok && wire > max {
			rate *= max / wire
		}
	}
	return rate, true
}

// predictLocked is the expected stop-and-copy time for remaining pages:
// their bytes over the transfer rate plus the state save time.
func (c *Controller) predictLocked(remaining uint64) (time.Duration, bool) {
	if remaining == 0 {
		return c.stateSave, true
	}
	rate, ok := c.transferRateLocked()
	if !ok {
		return 0, false
	}
	send := secondsToDuration(float64(remaining) * c.growth * guest.PageSize / rate)
	return satAdd(send, c.stateSave), true
}

// minDirtyRoundPages is the fewest pages a dirty round must send to
// count for the final-send rate: a handful of pages over a millisecond
// measures the round's overheads, not the link.
const minDirtyRoundPages = 64

// PredictSend is the expected time to send pages once the state is saved
// (the final send of an attempt, after its final sync), and false when
// there is no rate yet.
func (c *Controller) PredictSend(pages uint64) (time.Duration, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if pages == 0 {
		return 0, true
	}
	rate, ok := c.transferRateLocked()
	if !ok {
		return 0, false
	}
	return secondsToDuration(float64(pages) * guest.PageSize / rate), true
}

// ObserveFinalSync records how many pages the final dirty sync of an
// attempt left, against the remaining pages of the round the attempt was
// decided on. A larger set raises the factor later predictions scale the
// remaining pages by; a set no larger lets it decay halfway back to 1.
func (c *Controller) ObserveFinalSync(finalPages uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	g := 1.0
	if c.remainingPages > 0 {
		g = float64(finalPages) / float64(c.remainingPages)
	}
	if g > c.growth {
		c.growth = min(g, maxGrowth)
	} else {
		c.growth = max(1, (c.growth+g)/2)
	}
}

// maxGrowth caps the final-sync growth factor: one burst must not keep a
// migration from ever completing.
const maxGrowth = 8

// ObserveFinalSend records a final send that moved pages in d (from the
// first byte to the destination's acknowledgement, its load time left
// out). Later predictions use the rate measured here when it is slower
// than the live rounds': what the prediction assumed is checked against
// what happened.
func (c *Controller) ObserveFinalSend(pages uint64, d time.Duration) {
	if pages < minDirtyRoundPages || d < minRateSample {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.final.Observe(satMul(pages, guest.PageSize), d)
}

// Predict is the expected stop-and-copy time for remaining dirty pages at
// the current estimates, and false when there is no bandwidth figure yet.
// The engine uses it after the final sync of an attempt to log what it
// expects against what it then measures.
func (c *Controller) Predict(remainingPages uint64) (time.Duration, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.predictLocked(remainingPages)
}

// convergeLocked applies auto-converge to a round that did not fit and
// returns the reason line. The rule is QEMU's: when the bytes the guest
// dirtied exceed ThrottleTrigger per cent of the bytes the link moved, for
// ThrottleRounds rounds in a row, raise the throttle one step. Unlike QEMU
// a round under the trigger resets the count, so only a sustained excess
// throttles. Rates rather than period totals are compared because a round's
// send time and dirty interval need not be equal.
func (c *Controller) convergeLocked(r RoundStats) string {
	why := "expected downtime unknown: no bandwidth measured yet"
	if c.predicted {
		why = fmt.Sprintf("expected downtime %v over %v", c.expected, c.policy.DowntimeLimit)
	}
	if !c.policy.AutoConverge {
		return why
	}
	dirtyRate, ok := roundRate(r.PagesDirtied, r.DirtyInterval)
	if !ok {
		dirtyRate, ok = c.dirty.Rate()
	}
	if !ok {
		return why
	}
	dirtyBytes := dirtyRate * guest.PageSize
	xfer, ok := roundRate(movedBytes(r), r.SendTime)
	if !ok || movedBytes(r) == 0 {
		xfer, ok = c.transferRateLocked()
	}
	if !ok {
		return why
	}
	if dirtyBytes*100 <= xfer*float64(c.policy.ThrottleTrigger) {
		c.highRounds = 0
		return why
	}
	c.highRounds++
	if c.highRounds < c.policy.ThrottleRounds {
		return fmt.Sprintf("%s; dirty rate %.0f B/s over %d%% of %.0f B/s (%d of %d rounds)",
			why, dirtyBytes, c.policy.ThrottleTrigger, xfer, c.highRounds, c.policy.ThrottleRounds)
	}
	c.highRounds = 0
	prev := c.throttle
	if c.throttle == 0 {
		c.throttle = c.policy.ThrottleInitial
	} else {
		c.throttle += c.policy.ThrottleStep
	}
	if c.throttle > c.policy.ThrottleMax {
		c.throttle = c.policy.ThrottleMax
	}
	if c.throttle == prev {
		return fmt.Sprintf("%s; dirty rate %.0f B/s over %d%% of %.0f B/s, throttle already at its cap %d%%",
			why, dirtyBytes, c.policy.ThrottleTrigger, xfer, c.throttle)
	}
	return fmt.Sprintf("%s; dirty rate %.0f B/s over %d%% of %.0f B/s for %d rounds: throttle %d%% -> %d%%",
		why, dirtyBytes, c.policy.ThrottleTrigger, xfer, c.policy.ThrottleRounds, prev, c.throttle)
}

// roundRate is amount over span, when span is long enough to mean anything.
func roundRate(amount uint64, span time.Duration) (float64, bool) {
	if span < minRateSample {
		return 0, false
	}
	return float64(amount) / span.Seconds(), true
}

// CompletionAborted records that a completion attempt was given up at now
// (the flush missed its deadline, or the final phase failed before the
// switch-over) and the guest resumed on the source. No TryComplete follows
// before now + MinRetryInterval.
func (c *Controller) CompletionAborted(now time.Time, why error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.aborted++
	c.lastAbort = now
	if why != nil {
		c.lastAbortWhy = why.Error()
	} else {
		c.lastAbortWhy = "unknown"
	}
}

// ObserveStateSave records how long saving (and sending) the vCPU and
// device state took, measured during a completion attempt or an FT epoch.
// The estimate follows the observations, halving the weight of the past
// each time, so one slow save does not block completion for long.
func (c *Controller) ObserveStateSave(d time.Duration) {
	if d < 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.stateSaveSeen {
		c.stateSave, c.stateSaveSeen = d, true
		return
	}
	c.stateSave = c.stateSave/2 + d/2
}

// DowntimeLeft is what is left of the downtime limit for a pause that
// started at pauseStart, at now; never negative.
func (c *Controller) DowntimeLeft(pauseStart, now time.Time) time.Duration {
	elapsed := now.Sub(pauseStart)
	if elapsed < 0 {
		elapsed = 0
	}
	left := c.policy.DowntimeLimit - elapsed
	if left < 0 {
		return 0
	}
	return left
}

// FlushBudget is the deadline for the flush of a completion attempt whose
// pause started at pauseStart, at now: what is left of the downtime limit
// minus the predicted remainder of the stop-and-copy (final send and state
// save), since those still have to happen after the flush. Zero means the
// attempt cannot fit any more and should be aborted.
func (c *Controller) FlushBudget(pauseStart, now time.Time) time.Duration {
	left := c.DowntimeLeft(pauseStart, now)
	c.mu.Lock()
	after := c.stateSave
	if c.predicted {
		after = c.expected
	}
	c.mu.Unlock()
	if left <= after {
		return 0
	}
	return left - after
}

// Stats returns a snapshot of the figures.
func (c *Controller) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := Stats{
		Rounds:             c.rounds,
		CompletionAttempts: c.attempts,
		AbortedCompletions: c.aborted,
		LastAbortReason:    c.lastAbortWhy,
		ThrottlePercent:    c.throttle,
		ExpectedDowntime:   c.expected,
		Predicted:          c.predicted,
		RemainingPages:     c.remainingPages,
		StateSaveEstimate:  c.stateSave,
	}
	s.DirtyRate, _ = c.dirty.Rate()
	s.Bandwidth, _ = c.wire.Rate()
	s.TransferRate, _ = c.transfer.Rate()
	return s
}

// CompletionAttempts is how many TryComplete decisions were made.
func (c *Controller) CompletionAttempts() int { return c.Stats().CompletionAttempts }

// AbortedCompletions is how many attempts ended in CompletionAborted.
func (c *Controller) AbortedCompletions() int { return c.Stats().AbortedCompletions }

// ThrottlePercent is the throttle currently asked for.
func (c *Controller) ThrottlePercent() int { return c.Stats().ThrottlePercent }

// DirtyRate is the smoothed dirty rate in pages per second.
func (c *Controller) DirtyRate() float64 { return c.Stats().DirtyRate }

// BandwidthMbps is the smoothed wire rate in megabits per second.
func (c *Controller) BandwidthMbps() float64 { return c.Stats().BandwidthMbps() }

// ExpectedDowntime is the last prediction and whether there is one.
func (c *Controller) ExpectedDowntime() (time.Duration, bool) {
	s := c.Stats()
	return s.ExpectedDowntime, s.Predicted
}

// secondsToDuration converts, saturating instead of overflowing: a rate
// near zero must give "very long", never a negative duration.
func secondsToDuration(s float64) time.Duration {
	if math.IsNaN(s) || s <= 0 {
		return 0
	}
	if s >= float64(math.MaxInt64)/float64(time.Second) {
		return math.MaxInt64
	}
	return time.Duration(s * float64(time.Second))
}

func satAdd(a, b time.Duration) time.Duration {
	if a > 0 && b > math.MaxInt64-a {
		return math.MaxInt64
	}
	return a + b
}

func satMul(a, b uint64) uint64 {
	if a != 0 && b > math.MaxUint64/a {
		return math.MaxUint64
	}
	return a * b
}
