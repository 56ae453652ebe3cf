package precopy

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// Errors of the convergence policy.
var (
	// ErrBadPolicy is returned by NewController for a Policy that cannot be
	// followed (negative durations, throttle figures out of range).
	ErrBadPolicy = errors.New("precopy: bad policy")
	// ErrMaxTime is the error of a Fail decision: the migration ran past
	// Policy.MaxTime without completing.
	ErrMaxTime = errors.New("precopy: migration exceeded its maximum time")
)

// Defaults of Policy. The downtime limit and the throttle figures are the
// ones QEMU ships with, so operators' expectations carry over.
const (
	DefaultDowntimeLimit     = 300 * time.Millisecond
	DefaultDowntimeTarget    = 20 * time.Millisecond
	DefaultMinRetryInterval  = time.Second
	DefaultMaxTime           = 10 * time.Minute
	DefaultThrottleInitial   = 20
	DefaultThrottleStep      = 10
	DefaultThrottleMax       = 99
	DefaultThrottleTrigger   = 50
	DefaultThrottleRounds    = 2
	DefaultStateSaveEstimate = 10 * time.Millisecond
	// DefaultRateTimeConstant is how fast the estimators forget: an
	// observation spanning this long gets weight 1-1/e.
	DefaultRateTimeConstant = time.Second
)

// Policy is what a migration (or any precopy run) is allowed to do. Zero
// fields take the defaults above, except MaxBandwidth (0 = unlimited),
// MaxTime (0 = DefaultMaxTime; negative = no limit) and AutoConverge (off).
type Policy struct {
	// DowntimeLimit bounds the stop-and-copy: pause on the source to
	// resume on the destination. It is a ceiling, not a goal: the
	// controller aims at DowntimeTarget.
	DowntimeLimit time.Duration
	// DowntimeTarget is the stop-and-copy the controller aims for. A
	// prediction that fits it completes at once; one that fits only the
	// limit completes once the dirty set stops shrinking (a round that
	// leaves more than three quarters of the set before it), since until
	// then another round buys a shorter pause. Zero means
	// DefaultDowntimeTarget, or DowntimeLimit when that is smaller; a
	// target equal to the limit completes as soon as the limit fits.
	DowntimeTarget time.Duration
	// MinRetryInterval is the least time between an aborted completion
	// attempt and the next one.
	MinRetryInterval time.Duration
	// MaxTime is how long the whole migration may run before it fails.
	MaxTime time.Duration
	// MaxBandwidth caps the send rate in bytes per second; 0 = unlimited.
	// The engine enforces it with a Limiter; the Controller uses it to
	// keep its bandwidth figure honest when a burst outran the cap.
	MaxBandwidth uint64
	// AutoConverge throttles the vCPUs when the guest dirties memory
	// faster than the link can carry it.
	AutoConverge bool
	// ThrottleInitial is the first throttle step in per cent, ThrottleStep
	// each later increase, ThrottleMax the cap (at most 99: a guest
	// throttled to 100 % would never finish anything).
	ThrottleInitial, ThrottleStep, ThrottleMax int
	// ThrottleTrigger is the per cent of the bandwidth that the dirty
	// byte rate must exceed, for ThrottleRounds consecutive rounds, before
	// the throttle goes up (QEMU: 50 % for 2 sync periods).
	ThrottleTrigger, ThrottleRounds int
	// StateSaveEstimate is the assumed time to save and send vCPU and
	// device state until ObserveStateSave gives a measured one.
	StateSaveEstimate time.Duration
	// RateTimeConstant is the smoothing of the bandwidth and dirty-rate
	// estimators.
	RateTimeConstant time.Duration
}

// DefaultPolicy returns the defaults with auto-converge on.
func DefaultPolicy() Policy {
	p := Policy{AutoConverge: true}
	return p.withDefaults()
}

func (p Policy) withDefaults() Policy {
	if p.DowntimeLimit == 0 {
		p.DowntimeLimit = DefaultDowntimeLimit
	}
	if p.DowntimeTarget == 0 {
		p.DowntimeTarget = min(DefaultDowntimeTarget, p.DowntimeLimit)
	}
	if p.MinRetryInterval == 0 {
		p.MinRetryInterval = DefaultMinRetryInterval
	}
	if p.MaxTime == 0 {
		p.MaxTime = DefaultMaxTime
	}
	if p.ThrottleInitial == 0 {
		p.ThrottleInitial = DefaultThrottleInitial
	}
	if p.ThrottleStep == 0 {
		p.ThrottleStep = DefaultThrottleStep
	}
	if p.ThrottleMax == 0 {
		p.ThrottleMax = DefaultThrottleMax
	}
	if p.ThrottleTrigger == 0 {
		p.ThrottleTrigger = DefaultThrottleTrigger
	}
	if p.ThrottleRounds == 0 {
		p.ThrottleRounds = DefaultThrottleRounds
	}
	if p.StateSaveEstimate == 0 {
		p.StateSaveEstimate = DefaultStateSaveEstimate
	}
	if p.RateTimeConstant == 0 {
		p.RateTimeConstant = DefaultRateTimeConstant
	}
	return p
}

