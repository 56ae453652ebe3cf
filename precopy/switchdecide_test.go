package precopy

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestDecideSwitchTable: every rule of DecideSwitch, and the order in
// which they apply.
func TestDecideSwitchTable(t *testing.T) {
	const s = time.Second
	over := Decision{Action: Continue, Predicted: true, ExpectedDowntime: 40 * s}
	// flat: the dirty set the same over two rounds (a guest that dirties
	// as fast as the link carries).
	flat := []ProgressSample{{0, 131072}, {43 * s, 131072}, {44 * s, 131500}}
	slow := []ProgressSample{{50 * s, 100000}, {51 * s, 99000}, {52 * s, 98000}} // 1,000 pages/s
	fast := []ProgressSample{{50 * s, 100000}, {51 * s, 60000}, {52 * s, 30000}}
	view := func(mut func(*SwitchView)) SwitchView {
		v := SwitchView{RoundsSent: 2, AfterRounds: -1, Decision: over, DowntimeLimit: 300 * time.Millisecond,
			Progress: flat, Elapsed: 44 * s, MaxTime: 10 * time.Minute}
		if mut != nil {
			mut(&v)
		}
		return v
	}
	cases := []struct {
		name   string
		v      SwitchView
		reason string // "" : no switch
		why    string // a part of Why
	}{
		{"flat set over the limit: the controller switches", view(nil), SwitchController, "stopped shrinking (131072 pages 44s ago, 131500 now)"},
		{"command first", view(func(v *SwitchView) { v.Commanded = true }), SwitchCommand, "POST /migrate/postcopy"},
		{"command before any round", SwitchView{AfterRounds: -1, Commanded: true}, SwitchCommand, ""},
		{"command waits out a given-up switch", view(func(v *SwitchView) { v.Commanded = true; v.RetryAfter = 45 * s }), "", "next one after 45s"},
		{"command after the retry time", view(func(v *SwitchView) { v.Commanded = true; v.RetryAfter = 44 * s }), SwitchCommand, ""},
		{"retry time holds the controller too", view(func(v *SwitchView) { v.RetryAfter = 50 * s }), "", "given up"},
		{"attempts given up are bounded: no command switches after", view(func(v *SwitchView) { v.Commanded = true; v.GivenUp = MaxSwitchGiveUps }), "", "precopy alone"},
		{"attempts given up are bounded: the time limit fails", view(func(v *SwitchView) {
			v.GivenUp = MaxSwitchGiveUps
			v.Decision = Decision{Action: Fail, Err: ErrMaxTime}
		}), "", "precopy alone"},
		{"under the bound the time limit still switches", view(func(v *SwitchView) {
			v.GivenUp = MaxSwitchGiveUps - 1
			v.Decision = Decision{Action: Fail, Err: ErrMaxTime}
		}), SwitchController, "time limit"},
		{"a precopy completion goes first", view(func(v *SwitchView) {
			v.Decision = Decision{Action: TryComplete, Reason: "fits the target"}
			v.AfterRounds = 1
		}), "", "precopy completes first: fits the target"},
		{"command beats a completion", view(func(v *SwitchView) { v.Decision.Action = TryComplete; v.Commanded = true }), SwitchCommand, ""},
		{"after 0 rounds: before any", SwitchView{AfterRounds: 0}, SwitchRounds, "0 precopy rounds sent (--postcopy-after-rounds 0)"},
		{"after 1 round: not before it", SwitchView{AfterRounds: 1}, "", "too few rounds"},
		{"after 1 round: once sent", view(func(v *SwitchView) { v.RoundsSent, v.AfterRounds, v.Progress = 1, 1, fast }), SwitchRounds, "1 precopy rounds sent"},
		{"rounds reached though converging", view(func(v *SwitchView) { v.AfterRounds, v.Progress = 2, fast }), SwitchRounds, ""},
		{"time limit reached: switch instead of failing", view(func(v *SwitchView) {
			v.Decision = Decision{Action: Fail, Err: fmt.Errorf("%w: 10m0s after 400 rounds", ErrMaxTime)}
		}), SwitchController, "switching instead of failing"},
		{"another failure does not switch", view(func(v *SwitchView) {
			v.Decision = Decision{Action: Fail, Err: ErrBadPolicy}
		}), "", "decision is fail"},
		{"two samples are too few", view(func(v *SwitchView) { v.Progress = flat[:2] }), "", "too few rounds"},
		{"no prediction yet", view(func(v *SwitchView) { v.Decision.Predicted = false }), "", "no downtime prediction"},
		{"expected downtime fits the limit", view(func(v *SwitchView) { v.Decision.ExpectedDowntime = 250 * time.Millisecond }), "", "precopy converges"},
		{"no time between samples", view(func(v *SwitchView) {
			v.Progress = []ProgressSample{{s, 10}, {s, 10}, {s, 10}}
		}), "", "no time"},
		{"a growing set switches", view(func(v *SwitchView) {
			v.Progress = []ProgressSample{{10 * s, 1000}, {11 * s, 1500}, {12 * s, 2000}}
		}), SwitchController, "stopped shrinking"},
		{"only the last window counts", view(func(v *SwitchView) {
			v.Progress = append([]ProgressSample{{0, 1}}, fast...)
		}), "", "it fits the 300ms limit in about"},
		// 98,000 pages at 1,000 pages/s: about 97 s to fit the limit.
		{"slow shrink within the time left: precopy goes on", view(func(v *SwitchView) { v.Progress, v.Elapsed = slow, 52*s }), "", "shrinks by 1000 pages/s"},
		{"slow shrink past the time left: switch", view(func(v *SwitchView) { v.Progress, v.Elapsed, v.MaxTime = slow, 52*s, 120*s }),
			SwitchController, "past the 1m8s left of the time limit"},
		{"slow shrink, no time limit: precopy goes on", view(func(v *SwitchView) { v.Progress, v.MaxTime = slow, -1 }), "", "no time limit"},
		{"fast shrink: precopy goes on", view(func(v *SwitchView) { v.Progress = fast }), "", "fits the 300ms limit"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := DecideSwitch(c.v)
			if got.Switch != (c.reason != "") || got.Reason != c.reason || !strings.Contains(got.Why, c.why) {
				t.Errorf("DecideSwitch = %+v, want switch %v reason %q, why containing %q", got, c.reason != "", c.reason, c.why)
			}
			if got.Why == "" {
				t.Errorf("DecideSwitch = %+v: every decision says why", got)
			}
		})
	}
}

