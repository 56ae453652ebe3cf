package precopy

import (
	"errors"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

var t0 = time.Unix(1_700_000_000, 0)

func mustController(t *testing.T, p Policy) *Controller {
	t.Helper()
	c, err := NewController(p, t0)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// round builds the stats of a round lasting span in which sent pages went
// over the wire uncompressed and dirtied pages were found, leaving
// remaining dirty.
func round(n int, sent, dirtied, remaining uint64, span time.Duration) RoundStats {
	return RoundStats{
		Round: n, PagesSent: sent, BytesSent: sent * guest.PageSize, SendTime: span,
		PagesDirtied: dirtied, DirtyInterval: span, RemainingPages: remaining,
	}
}

func TestPolicyDefaults(t *testing.T) {
	p := DefaultPolicy()
	want := Policy{
		DowntimeLimit: 300 * time.Millisecond, DowntimeTarget: 20 * time.Millisecond, MinRetryInterval: time.Second, MaxTime: 10 * time.Minute,
		AutoConverge: true, ThrottleInitial: 20, ThrottleStep: 10, ThrottleMax: 99,
		ThrottleTrigger: 50, ThrottleRounds: 2, StateSaveEstimate: 10 * time.Millisecond,
		RateTimeConstant: time.Second,
	}
	if p != want {
		t.Fatalf("DefaultPolicy = %+v\nwant %+v", p, want)
	}
	if err := p.Validate(); err != nil {
		t.Fatalf("defaults invalid: %v", err)
	}
	c := mustController(t, Policy{})
	if got := c.Policy(); got.DowntimeLimit != 300*time.Millisecond || got.AutoConverge || got.MaxBandwidth != 0 {
		t.Fatalf("zero policy filled as %+v", got)
	}
}

func TestPolicyValidate(t *testing.T) {
	for _, tt := range []struct {
		name string
		p    Policy
	}{
		{"negative downtime", Policy{DowntimeLimit: -1}},
		{"negative retry", Policy{MinRetryInterval: -1}},
		{"negative state save", Policy{StateSaveEstimate: -1}},
		{"negative time constant", Policy{RateTimeConstant: -1}},
		{"throttle max 100", Policy{ThrottleMax: 100}},
		{"throttle max negative", Policy{ThrottleMax: -1}},
		{"initial above max", Policy{ThrottleInitial: 60, ThrottleMax: 50}},
		{"negative initial", Policy{ThrottleInitial: -5}},
		{"step 100", Policy{ThrottleStep: 100}},
		{"trigger negative", Policy{ThrottleTrigger: -1}},
		{"rounds negative", Policy{ThrottleRounds: -1}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.p.Validate(); !errors.Is(err, ErrBadPolicy) {
				t.Fatalf("Validate(%+v) = %v", tt.p, err)
			}
			_, err := NewController(tt.p, t0)
			if !errors.Is(err, ErrBadPolicy) {
				t.Fatalf("NewController(%+v) = %v, want ErrBadPolicy", tt.p, err)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("multi-line error %q", err)
			}
		})
	}
}

func TestRateEstimator(t *testing.T) {
	type obs struct {
		amount uint64
		span   time.Duration
	}
	tests := []struct {
		name   string
		obs    []obs
		want   float64
		wantOK bool
	}{
		{"nothing observed", nil, 0, false},
		{"zero span is carried, not divided", []obs{{1000, 0}}, 0, false},
		{"negative span counts as zero", []obs{{1000, -time.Second}}, 0, false},
		{"first sample taken as is", []obs{{1000, time.Second}}, 1000, true},
		{"carried amount joins the next span", []obs{{1000, 0}, {1000, time.Second}}, 2000, true},
		{"sub-millisecond spans add up", []obs{{10, 500 * time.Microsecond}, {10, 500 * time.Microsecond}}, 20000, true},
		{"zero amount is a real zero rate", []obs{{0, time.Second}}, 0, true},
		// 1000/s then 3000/s over one time constant: 1000 + (1-1/e)*2000.
		{"time weighted", []obs{{1000, time.Second}, {3000, time.Second}}, 1000 + (1-math.Exp(-1))*2000, true},
		// A very long observation all but replaces the past.
		{"long span dominates", []obs{{1000, time.Second}, {0, time.Minute}}, 1000 * math.Exp(-60), true},
		// Many short spans move the estimate as much as one long one.
		{"slicing does not matter much", []obs{{1000, time.Second}, {150, 50 * time.Millisecond}, {150, 50 * time.Millisecond}}, 1000 + 2000*(1-math.Exp(-0.1)), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := NewRateEstimator(time.Second)
			for _, o := range tt.obs {
				e.Observe(o.amount, o.span)
			}
			got, ok := e.Rate()
			if ok != tt.wantOK || math.Abs(got-tt.want) > 1e-6*math.Max(1, tt.want) {
				t.Fatalf("Rate = %v, %v; want %v, %v", got, ok, tt.want, tt.wantOK)
			}
		})
	}
	var zero RateEstimator // zero value works with the default constant
	zero.Observe(5, time.Second)
	zero.Observe(5, time.Second)
	if r, ok := zero.Rate(); !ok || r != 5 {
		t.Fatalf("zero-value estimator: %v %v", r, ok)
	}
}