// Validate reports whether p, with its zero fields defaulted, can be
// followed; the error wraps ErrBadPolicy. Command-line parsing calls it to
// reject flags before a migration starts.
func (p Policy) Validate() error { return p.withDefaults().validate() }

// validate checks a policy whose defaults are already filled in.
func (p Policy) validate() error {
	switch {
	case p.DowntimeLimit < 0:
		return fmt.Errorf("%w: negative downtime limit %v", ErrBadPolicy, p.DowntimeLimit)
	case p.DowntimeTarget < 0 || p.DowntimeTarget > p.DowntimeLimit:
		return fmt.Errorf("%w: downtime target %v not in 0..%v (the limit)", ErrBadPolicy, p.DowntimeTarget, p.DowntimeLimit)
	case p.MinRetryInterval < 0:
		return fmt.Errorf("%w: negative minimum retry interval %v", ErrBadPolicy, p.MinRetryInterval)
	case p.StateSaveEstimate < 0:
		return fmt.Errorf("%w: negative state save estimate %v", ErrBadPolicy, p.StateSaveEstimate)
	case p.RateTimeConstant < 0:
		return fmt.Errorf("%w: negative rate time constant %v", ErrBadPolicy, p.RateTimeConstant)
	case p.ThrottleMax < 1 || p.ThrottleMax > 99:
		return fmt.Errorf("%w: throttle max %d%% not in 1..99", ErrBadPolicy, p.ThrottleMax)
	case p.ThrottleInitial < 1 || p.ThrottleInitial > p.ThrottleMax:
		return fmt.Errorf("%w: throttle initial %d%% not in 1..%d", ErrBadPolicy, p.ThrottleInitial, p.ThrottleMax)
	case p.ThrottleStep < 1 || p.ThrottleStep > 99:
		return fmt.Errorf("%w: throttle step %d%% not in 1..99", ErrBadPolicy, p.ThrottleStep)
	case p.ThrottleTrigger < 1 || p.ThrottleTrigger > 1000:
		return fmt.Errorf("%w: throttle trigger %d%% not in 1..1000", ErrBadPolicy, p.ThrottleTrigger)
	case p.ThrottleRounds < 1:
		return fmt.Errorf("%w: throttle rounds %d below 1", ErrBadPolicy, p.ThrottleRounds)
	}
	return nil
}

// minRateSample is the shortest span a rate is computed over. Shorter
// observations (including zero-length ones) are carried into the next, so
// a round that "took 0 ns" on a coarse clock never yields an infinite rate.
const minRateSample = time.Millisecond

// RateEstimator smooths a rate from observations of an amount over a span
// of time. The smoothing is an exponential moving average weighted by time:
// an observation spanning d moves the estimate by 1-exp(-d/tau) of the way
// to its own rate, so one long round counts for more than one short one and
// the estimate does not depend on how the caller slices its work.
//
// The zero value uses DefaultRateTimeConstant.
type RateEstimator struct {
	tau time.Duration

	rate  float64 // per second
	known bool

	// pending holds observations too short to be measured on their own.
	pendAmount float64
	pendSpan   time.Duration
}

// NewRateEstimator returns an estimator with time constant tau
// (0 = DefaultRateTimeConstant).
func NewRateEstimator(tau time.Duration) RateEstimator {
	return RateEstimator{tau: tau}
}

// Observe records that amount units were moved over span. Negative spans
// count as zero.
func (e *RateEstimator) Observe(amount uint64, span time.Duration) {
	if span < 0 {
		span = 0
	}
	e.pendAmount += float64(amount)
	e.pendSpan += span
	if e.pendSpan < minRateSample {
		return
	}
	sample := e.pendAmount / e.pendSpan.Seconds()
	tau := e.tau
	if tau <= 0 {
		tau = DefaultRateTimeConstant
	}
	if !e.known {
		e.rate, e.known = sample, true
	} else {
		w := 1 - math.Exp(-e.pendSpan.Seconds()/tau.Seconds())
		e.rate += w * (sample - e.rate)
	}
	e.pendAmount, e.pendSpan = 0, 0
}

// Rate returns the smoothed rate per second and whether any observation
// long enough to measure has been made.
func (e *RateEstimator) Rate() (perSecond float64, ok bool) {
	return e.rate, e.known
}

// ParseBandwidth reads a rate in bits (100Mbit, 1Gbit) or bytes (50MB,
// 12MiB) per second, with an optional "/s", into bytes per second (a
// MaxBandwidth; 0: no limit).
func ParseBandwidth(s string) (uint64, error) {
	t := strings.TrimSuffix(strings.TrimSpace(s), "/s")
	units := []struct {
		suffix string
		mult   float64
	}{
		{"Gbit", 1e9 / 8}, {"Mbit", 1e6 / 8}, {"Kbit", 1e3 / 8}, {"bit", 1.0 / 8},
		{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
		{"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3}, {"B", 1},
	}
	mult := 1.0
	for _, u := range units {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSuffix(t, u.suffix), u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || !(v >= 0) || !(v*mult <= 1e15) { // NaN and Inf fail both
		return 0, fmt.Errorf("bad rate %q: want e.g. 100Mbit, 1Gbit, 50MB or 0 for no limit", s)
	}
	return uint64(v * mult), nil
}