// TestControllerSwitchScenarios drives the real Controller round by
// round, as the engine does, and asks DecideSwitch after each: a guest
// that outruns the link is switched by the controller one round after
// the full pass (the full pass's start counts: the set it left is as
// large as the one it sent), rather than throttled further, one that converges completes
// precopy, and one that converges too slowly for its time limit is
// switched when that shows.
func TestControllerSwitchScenarios(t *testing.T) {
	const linkPages = 3000 // pages per second: about 100 Mbit/s
	type rnd struct {
		send      time.Duration // the round's send time
		sent      uint64
		remaining uint64
	}
	cases := []struct {
		name    string
		maxTime time.Duration
		rounds  []rnd
		// at is the round after which the switch comes (-1: none);
		// action the controller's last decision.
		at     int
		reason string
	}{
		{"outruns the link", 10 * time.Minute, []rnd{
			{43 * time.Second, 131072, 131072}, {time.Second, linkPages, 130000}, {time.Second, linkPages, 130500}, {time.Second, linkPages, 130400},
		}, 1, SwitchController},
		{"converges", 10 * time.Minute, []rnd{
			{43 * time.Second, 131072, 60000}, {time.Second, linkPages, 20000}, {time.Second, linkPages, 5000}, {time.Second, 5000, 300},
			{50 * time.Millisecond, 300, 100}, {20 * time.Millisecond, 100, 20},
		}, -1, ""},
		{"converges too slowly for --max-time", 90 * time.Second, []rnd{
			{43 * time.Second, 131072, 120000}, {time.Second, linkPages, 119000}, {time.Second, linkPages, 118000}, {time.Second, linkPages, 117000},
		}, 1, SwitchController},
		{"converges slowly within the default time", 10 * time.Minute, []rnd{
			{43 * time.Second, 131072, 120000}, {time.Second, linkPages, 119000}, {time.Second, linkPages, 118000}, {time.Second, linkPages, 117000},
		}, -1, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
			p := DefaultPolicy()
			p.MaxTime = c.maxTime
			ctrl, err := NewController(p, t0)
			if err != nil {
				t.Fatal(err)
			}
			var progress []ProgressSample
			at, now := -1, t0
			var got SwitchDecision
			var last Decision
			for i, r := range c.rounds {
				if i == 0 {
					progress = append(progress, ProgressSample{0, r.sent})
				}
				now = now.Add(r.send)
				d := ctrl.RoundDone(RoundStats{Round: i, PagesSent: r.sent, BytesSent: r.sent * 4096, SendTime: r.send,
					PagesDirtied: r.remaining, DirtyInterval: r.send, RemainingPages: r.remaining}, now)
				progress = append(progress, ProgressSample{now.Sub(t0), r.remaining})
				if len(progress) > progressWindow {
					progress = progress[1:]
				}
				last = d
				got = DecideSwitch(SwitchView{RoundsSent: i + 1, AfterRounds: -1, Decision: d, DowntimeLimit: p.DowntimeLimit,
					Progress: progress, Elapsed: now.Sub(t0), MaxTime: p.MaxTime})
				t.Logf("round %d: %v (%s); switch %v: %s", i, d.Action, d.Reason, got.Switch, got.Why)
				if got.Switch {
					at = i
					break
				}
				if d.Action == TryComplete {
					break
				}
			}
			if at != c.at || got.Reason != c.reason {
				t.Errorf("switched after round %d (%q), want %d (%q)", at, got.Reason, c.at, c.reason)
			}
			if c.name == "converges" && last.Action != TryComplete {
				t.Errorf("converging guest: the last decision is %v, want a precopy completion", last.Action)
			}
		})
	}
}

// The switch's prediction counts the missing set's runs as postcopy's
// SendMissing writes them.
func TestMissingRuns(t *testing.T) {
	b := NewBitmap(1 << 12)
	if n := missingRuns(b); n != 0 {
		t.Fatalf("empty: %d runs", n)
	}
	for _, p := range []uint64{0, 1, 2, 5, 64, 65, 127, 128, 4095} { // runs 0-2, 5, 64-65, 127-128, 4095
		b.Set(p)
	}
	if n := missingRuns(b); n != 5 {
		t.Fatalf("%d runs, want 5", n)
	}
}