// TestRoundDoneConvergence runs whole scenarios: a sequence of rounds, each
// with the action, throttle and prediction expected after it.
func TestRoundDoneConvergence(t *testing.T) {
	const MB = 1 << 20
	pagesPerSec := func(bytesPerSec uint64) uint64 { return bytesPerSec / guest.PageSize }
	type want struct {
		action    Action
		throttle  int
		predicted bool
		expected  time.Duration // checked when predicted; ±1ms
	}
	type step struct {
		at time.Duration // since t0
		r  RoundStats
		w  want
	}
	bw := pagesPerSec(100 * MB) // pages per second the link moves: 100 MiB/s
	tests := []struct {
		name  string
		p     Policy
		steps []step
	}{
		{
			name: "idle guest completes after round 0",
			p:    Policy{},
			steps: []step{
				// 1 s at 100 MiB/s, 256 pages (1 MiB) dirty: 10 ms + 10 ms state.
				{time.Second, round(0, bw, 256, 256, time.Second), want{TryComplete, 0, true, 20 * time.Millisecond}},
			},
		},
		{
			name: "nothing left completes on the state save alone",
			p:    Policy{},
			steps: []step{
				{time.Second, round(0, bw, 0, 0, time.Second), want{TryComplete, 0, true, 10 * time.Millisecond}},
			},
		},
		{
			name: "no bandwidth yet: continue without a prediction",
			p:    Policy{},
			steps: []step{
				{0, RoundStats{Round: 0, PagesDirtied: 10, RemainingPages: 10}, want{Continue, 0, false, 0}},
				// A later measured round makes the prediction.
				{time.Second, round(1, bw, 10, 10, time.Second), want{TryComplete, 0, true, 10*time.Millisecond + 390625*time.Nanosecond}},
			},
		},
		{
			name: "converges as the dirty set shrinks",
			p:    Policy{},
			steps: []step{
				// 30 MiB dirty = 300 ms + 10 ms: over.
				{time.Second, round(0, bw, 7680, 7680, time.Second), want{Continue, 0, true, 310 * time.Millisecond}},
				// 25 MiB = 250 ms + 10 ms: fits.
				{1300 * time.Millisecond, round(1, 7680, 6400, 6400, 300*time.Millisecond), want{TryComplete, 0, true, 260 * time.Millisecond}},
			},
		},
		{
			name: "exactly at the limit fits",
			p:    Policy{DowntimeLimit: 110 * time.Millisecond, DowntimeTarget: 110 * time.Millisecond},
			steps: []step{
				{time.Second, round(0, bw, 2560, 2560, time.Second), want{TryComplete, 0, true, 110 * time.Millisecond}},
			},
		},
		{
			name: "dirty rate over half the link throttles after two rounds, then steps",
			p:    Policy{AutoConverge: true},
			steps: []step{
				// Dirtying 60 MiB/s against 100 MiB/s: over 50 %.
				{1 * time.Second, round(0, bw, bw*6/10, bw*6/10, time.Second), want{Continue, 0, true, 610 * time.Millisecond}},
				{2 * time.Second, round(1, bw, bw*6/10, bw*6/10, time.Second), want{Continue, 20, true, 610 * time.Millisecond}},
				{3 * time.Second, round(2, bw, bw*6/10, bw*6/10, time.Second), want{Continue, 20, true, 610 * time.Millisecond}},
				{4 * time.Second, round(3, bw, bw*6/10, bw*6/10, time.Second), want{Continue, 30, true, 610 * time.Millisecond}},
			},
		},
		{
			name: "dirty rate under half the link does not throttle",
			p:    Policy{AutoConverge: true},
			steps: []step{
				{1 * time.Second, round(0, bw, bw*4/10, bw*4/10, time.Second), want{Continue, 0, true, 410 * time.Millisecond}},
				{2 * time.Second, round(1, bw, bw*4/10, bw*4/10, time.Second), want{Continue, 0, true, 410 * time.Millisecond}},
				{3 * time.Second, round(2, bw, bw*4/10, bw*4/10, time.Second), want{Continue, 0, true, 410 * time.Millisecond}},
			},
		},
		{
			name: "high rounds must be consecutive",
			p:    Policy{AutoConverge: true},
			steps: []step{
				{1 * time.Second, round(0, bw, bw*6/10, bw*6/10, time.Second), want{Continue, 0, true, 610 * time.Millisecond}},
				{2 * time.Second, round(1, bw, bw*4/10, bw*6/10, time.Second), want{Continue, 0, true, 610 * time.Millisecond}},
				{3 * time.Second, round(2, bw, bw*6/10, bw*6/10, time.Second), want{Continue, 0, true, 610 * time.Millisecond}},
				{4 * time.Second, round(3, bw, bw*6/10, bw*6/10, time.Second), want{Continue, 20, true, 610 * time.Millisecond}},
			},
		},
		{
			name: "auto-converge off never throttles",
			p:    Policy{},
			steps: []step{
				{1 * time.Second, round(0, bw, 2*bw, 2*bw, time.Second), want{Continue, 0, true, 2010 * time.Millisecond}},
				{2 * time.Second, round(1, bw, 2*bw, 2*bw, time.Second), want{Continue, 0, true, 2010 * time.Millisecond}},
				{3 * time.Second, round(2, bw, 2*bw, 2*bw, time.Second), want{Continue, 0, true, 2010 * time.Millisecond}},
			},
		},
		{
			name: "custom trigger and one round",
			p:    Policy{AutoConverge: true, ThrottleTrigger: 80, ThrottleRounds: 1, ThrottleInitial: 50, ThrottleStep: 25},
			steps: []step{
				{1 * time.Second, round(0, bw, bw*7/10, bw*7/10, time.Second), want{Continue, 0, true, 710 * time.Millisecond}},
				{2 * time.Second, round(1, bw, bw*9/10, bw*9/10, time.Second), want{Continue, 50, true, 910 * time.Millisecond}},
				{3 * time.Second, round(2, bw, bw*9/10, bw*9/10, time.Second), want{Continue, 75, true, 910 * time.Millisecond}},
				{4 * time.Second, round(3, bw, bw*9/10, bw*9/10, time.Second), want{Continue, 99, true, 910 * time.Millisecond}},
			},
		},
		{
			name: "a round that sent nothing is judged against the smoothed bandwidth",
			p:    Policy{AutoConverge: true, ThrottleRounds: 1},
			steps: []step{
				{1 * time.Second, round(0, bw, 0, 2*bw, time.Second), want{Continue, 0, true, 2010 * time.Millisecond}},
				{2 * time.Second, RoundStats{Round: 1, PagesDirtied: bw, DirtyInterval: time.Second, RemainingPages: 2 * bw},
					want{Continue, 20, true, 2010 * time.Millisecond}},
			},
		},
		{
			name: "throttle is not raised while completing",
			p:    Policy{AutoConverge: true, ThrottleRounds: 1},
			steps: []step{
				// Dirtying fast but only for a short interval: few pages left.
				{1 * time.Second, RoundStats{Round: 0, PagesSent: bw, BytesSent: bw * guest.PageSize, SendTime: time.Second,
					PagesDirtied: 256, DirtyInterval: time.Millisecond, RemainingPages: 256},
					want{TryComplete, 0, true, 20 * time.Millisecond}},
			},
		},
		{
			name: "compression makes the transfer rate count, not the wire rate",
			p:    Policy{DowntimeTarget: DefaultDowntimeLimit},
			steps: []step{
				// 100 MiB of pages in 1 s for 25 MiB on the wire;
				// 25 MiB left = 250 ms + 10 ms, fits, though at the
				// wire rate (25 MiB/s) it would take 1 s.
				{time.Second, RoundStats{Round: 0, PagesSent: bw, BytesSent: 25 * MB, SendTime: time.Second,
					PagesDirtied: 6400, DirtyInterval: time.Second, RemainingPages: 6400},
					want{TryComplete, 0, true, 260 * time.Millisecond}},
			},
		},
		{
			name: "wire bytes only when pages are not counted",
			p:    Policy{},
			steps: []step{
				{time.Second, RoundStats{Round: 0, BytesSent: 100 * MB, SendTime: time.Second, RemainingPages: 2560},
					want{TryComplete, 0, true, 110 * time.Millisecond}},
			},
		},
		{
			name: "a burst above MaxBandwidth is not trusted",
			p:    Policy{MaxBandwidth: 50 * MB, DowntimeTarget: DefaultDowntimeLimit},
			steps: []step{
				// Measured 100 MiB/s, cap 50 MiB/s: 10 MiB left takes 200 ms, not 100.
				{time.Second, round(0, bw, 2560, 2560, time.Second), want{TryComplete, 0, true, 210 * time.Millisecond}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := mustController(t, tt.p)
			for i, s := range tt.steps {
				d := c.RoundDone(s.r, t0.Add(s.at))
				if d.Action != s.w.action || d.Throttle != s.w.throttle || d.Predicted != s.w.predicted {
					t.Fatalf("round %d: got %v throttle %d predicted %v (%s); want %v throttle %d predicted %v",
						i, d.Action, d.Throttle, d.Predicted, d.Reason, s.w.action, s.w.throttle, s.w.predicted)
				}
				if s.w.predicted {
					if diff := d.ExpectedDowntime - s.w.expected; diff < -time.Millisecond || diff > time.Millisecond {
						t.Fatalf("round %d: expected downtime %v, want %v (%s)", i, d.ExpectedDowntime, s.w.expected, d.Reason)
					}
				}
				if d.Reason == "" || strings.Contains(d.Reason, "\n") {
					t.Fatalf("round %d: reason %q", i, d.Reason)
				}
				if d.Err != nil {
					t.Fatalf("round %d: unexpected error %v", i, d.Err)
				}
			}
			if got := c.ThrottlePercent(); got != tt.steps[len(tt.steps)-1].w.throttle {
				t.Fatalf("ThrottlePercent = %d", got)
			}
		})
	}
}

// TestThrottleCap drives a guest that never converges and checks every
// step of the throttle up to the cap.
func TestThrottleCap(t *testing.T) {
	for _, tt := range []struct {
		name string
		p    Policy
		want []int // throttle after each pair of rounds
	}{
		{"defaults", Policy{AutoConverge: true}, []int{20, 30, 40, 50, 60, 70, 80, 90, 99, 99, 99}},
		{"low cap", Policy{AutoConverge: true, ThrottleMax: 45}, []int{20, 30, 40, 45, 45}},
		{"big step", Policy{AutoConverge: true, ThrottleInitial: 90, ThrottleStep: 50}, []int{90, 99, 99}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := mustController(t, tt.p)
			bw := uint64(25600) // 100 MiB/s in pages
			now := t0
			for i, want := range tt.want {
				var d Decision
				for k := 0; k < 2; k++ {
					now = now.Add(time.Second)
					d = c.RoundDone(round(2*i+k, bw, bw, bw, time.Second), now)
				}
				if d.Action != Continue || d.Throttle != want {
					t.Fatalf("step %d: %v throttle %d, want continue %d (%s)", i, d.Action, d.Throttle, want, d.Reason)
				}
			}
		})
	}
}

