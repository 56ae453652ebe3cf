package failover

import (
	"errors"
	"fmt"
	"time"
)

// Output-triggered epochs (issue 17). With fixed epochs every reply the
// guest writes waits for the end of its epoch and then for the
// acknowledgement: a client that waits for each reply gets one request
// per epoch. Triggered, the loop ends an epoch as soon as the guest has
// written output that is held, so a reply waits for one pause and one
// acknowledgement, not for the clock. NextPause decides when; it is pure
// (figures in, a delay and the bound that set it out) and its scripts are
// in testdata/trigger.

// EpochTrigger says what ends an epoch.
type EpochTrigger int

const (
	// TriggerDefault is DefaultTrigger.
	TriggerDefault EpochTrigger = iota
	// TriggerClock ends an epoch every Interval, output or not.
	TriggerClock
	// TriggerOutput ends an epoch early when held output waits (within
	// MinInterval, MaxPauseFraction and the in-flight window), and at
	// the latest every Interval.
	TriggerOutput
)

// DefaultTrigger is what EpochConfig.Trigger's zero value means (and
// the command line's --epoch-trigger default): still the clock. Output
// meets the synchronous targets on kvm (docs/PERFORMANCE.md, 2026-12-01:
// 674 to 779 protected req/s against the clock's 40, output delay p50 <=
// 1 ms, 98.9 to 99.7 % of releases within 5 ms), and under pipelined load
// its epochs are the clock's (at most 15 of ~270 per 5 s window end
// early); but interleaved pairs with the start order balanced gave kvm's
// pipelined clients 97.5 % of the clock's throughput (median of 20
// rounds; geometric mean 94.8 %; synth 122 % and 114 % over 10), short of
// "no lower than fixed epochs" by less than the 14 to 17 % two identical
// clock pairs differ by on that host. With the pause fraction's credit
// (pauseAccount; the fourth session there) 789 to 875 req/s and the
// output delay's p99 within 5 ms in every run, but 99.5 % of the
// clock's pipelined throughput over 30 balanced rounds. A quieter host
// should decide.
const DefaultTrigger = TriggerClock

// defaultTrigger is DefaultTrigger, or what the tests ask for
// ($TANDEM_EPOCH_TRIGGER, main_test.go) to run every test of the package
// with the other trigger.
var defaultTrigger = DefaultTrigger

// ParseEpochTrigger reads an epoch trigger by name: "clock" or
// "output" (the command line's --epoch-trigger). The error names the
// accepted values and wraps ErrBadEpochConfig.
func ParseEpochTrigger(s string) (EpochTrigger, error) {
	switch s {
	case "clock":
		return TriggerClock, nil
	case "output":
		return TriggerOutput, nil
	}
	return 0, fmt.Errorf("%w: epoch trigger %q: want clock or output", ErrBadEpochConfig, s)
}

func (t EpochTrigger) String() string {
	switch t {
	case TriggerClock:
		return "clock"
	case TriggerOutput:
		return "output"
	}
	return "default"
}

// Defaults of the triggered epochs' bounds.
const (
	// DefaultMinInterval: no two pauses closer than this. A pause on the
	// KVM micro-guest costs 0.1-0.5 ms; 1 ms keeps a pause storm from
	// ever taking more than half the guest whatever the fraction says.
	DefaultMinInterval = time.Millisecond
	// DefaultMaxOutputDelay is the objective for how long output waits
	// for its epoch to start (synchronous load; pipelined load falls
	// back to the interval).
	DefaultMaxOutputDelay = 2 * time.Millisecond
	// DefaultMaxPauseFraction bounds the share of time the guest spends
	// paused by epochs that end early for output.
	DefaultMaxPauseFraction = 0.10
)

// ErrBadEpochConfig is the class of EpochConfig.Validate's errors.
var ErrBadEpochConfig = errors.New("bad epoch configuration")

