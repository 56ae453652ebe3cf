package precopy

import (
	"errors"
	"fmt"
	"time"
)

// Why a migration switched to post-copy (MigrationStatus's
// PostcopySwitchReason).
const (
	SwitchRounds     = "rounds"
	SwitchCommand    = "command"
	SwitchController = "controller"
)

// SwitchView is what the switch to post-copy is decided on: the rounds,
// the operator's word and the convergence controller's figures. Times
// are since the migration started.
type SwitchView struct {
	// RoundsSent is how many precopy rounds have been sent (the switch
	// would come before the next); AfterRounds switches once that many
	// are sent, negative: no such limit.
	RoundsSent, AfterRounds int
	// Commanded: POST /migrate/postcopy asked for the switch.
	Commanded bool
	// RetryAfter is when a switch attempt given up (its flush missed its
	// budget, the guest resumed) may be tried again; zero: none was.
	RetryAfter time.Duration
	// Decision is the controller's answer to the last round (the zero
	// Decision before the first round). TryComplete means a precopy
	// completion is about to be tried: it needs no switch.
	Decision      Decision
	DowntimeLimit time.Duration
	// Progress is the dirty set over time, oldest first: the pages the
	// full pass set out to send, at its start, then what each round
	// left after its dirty sync.
	Progress []ProgressSample
	// Elapsed is now; MaxTime the policy's (negative: no limit).
	Elapsed, MaxTime time.Duration
	// GivenUp counts the switch attempts given up so far (their flush
	// missed its budget and the guest resumed here).
	GivenUp int
}

// MaxSwitchGiveUps bounds the switch attempts a migration gives up: each
// pauses the guest for up to the downtime limit, and a disk whose flush
// stalls for minutes would otherwise have them retried, and the time
// limit put off, for as long as it stalls. After that many the migration
// is precopy's alone: it completes, or fails at its time limit.
const MaxSwitchGiveUps = 3

// ProgressSample is the dirty set's size at one time.
type ProgressSample struct {
	At    time.Duration
	Pages uint64
}

// SwitchDecision says whether to switch to post-copy now and why:
// Reason is one of the Switch constants when Switch is set, and Why one
// line for the log and status either way.
type SwitchDecision struct {
	Switch bool
	Reason string
	Why    string
}

// progressWindow is how many samples the controller's prediction spans:
// two rounds, so one round's noise does not decide.
const progressWindow = 3

// DecideSwitch is the switch rule of a --postcopy migration, a function
// of the figures alone (no clock, no I/O). In order:
//
//  0. after MaxSwitchGiveUps attempts given up, never again;
//  1. the operator's command switches at once;
//  2. a switch attempt given up less than the retry interval ago waits;
//  3. a precopy completion the controller is about to try goes first
//     (a short pause and no page faults: the better trade);
//  4. AfterRounds rounds sent switches (the latest the switch comes);
//  5. the controller's time limit reached switches instead of failing;
//  6. the controller's prediction: over the last two rounds the dirty
//     set did not shrink, or shrinks so slowly that it would not fit
//     the downtime limit before the time limit, while the expected
//     downtime is over the limit. Precopy would only go on throttling
//     the guest harder, then fail; post-copy finishes in the time the
//     link needs for the set.
func DecideSwitch(v SwitchView) SwitchDecision {
	d := v.Decision
	switch {
	case v.GivenUp >= MaxSwitchGiveUps:
		return SwitchDecision{Why: fmt.Sprintf("%d switch attempts given up (their flush missed its budget): precopy alone from here", v.GivenUp)}
	case v.Commanded && v.Elapsed >= v.RetryAfter:
		return SwitchDecision{Switch: true, Reason: SwitchCommand, Why: "asked for by POST /migrate/postcopy"}
	case v.Elapsed < v.RetryAfter:
		return SwitchDecision{Why: fmt.Sprintf("the last switch attempt was given up; next one after %v", v.RetryAfter)}
	case d.Action == TryComplete:
		return SwitchDecision{Why: "precopy completes first: " + d.Reason}
	case v.AfterRounds >= 0 && v.RoundsSent >= v.AfterRounds:
		return SwitchDecision{Switch: true, Reason: SwitchRounds,
			Why: fmt.Sprintf("%d precopy rounds sent (--postcopy-after-rounds %d)", v.RoundsSent, v.AfterRounds)}
	case d.Action == Fail && errors.Is(d.Err, ErrMaxTime):
		return SwitchDecision{Switch: true, Reason: SwitchController,
			Why: fmt.Sprintf("precopy did not converge within the time limit (%v); switching instead of failing", d.Err)}
	}
	return predictNoConvergence(v)
}

// predictNoConvergence is rule 6 of DecideSwitch.
func predictNoConvergence(v SwitchView) SwitchDecision {
	d := v.Decision
	switch {
	case d.Action != Continue:
		return SwitchDecision{Why: "the controller's decision is " + d.Action.String()}
	case len(v.Progress) < progressWindow:
		return SwitchDecision{Why: "too few rounds yet to judge convergence"}
	case !d.Predicted:
		return SwitchDecision{Why: "no downtime prediction yet"}
	case d.ExpectedDowntime <= v.DowntimeLimit:
		return SwitchDecision{Why: fmt.Sprintf("expected downtime %v fits the %v limit: precopy converges", d.ExpectedDowntime, v.DowntimeLimit)}
	}
	old, now := v.Progress[len(v.Progress)-progressWindow], v.Progress[len(v.Progress)-1]
	span := now.At - old.At
	if span <= 0 {
		return SwitchDecision{Why: "no time between the rounds judged"}
	}
	if now.Pages >= old.Pages {
		return SwitchDecision{Switch: true, Reason: SwitchController,
			Why: fmt.Sprintf("the dirty set stopped shrinking (%d pages %v ago, %d now) and the expected downtime %v is over the %v limit",
				old.Pages, span.Round(time.Millisecond), now.Pages, d.ExpectedDowntime.Round(time.Millisecond), v.DowntimeLimit)}
	}
	if v.MaxTime < 0 {
		return SwitchDecision{Why: "the dirty set shrinks and there is no time limit"}
	}
	// The pages that fit the limit, at the rate the prediction assumes.
	fit := uint64(float64(now.Pages) * float64(v.DowntimeLimit) / float64(d.ExpectedDowntime))
	drain := float64(old.Pages-now.Pages) / span.Seconds() // pages per second
	eta := secondsToDuration(float64(now.Pages-fit) / drain)
	left := v.MaxTime - v.Elapsed
	if eta > left {
		return SwitchDecision{Switch: true, Reason: SwitchController,
			Why: fmt.Sprintf("the dirty set shrinks by %.0f pages/s: %d pages would fit the %v limit in about %v, past the %v left of the time limit",
				drain, now.Pages, v.DowntimeLimit, eta.Round(time.Second), left.Round(time.Second))}
	}
	return SwitchDecision{Why: fmt.Sprintf("the dirty set shrinks by %.0f pages/s: it fits the %v limit in about %v", drain, v.DowntimeLimit, eta.Round(time.Second))}
}