func TestAbortBackoff(t *testing.T) {
	for _, tt := range []struct {
		name     string
		retry    time.Duration
		after    []time.Duration // rounds after the abort
		want     []Action
		attempts int
	}{
		{"default 1s", 0,
			[]time.Duration{0, 500 * time.Millisecond, 999 * time.Millisecond, time.Second},
			[]Action{Continue, Continue, Continue, TryComplete}, 2},
		{"custom 3s", 3 * time.Second,
			[]time.Duration{time.Second, 2 * time.Second, 3 * time.Second, 3 * time.Second},
			[]Action{Continue, Continue, TryComplete, TryComplete}, 3},
		{"tiny interval", time.Nanosecond,
			[]time.Duration{time.Nanosecond},
			[]Action{TryComplete}, 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := mustController(t, Policy{MinRetryInterval: tt.retry})
			fits := round(0, 25600, 256, 256, time.Second)
			now := t0.Add(time.Second)
			if d := c.RoundDone(fits, now); d.Action != TryComplete {
				t.Fatalf("first: %v (%s)", d.Action, d.Reason)
			}
			abortAt := now.Add(50 * time.Millisecond)
			c.CompletionAborted(abortAt, errors.New("flush missed its deadline"))
			for i, after := range tt.after {
				fits.Round++
				d := c.RoundDone(fits, abortAt.Add(after))
				if d.Action != tt.want[i] {
					t.Fatalf("%v after abort: %v, want %v (%s)", after, d.Action, tt.want[i], d.Reason)
				}
			}
			s := c.Stats()
			if s.CompletionAttempts != tt.attempts || s.AbortedCompletions != 1 || s.LastAbortReason != "flush missed its deadline" {
				t.Fatalf("stats %+v", s)
			}
		})
	}
}