// CheckMaxOutputDelay checks a maximum output delay against the epoch
// interval (0: the default 25 ms); the error names the accepted range and
// wraps ErrBadEpochConfig. The command line prints it after the flag's
// name (--max-output-delay).
func CheckMaxOutputDelay(d, interval time.Duration) error {
	if interval <= 0 {
		interval = defaultInterval
	}
	if d < DefaultMinInterval || d > interval {
		return fmt.Errorf("%w: max output delay %v outside [%v, %v] (the minimum epoch interval to the epoch interval)",
			ErrBadEpochConfig, d, DefaultMinInterval, interval)
	}
	return nil
}

// CheckMaxPauseFraction checks a maximum pause fraction: in (0, 1]. The
// command line prints the error after --max-pause-fraction.
func CheckMaxPauseFraction(f float64) error {
	if !(f > 0 && f <= 1) {
		return fmt.Errorf("%w: max pause fraction %v outside (0, 1]", ErrBadEpochConfig, f)
	}
	return nil
}

// Validate checks the epoch-timing fields that are set (zero means the
// default): MaxOutputDelay in [DefaultMinInterval, Interval],
// MaxPauseFraction in (0, 1].
func (c EpochConfig) Validate() error {
	if c.MaxOutputDelay != 0 {
		if err := CheckMaxOutputDelay(c.MaxOutputDelay, c.Interval); err != nil {
			return err
		}
	}
	if c.MaxPauseFraction != 0 {
		if err := CheckMaxPauseFraction(c.MaxPauseFraction); err != nil {
			return err
		}
	}
	if c.Trigger < TriggerDefault || c.Trigger > TriggerOutput {
		return fmt.Errorf("%w: epoch trigger %d", ErrBadEpochConfig, c.Trigger)
	}
	return nil
}

const defaultInterval = 25 * time.Millisecond

// TriggerConfig is NextPause's fixed part.
type TriggerConfig struct {
	Interval         time.Duration // the longest epoch (no output waiting)
	MinInterval      time.Duration // the shortest
	MaxOutputDelay   time.Duration // the longest wait of output for its pause, pipelined
	MaxPauseFraction float64       // paused time over elapsed time, at most
}

// TriggerInput is what the loop sees when it decides.
type TriggerInput struct {
	// SinceLastPause is the time since the last pause began.
	SinceLastPause time.Duration
	// UntilTick is the time to the clock's next pause: the clock ticks
	// every Interval as with fixed epochs, and an early pause for output
	// does not move it (a pipelined client's batch that began with an
	// early pause must not wait a whole interval from there).
	UntilTick time.Duration
	// HeldBytes is the output written since the last pause (held, its
	// epoch not yet sealed); HeldAge is how long its first byte has
	// waited.
	HeldBytes int
	HeldAge   time.Duration
	// InFlight is the epochs shipped and not yet acknowledged;
	// WindowFull says the in-flight window has no room (a capture
	// would wait for an acknowledgement).
	InFlight   int
	WindowFull bool
	// Overlapped says output was written while earlier epochs' output
	// still waited for its acknowledgement, OverlapAge how long ago
	// (the last time): a writer that does not wait for its replies.
	Overlapped bool
	OverlapAge time.Duration
	// The recent pause cost, as a line: PauseFixed is a pause's part
	// that does not grow with the dirty pages (stop, sync, state save,
	// resume), PausePerPage the copy time per dirty page.
	PauseFixed   time.Duration
	PausePerPage time.Duration
	// DirtyRate is the guest's recent dirtying, pages per second: with
	// PausePerPage it predicts how long the next pause will take.
	DirtyRate float64
	// Credit is the pause fraction's credit after the last pause's
	// charge (pauseAccount): it grows by creditRate (a little under
	// MaxPauseFraction) of the time since, up to creditCap, and an early pause needs its predicted
	// cost of it. Negative: pauses held more than the fraction allowed.
	Credit time.Duration
}

