package precopy

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestCompletionRule: the limit is a ceiling and the target the goal
// (issue 11 item 2). Each case scripts rounds against a link of 25,600
// pages/s (100 MiB/s) with the default 10 ms state save, so a remaining
// set of n pages predicts n/25.6 ms + 10 ms; the default target is 20 ms
// (246 pages), the limit 300 ms (7,424 pages).
func TestCompletionRule(t *testing.T) {
	const bw = 25600
	type step struct {
		sent, dirtied, remaining uint64
		span                     time.Duration
		action                   Action
		throttle                 int
		reason                   string // a word the reason must hold
	}
	// r is a round that sent its pages at the link's rate.
	r := func(sent, dirtied, remaining uint64, a Action, throttle int, reason string) step {
		return step{sent, dirtied, remaining, time.Duration(sent) * time.Second / bw, a, throttle, reason}
	}
	for _, tt := range []struct {
		name  string
		p     Policy
		steps []step
	}{
		{
			name: "shrinking: rounds go on past the limit until the target fits",
			p:    Policy{},
			steps: []step{
				r(bw, 12800, 12800, Continue, 0, "over"),             // 510 ms: over the limit
				r(12800, 5120, 5120, Continue, 0, "shrinks"),         // 210 ms fits the limit; 40 % of the set before
				r(5120, 1280, 1280, Continue, 0, "shrinks"),          // 60 ms
				r(1280, 200, 200, TryComplete, 0, "fits the target"), // 17.8 ms
			},
		},
		{
			name: "plateau: completes once a round leaves over three quarters",
			p:    Policy{},
			steps: []step{
				r(bw, 5120, 5120, Continue, 0, "shrinks"),                // 210 ms
				r(5120, 4608, 4608, TryComplete, 0, "stopped shrinking"), // 190 ms, 90 % of 5,120
			},
		},
		{
			name: "exactly three quarters still shrinks",
			p:    Policy{},
			steps: []step{
				r(bw, 4096, 4096, Continue, 0, "shrinks"),
				r(4096, 3072, 3072, Continue, 0, "shrinks"),
				r(3072, 2305, 2305, TryComplete, 0, "stopped shrinking"),
			},
		},
		{
			name: "growing dirty set: completes at once while the limit fits",
			p:    Policy{},
			steps: []step{
				r(bw, 2560, 2560, Continue, 0, "shrinks"),                // 110 ms
				r(2560, 3840, 3840, TryComplete, 0, "stopped shrinking"), // 160 ms and growing
			},
		},
		{
			name: "growing past the limit: never completes, throttles",
			p:    Policy{AutoConverge: true},
			steps: []step{
				r(bw, 2560, 2560, Continue, 0, "shrinks"),
				r(2560, 8000, 8000, Continue, 0, "over"), // 322 ms: over the limit, dirty rate 3x the link
				r(8000, 9000, 9000, Continue, 20, "throttle 0% -> 20%"),
			},
		},
		{
			name: "limit reached: a plateau over the limit throttles instead of completing",
			p:    Policy{AutoConverge: true},
			steps: []step{
				r(bw, bw*6/10, 12800, Continue, 0, "over"),
				r(bw, bw*6/10, 12800, Continue, 20, "over"),
				r(bw, bw*6/10, 12800, Continue, 20, "over"),
				r(bw, bw*6/10, 12800, Continue, 30, "over"),
			},
		},
		{
			name: "converging at 0.6 a round: never throttled, completes at the target",
			p:    Policy{AutoConverge: true, ThrottleRounds: 1},
			steps: []step{
				r(bw, 6400, 6400, Continue, 0, "shrinks"), // 260 ms; dirtying at 60 % of the link
				r(6400, 3840, 3840, Continue, 0, "shrinks"),
				r(3840, 2304, 2304, Continue, 0, "shrinks"),
				r(2304, 1382, 1382, Continue, 0, "shrinks"),
				r(1382, 829, 829, Continue, 0, "shrinks"),
				r(829, 497, 497, Continue, 0, "shrinks"),
				r(497, 298, 298, Continue, 0, "shrinks"),
				r(298, 179, 179, TryComplete, 0, "fits the target"),
			},
		},
		{
			name: "target equal to the limit: the first fit completes",
			p:    Policy{DowntimeTarget: DefaultDowntimeLimit},
			steps: []step{
				r(bw, 6400, 6400, TryComplete, 0, "fits the target 300ms"),
			},
		},
		{
			name: "a custom target",
			p:    Policy{DowntimeTarget: 60 * time.Millisecond},
			steps: []step{
				r(bw, 5120, 5120, Continue, 0, "shrinks"),
				r(5120, 1280, 1280, TryComplete, 0, "fits the target 60ms"),
			},
		},
		{
			name: "a small limit caps the default target",
			p:    Policy{DowntimeLimit: 15 * time.Millisecond},
			steps: []step{
				r(bw, 100, 100, TryComplete, 0, "fits the target 15ms"), // 13.9 ms
			},
		},
		{
			name: "nothing left completes after round 0",
			p:    Policy{},
			steps: []step{
				r(bw, 0, 0, TryComplete, 0, "fits the target"),
			},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := mustController(t, tt.p)
			now := t0
			for i, s := range tt.steps {
				now = now.Add(s.span)
				d := c.RoundDone(RoundStats{Round: i, PagesSent: s.sent, BytesSent: s.sent * 4096, SendTime: s.span,
					PagesDirtied: s.dirtied, DirtyInterval: s.span, RemainingPages: s.remaining}, now)
				if d.Action != s.action || d.Throttle != s.throttle || !strings.Contains(d.Reason, s.reason) {
					t.Fatalf("round %d: %v, throttle %d (%s); want %v, throttle %d, a reason with %q",
						i, d.Action, d.Throttle, d.Reason, s.action, s.throttle, s.reason)
				}
				if d.Action == TryComplete && d.ExpectedDowntime > c.Policy().DowntimeLimit {
					t.Fatalf("round %d: completes with %v expected, over the limit", i, d.ExpectedDowntime)
				}
			}
		})
	}
}

func TestDowntimeTargetValidate(t *testing.T) {
	for _, p := range []Policy{
		{DowntimeTarget: -time.Millisecond},
		{DowntimeTarget: 301 * time.Millisecond},
		{DowntimeLimit: 50 * time.Millisecond, DowntimeTarget: 60 * time.Millisecond},
	} {
		if err := p.Validate(); !errors.Is(err, ErrBadPolicy) || !strings.Contains(err.Error(), "target") {
			t.Errorf("Validate(%+v) = %v, want ErrBadPolicy naming the target", p, err)
		}
	}
	for _, p := range []Policy{{}, {DowntimeTarget: 300 * time.Millisecond}, {DowntimeLimit: 5 * time.Millisecond}} {
		if err := p.Validate(); err != nil {
			t.Errorf("Validate(%+v) = %v", p, err)
		}
	}
}