func TestEveryAbortCounted(t *testing.T) {
	c := mustController(t, Policy{MinRetryInterval: 100 * time.Millisecond})
	now := t0
	for i := 0; i < 5; i++ {
		now = now.Add(time.Second)
		d := c.RoundDone(round(i, 25600, 10, 10, time.Second), now)
		if d.Action != TryComplete {
			t.Fatalf("attempt %d: %v (%s)", i, d.Action, d.Reason)
		}
		c.CompletionAborted(now, nil)
	}
	if got, want := c.AbortedCompletions(), 5; got != want {
		t.Fatalf("aborted %d, want %d", got, want)
	}
	if got := c.CompletionAttempts(); got != 5 {
		t.Fatalf("attempts %d", got)
	}
	if got := c.Stats().LastAbortReason; got != "unknown" {
		t.Fatalf("nil reason recorded as %q", got)
	}
}

func TestMaxTimeFails(t *testing.T) {
	for _, tt := range []struct {
		name    string
		maxTime time.Duration
		at      time.Duration
		fail    bool
	}{
		{"default limit not reached", 0, 9 * time.Minute, false},
		{"default limit reached", 0, 10 * time.Minute, true},
		{"custom limit just before", 5 * time.Second, 5*time.Second - time.Nanosecond, false},
		{"custom limit exactly", 5 * time.Second, 5 * time.Second, true},
		{"no limit", -1, 1000 * time.Hour, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := mustController(t, Policy{MaxTime: tt.maxTime})
			// A guest that is far from converging.
			d := c.RoundDone(round(0, 25600, 25600*10, 25600*10, time.Second), t0.Add(tt.at))
			if got := d.Action == Fail; got != tt.fail {
				t.Fatalf("action %v, want fail=%v (%s)", d.Action, tt.fail, d.Reason)
			}
			dl, ok := c.Deadline()
			if tt.maxTime < 0 {
				if ok {
					t.Fatalf("deadline %v for no limit", dl)
				}
				return
			}
			if !ok || !dl.Equal(t0.Add(c.Policy().MaxTime)) {
				t.Fatalf("deadline %v %v", dl, ok)
			}
			if !tt.fail {
				return
			}
			if !errors.Is(d.Err, ErrMaxTime) {
				t.Fatalf("err %v", d.Err)
			}
			// Failure is final, even for a round that would fit.
			d = c.RoundDone(round(1, 25600, 0, 0, time.Second), t0.Add(tt.at+time.Second))
			if d.Action != Fail || !errors.Is(d.Err, ErrMaxTime) {
				t.Fatalf("after failing: %v %v", d.Action, d.Err)
			}
		})
	}
}