// PipelinedHold is how long a load counts as pipelined after output last
// overlapped earlier output. A pipelined client's batch ends when the
// client waits for its window's replies, so the overlap stops for about
// an interval and an acknowledgement; and many clients with thousands of
// requests outstanding fall into step with the epochs: each release lets
// them send a burst, the guest answers it within the interval and idles
// until the next release, so output overlaps only when a burst straddles
// an epoch's end. On the kvm guest (BenchmarkFTKV, 4 clients x 8,000 in
// flight, a trace of every decision) that left up to 250 ms between
// overlaps, and four intervals (100 ms) let early epochs through that
// each held a whole burst of 100 to 400 replies. A synchronous client
// never overlaps, so only a load that changes from pipelined to
// synchronous waits this long for short epochs. (NextPause holds for
// the longer of this and four epoch intervals, for a long --epoch.)
const PipelinedHold = time.Second

// Bounds NextPause names as the one that set the pause's time.
const (
	BoundInterval      = "interval"       // no output waiting: the clock
	BoundOutput        = "output"         // output waiting: pause at once
	BoundOutputDelay   = "output-delay"   // output waiting longer than MaxOutputDelay already: pause at once
	BoundPipelined     = "pipelined"      // output written while earlier output waits: epochs at the interval
	BoundMinInterval   = "min-interval"   // output waiting, pauses closer than MinInterval
	BoundPauseFraction = "pause-fraction" // output waiting, an earlier pause would exceed MaxPauseFraction
	BoundInFlight      = "in-flight"      // a pause is due but the window is full: after the next acknowledgement
)

// TriggerDecision is when to pause next.
type TriggerDecision struct {
	// After is how long from now; 0: now.
	After time.Duration
	// Bound is the bound that set After (Bound* above).
	Bound string
	// ByOutput: the pause is early, for held output (an epoch triggered
	// by output, not by the clock).
	ByOutput bool
	// AwaitAck: the pause is due but the in-flight window is full; it
	// follows the next acknowledgement (the capture waits for room).
	AwaitAck bool
}

func (d TriggerDecision) String() string {
	s := fmt.Sprintf("pause in %v (%s)", d.After, d.Bound)
	if d.ByOutput {
		s += " by output"
	}
	if d.AwaitAck {
		s += " after an ack"
	}
	return s
}

// NextPause decides when the next epoch's pause starts.
//
// No output waiting: at the clock's tick, every Interval, as fixed
// epochs.
//
// Output waiting: as soon as allowed, never later than the tick:
//   - at once when the output is all that is held (a synchronous client
//     waits for exactly this reply), but
//   - never sooner than MinInterval after the last pause;
//   - never so soon that pauses take more than MaxPauseFraction of the
//     time (the guest's time: a pause it waited idle through costs it
//     nothing, so PauseFixed learns 0 from such pauses, see idlePauser):
//     the next pause, T after the last, is predicted to cost PauseFixed
//   - PausePerPage x DirtyRate x T, and goes when the credit (Credit
//     plus creditRate x T, at most creditCap) covers it; with no
//     credit left from earlier epochs that is T of at least PauseFixed
//     / (creditRate - PausePerPage x DirtyRate), creditRate being
//     MaxPauseFraction less a share for the credit's cap (9.5 % of 10). When the
//     dirtying alone takes the whole fraction, or the pause costs more
//     than the credit can hold, no early pause is allowed and the
//     interval applies;
//   - pipelined (within the last PipelinedHold output was written while
//     earlier output still waited for its acknowledgement: the clients
//     do not wait for each reply), at the tick: throughput-friendly
//     epochs, since an early pause gains such a client little and costs
//     the guest a pause and the machine an epoch's encoding, shipping and
//     apply (batching for MaxOutputDelay instead halved the pipelined
//     throughput on the KVM guest: BenchmarkEpochTrigger).
//
// MaxOutputDelay is the objective output is held to: the bound reported
// is output while it is met, and otherwise the one that made the output
// wait (pause-fraction, min-interval, pipelined, in-flight), or
// output-delay when it has already waited longer for another reason (a
// capture in progress, the window).
//
// The bound reported is the one that set the time. A due pause with the
// in-flight window full waits for an acknowledgement (AwaitAck, bound
// in-flight): the capture side's back-pressure, as with fixed epochs.
func NextPause(c TriggerConfig, in TriggerInput) TriggerDecision {
	until := func(t time.Duration) time.Duration { return max(t-in.SinceLastPause, 0) }
	d := TriggerDecision{After: max(in.UntilTick, 0), Bound: BoundInterval}
	pipelined := in.Overlapped && in.OverlapAge < max(PipelinedHold, 4*c.Interval)
	if in.HeldBytes > 0 && pipelined {
		d.Bound = BoundPipelined
	}
	if in.HeldBytes > 0 && !pipelined {
		early := TriggerDecision{Bound: BoundOutput, ByOutput: true}
		if w := until(c.MinInterval); w > early.After {
			early.After, early.Bound = w, BoundMinInterval
		}
		if period, ok := fractionPeriod(c, in); !ok {
			early.After = c.Interval // no early pause fits the fraction
			early.Bound = BoundPauseFraction
		} else if w := until(period); w > early.After {
			early.After, early.Bound = w, BoundPauseFraction
		}
		if early.Bound == BoundOutput && in.HeldAge > c.MaxOutputDelay {
			early.Bound = BoundOutputDelay
		}
		if early.After < d.After {
			d = early
		} else if early.Bound == BoundPauseFraction {
			// The clock comes first, but only because the fraction
			// held the output back: say so.
			d.Bound = BoundPauseFraction
		}
	}
	if d.After == 0 && in.WindowFull {
		d.AwaitAck, d.Bound = true, BoundInFlight
	}
	return d
}

