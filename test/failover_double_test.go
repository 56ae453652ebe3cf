package test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestFailoverDoubleFailure runs the drill's double failures (issue 19):
// two of the trio's nodes go away one after the other under kv load
// (witness then secondary, secondary then witness, primary then witness)
// and come back in either order. After the last return exactly one
// primary must serve, with every acknowledged write, including those a
// sole survivor acknowledged while unprotected. Before the fix a fenced
// primary dropped its guest and resumed a stale stored image
// (acknowledged writes lost), or nobody served at all.
//
// Each failure order is one `tandem drill --scenario ORDER` (both return
// orders, one after the other on its trio); the three run at once, each
// on a trio of its own: a scenario is mostly waiting (nodes down, then
// apart), so the test takes one order's time rather than three's.
func TestFailoverDoubleFailure(t *testing.T) {
	t.Parallel()
	orders := []struct {
		order string
		want  []string
	}{
		{"w-s", []string{"w-s/w-first", "w-s/s-first"}},
		{"s-w", []string{"s-w/s-first", "s-w/w-first"}},
		{"p-w", []string{"p-w/p-first", "p-w/w-first"}},
	}
	waits := make([]func(time.Duration) (cliResult, error), len(orders))
	for i, o := range orders {
		waits[i] = startCLI("drill", "--scenario", o.order, "--guest", "synth", "--json")
	}
	results := make([]cliResult, len(orders))
	errs := make([]error, len(orders))
	for i := range orders {
		results[i], errs[i] = waits[i](150 * time.Second) // all started together: each waits its own
	}
	for i, o := range orders {
		t.Run(o.order, func(t *testing.T) {
			if errs[i] != nil {
				t.Fatal(errs[i])
			}
			checkDoubleFailure(t, results[i], o.want)
		})
	}
}

// checkDoubleFailure checks one `tandem drill --scenario ORDER --json`:
// want are the scenarios it must have run, in order.
func checkDoubleFailure(t *testing.T, r cliResult, want []string) {
	var sum struct {
		Runs             int `json:"runs"`
		AckedWrites      int `json:"acked_writes"`
		AckedWritesLost  int `json:"acked_writes_lost"`
		DivergentReplies int `json:"divergent_replies"`
		FailedRuns       int `json:"failed_runs"`
		Scenarios        []struct {
			Scenario     string   `json:"scenario"`
			Stopped      []string `json:"stopped"`
			Returned     []string `json:"returned"`
			Primary      string   `json:"primary"`
			OutageMs     float64  `json:"outage_ms"`
			FirstMs      float64  `json:"reply_after_first_return_ms"`
			ServeMs      float64  `json:"serve_after_last_return_ms"`
			Acked        int      `json:"acked_writes"`
			AckedBetween int      `json:"acked_writes_between"`
			Lost         int      `json:"lost"`
			Divergent    int      `json:"divergent"`
			Served       bool     `json:"served"`
			TwoPrimaries int      `json:"two_primaries_samples"`
			Waiting      []string `json:"waiting_reasons"`
			OK           bool     `json:"ok"`
			Reason       string   `json:"reason"`
		} `json:"scenarios"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &sum); err != nil {
		t.Fatalf("drill --json output: %v\nstdout:\n%s\nstderr:\n%s", err, r.stdout, r.stderr)
	}
	if len(sum.Scenarios) != len(want) {
		t.Fatalf("%d scenario results, want %d\nstderr:\n%s", len(sum.Scenarios), len(want), r.stderr)
	}
	failed := false
	for i, s := range sum.Scenarios {
		t.Logf("%-12s down %s, back %s: %s serves; outage %.0f ms, first reply %.0f ms after the first return, served %.0f ms after the last; %d acknowledged writes (%d between the failures), %d lost, %d divergent",
			s.Scenario, strings.Join(s.Stopped, ", "), strings.Join(s.Returned, ","), s.Primary, s.OutageMs, s.FirstMs, s.ServeMs, s.Acked, s.AckedBetween, s.Lost, s.Divergent)
		if s.Scenario != want[i] {
			t.Errorf("scenario %d is %q, want %q", i, s.Scenario, want[i])
		}
		if !s.OK || !s.Served || s.Lost != 0 || s.Divergent != 0 || s.TwoPrimaries != 0 || s.Acked == 0 || s.ServeMs > 15000 {
			failed = true
			t.Errorf("%s: ok %v served %v lost %d divergent %d two-primary samples %d acked %d serve %.0f ms: %s",
				s.Scenario, s.OK, s.Served, s.Lost, s.Divergent, s.TwoPrimaries, s.Acked, s.ServeMs, s.Reason)
		}
		if strings.HasPrefix(s.Scenario, "s-w") || strings.HasPrefix(s.Scenario, "p-w") {
			// The sole runner acknowledged writes while unprotected.
			if s.AckedBetween == 0 {
				t.Errorf("%s: no write acknowledged between the two failures", s.Scenario)
			}
		}
		if len(s.Waiting) == 0 {
			t.Errorf("%s: while nobody served, no node's status said why", s.Scenario)
		}
	}
	if sum.AckedWritesLost != 0 || sum.DivergentReplies != 0 || sum.FailedRuns != 0 || r.code != 0 {
		failed = true
		t.Errorf("drill: %d lost, %d divergent, %d failed scenarios, exit %d", sum.AckedWritesLost, sum.DivergentReplies, sum.FailedRuns, r.code)
	}
	if failed {
		t.Logf("drill stderr:\n%s", r.stderr)
	}
}