// TestZeroSafety feeds degenerate figures; nothing may panic, divide by
// zero into Inf/NaN, or predict a negative downtime.
func TestZeroSafety(t *testing.T) {
	for _, tt := range []struct {
		name      string
		rounds    []RoundStats
		predicted bool
		min       time.Duration
	}{
		{"all zero", []RoundStats{{}}, true, 10 * time.Millisecond},
		{"zero durations with traffic", []RoundStats{{PagesSent: 100, BytesSent: 409600, PagesDirtied: 100, RemainingPages: 100}}, false, 0},
		{"negative durations", []RoundStats{{PagesSent: 100, BytesSent: 409600, SendTime: -time.Second, PagesDirtied: 5, DirtyInterval: -time.Second, RemainingPages: 5}}, false, 0},
		{"zero bandwidth over a real span", []RoundStats{{SendTime: time.Second, DirtyInterval: time.Second, PagesDirtied: 10, RemainingPages: 10}}, false, 0},
		{"crawling link, huge remainder saturates", []RoundStats{{PagesSent: 1, BytesSent: 1, SendTime: 1000 * time.Hour, RemainingPages: math.MaxUint64}}, true, math.MaxInt64},
		{"huge page counts", []RoundStats{{PagesSent: math.MaxUint64, BytesSent: math.MaxUint64, SendTime: time.Second, PagesDirtied: math.MaxUint64, DirtyInterval: time.Second, RemainingPages: math.MaxUint64}}, true, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := mustController(t, Policy{AutoConverge: true, ThrottleRounds: 1})
			var d Decision
			for i, r := range tt.rounds {
				d = c.RoundDone(r, t0.Add(time.Duration(i+1)*time.Second))
			}
			if d.Predicted != tt.predicted {
				t.Fatalf("predicted %v, want %v (%s)", d.Predicted, tt.predicted, d.Reason)
			}
			if d.ExpectedDowntime < tt.min || d.ExpectedDowntime < 0 {
				t.Fatalf("expected downtime %v, want >= %v", d.ExpectedDowntime, tt.min)
			}
			s := c.Stats()
			for _, f := range []float64{s.DirtyRate, s.Bandwidth, s.TransferRate, c.BandwidthMbps(), c.DirtyRate()} {
				if math.IsNaN(f) || math.IsInf(f, 0) || f < 0 {
					t.Fatalf("bad figure in %+v", s)
				}
			}
			if b := c.FlushBudget(t0, t0); b < 0 {
				t.Fatalf("flush budget %v", b)
			}
		})
	}
}