// fractionPeriod is the shortest epoch (time since the last pause) whose
// pause the pause fraction's credit covers; ok is false when none does
// (the dirtying's copy alone takes the fraction, or the pause would cost
// more than the credit holds).
func fractionPeriod(c TriggerConfig, in TriggerInput) (time.Duration, bool) {
	perSecond := in.PausePerPage.Seconds() * in.DirtyRate // paused seconds per second, from copying
	room := creditRate(c) - perSecond
	if room <= 0 {
		return 0, false
	}
	full := creditCap(c)
	cost := func(t time.Duration) time.Duration { return in.PauseFixed + time.Duration(perSecond*float64(t)) }
	now := in.SinceLastPause
	have := min(in.Credit+accrued(c, now), full)
	if have >= cost(now) {
		return now, true
	}
	// Both grow until the credit is full: it by creditRate, the
	// cost by the copying.
	t := now + time.Duration(float64(cost(now)-have)/room)
	if cost(t) > full {
		return 0, false
	}
	return t, true
}

// idlePauser is a guest that tells whether its last pause held no guest
// work: every vCPU waited idle from the pause to the resume (guest/kvm).
// A synchronous client's guest waits for the next request through almost
// every pause, so with the pause charged at its wall time the fraction,
// not the work, set the pace (a KVM pause of 0.2-0.4 ms at 10 % allowed
// an early epoch every 2-4 ms); charged at what it held, an idle guest's
// epochs follow its output (MinInterval apart at most) and a busy guest's
// stay within the fraction as before. A guest that cannot tell is
// charged the wall time.
type idlePauser interface{ IdleThroughPause() bool }

// trigger resolves cfg's epoch-timing fields to their defaults.
func (cfg EpochConfig) triggerConfig() TriggerConfig {
	tc := TriggerConfig{Interval: cfg.Interval, MinInterval: DefaultMinInterval,
		MaxOutputDelay: cfg.MaxOutputDelay, MaxPauseFraction: cfg.MaxPauseFraction}
	if tc.MaxOutputDelay <= 0 {
		tc.MaxOutputDelay = min(DefaultMaxOutputDelay, tc.Interval)
	}
	if tc.MaxPauseFraction <= 0 {
		tc.MaxPauseFraction = DefaultMaxPauseFraction
	}
	tc.MinInterval = min(tc.MinInterval, tc.MaxOutputDelay)
	return tc
}