func TestFlushBudget(t *testing.T) {
	ms := time.Millisecond
	for _, tt := range []struct {
		name      string
		remaining uint64 // pages, at 100 MiB/s (2.5 MiB per 10 ms... 256 pages = 10 ms)
		elapsed   time.Duration
		want      time.Duration
		left      time.Duration
	}{
		// expected = 10 ms send + 10 ms state: flush may use 300-20-elapsed.
		{"fresh pause", 256, 0, 280 * ms, 300 * ms},
		{"some pause used", 256, 50 * ms, 230 * ms, 250 * ms},
		{"budget exactly spent", 256, 280 * ms, 0, 20 * ms},
		{"over budget", 256, 400 * ms, 0, 0},
		{"clock went backwards", 256, -time.Second, 280 * ms, 300 * ms},
		{"nothing to send", 0, 0, 290 * ms, 300 * ms},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := mustController(t, Policy{})
			d := c.RoundDone(round(0, 25600, tt.remaining, tt.remaining, time.Second), t0.Add(time.Second))
			if d.Action != TryComplete {
				t.Fatalf("%v (%s)", d.Action, d.Reason)
			}
			pause := t0.Add(2 * time.Second)
			now := pause.Add(tt.elapsed)
			if got := c.FlushBudget(pause, now); got != tt.want {
				t.Fatalf("FlushBudget = %v, want %v", got, tt.want)
			}
			if got := c.DowntimeLeft(pause, now); got != tt.left {
				t.Fatalf("DowntimeLeft = %v, want %v", got, tt.left)
			}
		})
	}
	// Without any prediction the flush keeps room for the state save only.
	c := mustController(t, Policy{})
	if got := c.FlushBudget(t0, t0); got != 290*ms {
		t.Fatalf("FlushBudget before any round = %v", got)
	}
}

func TestObserveStateSave(t *testing.T) {
	c := mustController(t, Policy{})
	c.ObserveStateSave(-time.Second) // ignored
	c.ObserveStateSave(100 * time.Millisecond)
	c.ObserveStateSave(200 * time.Millisecond)
	if got := c.Stats().StateSaveEstimate; got != 150*time.Millisecond {
		t.Fatalf("estimate %v", got)
	}
	// 256 pages at 100 MiB/s = 10 ms + 150 ms.
	d := c.RoundDone(round(0, 25600, 256, 256, time.Second), t0.Add(time.Second))
	if d.ExpectedDowntime != 160*time.Millisecond {
		t.Fatalf("expected %v", d.ExpectedDowntime)
	}
	c.ObserveStateSave(time.Second)
	d = c.RoundDone(round(1, 25600, 256, 256, time.Second), t0.Add(2*time.Second))
	if d.Action != Continue {
		t.Fatalf("slow state save still fits: %v %v", d.Action, d.ExpectedDowntime)
	}
}

func TestStatsAccessors(t *testing.T) {
	c := mustController(t, Policy{})
	c.RoundDone(round(0, 25600, 2560, 25600, time.Second), t0.Add(time.Second))
	if got := c.BandwidthMbps(); math.Abs(got-100*1<<20*8/1e6) > 0.01 {
		t.Fatalf("BandwidthMbps %v", got)
	}
	if got := c.DirtyRate(); got != 2560 {
		t.Fatalf("DirtyRate %v", got)
	}
	if exp, ok := c.ExpectedDowntime(); !ok || exp != 1010*time.Millisecond {
		t.Fatalf("ExpectedDowntime %v %v", exp, ok)
	}
	if s := c.Stats(); s.Rounds != 1 || s.RemainingPages != 25600 {
		t.Fatalf("stats %+v", s)
	}
	if d, ok := c.Predict(0); !ok || d != 10*time.Millisecond {
		t.Fatalf("Predict(0) = %v %v", d, ok)
	}
	if d, ok := c.Predict(256); !ok || d != 20*time.Millisecond {
		t.Fatalf("Predict(256) = %v %v", d, ok)
	}
	if _, ok := mustController(t, Policy{}).Predict(1); ok {
		t.Fatal("prediction without a bandwidth figure")
	}
	for _, a := range []Action{Continue, TryComplete, Fail, Action(7)} {
		if a.String() == "" {
			t.Fatal("empty action name")
		}
	}
}

// TestControllerConcurrentReaders proves the status accessors can run
// beside the engine (meaningful under -race).
func TestControllerConcurrentReaders(t *testing.T) {
	c := mustController(t, Policy{AutoConverge: true})
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
				_ = c.Stats()
				_ = c.FlushBudget(t0, t0)
			}
		}
	}()
	now := t0
	for i := 0; i < 200; i++ {
		now = now.Add(10 * time.Millisecond)
		d := c.RoundDone(round(i, 256, 200, 200, 10*time.Millisecond), now)
		if d.Action == TryComplete {
			c.CompletionAborted(now, errors.New("test"))
		}
	}
	close(stop)
	wg.Wait()
}

func TestParseBandwidth(t *testing.T) {
	for in, want := range map[string]uint64{"0": 0, "100Mbit": 12_500_000, "1Gbit/s": 125_000_000, "50MB": 50_000_000, "12MiB": 12 << 20, "800": 800} {
		if got, err := ParseBandwidth(in); err != nil || got != want {
			t.Errorf("ParseBandwidth(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "fast", "-1MB", "2000TB", "NaN", "NaNMbit", "Inf", "+InfMB"} {
		if _, err := ParseBandwidth(bad); err == nil {
			t.Errorf("ParseBandwidth(%q) accepted", bad)
		}
	}
}
