package drill

import (
	"context"
	"fmt"
	"io"
	"strings"
	"syscall"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
)

// Double failures (`tandem drill --scenario`): two of the trio's three
// nodes go away one after the other, under kv load, then come back in a
// given order. After the last one is back the guest must be served by
// exactly one primary within ScenarioServeLimit, with every acknowledged
// write present, including those the sole survivor acknowledged while the
// cluster was unprotected.

// Scenario is one double failure. Roles are those of the nodes when the
// scenario starts (the primary moves from run to run).
type Scenario struct {
	Name          string
	First, Second string // roles taken down, in order
	ReturnFirst   string // which of the two comes back first
}

// Scenarios are every double failure the drill knows.
var Scenarios = []Scenario{
	{"w-s/w-first", "witness", "secondary", "witness"},
	{"w-s/s-first", "witness", "secondary", "secondary"},
	{"s-w/s-first", "secondary", "witness", "secondary"},
	{"s-w/w-first", "secondary", "witness", "witness"},
	{"p-w/p-first", "primary", "witness", "primary"},
	{"p-w/w-first", "primary", "witness", "witness"},
}

// ScenarioNames are the Scenarios' names.
func ScenarioNames() []string {
	var out []string
	for _, s := range Scenarios {
		out = append(out, s.Name)
	}
	return out
}

// PickScenarios resolves --scenario: a name, an order (both return
// orders) or all, or a comma-separated list of them, run in that order on
// the same trio (while it stays healthy).
func PickScenarios(names string) ([]Scenario, error) {
	var out []Scenario
	for _, name := range strings.Split(names, ",") {
		name = strings.TrimSpace(name)
		if name == "all" {
			out = append(out, Scenarios...)
			continue
		}
		n := len(out)
		for _, s := range Scenarios {
			if s.Name == name || strings.HasPrefix(s.Name, name+"/") {
				out = append(out, s)
			}
		}
		if len(out) == n {
			return nil, fmt.Errorf("--scenario %q: want all, w-s, s-w, p-w or one of %s (or a comma-separated list)", name, strings.Join(ScenarioNames(), ", "))
		}
	}
	return out, nil
}

// The scenario's timeline.
const (
	ScenarioLoadBefore  = 1500 * time.Millisecond // load on the protected trio before the first failure
	ScenarioLoadBetween = time.Second             // load between the two failures (the survivors' state reached)
	ScenarioDown        = 3 * time.Second         // both down, until the first returns
	ScenarioApart       = 3 * time.Second         // between the two returns
	ScenarioServeLimit  = 15 * time.Second        // last return until served
	ScenarioSettle      = 10 * time.Second        // first failure until the survivors' state (failover, unprotected)
)

// ScenarioResult is one scenario's outcome; JSON names are part of
// `tandem drill --scenario --json`.
type ScenarioResult struct {
	Run      int      `json:"run"`
	Scenario string   `json:"scenario"`
	Stopped  []string `json:"stopped"`
	Returned []string `json:"returned"`
	Primary  string   `json:"primary,omitempty"` // serving at the end
	Gen      uint64   `json:"generation,omitempty"`
	// OutageMs: from the second failure until the first kv reply after
	// every node had stopped serving. FirstMs: from the first return (a
	// majority again) until that reply. ServeMs: from the last return
	// until the guest was served by exactly one primary (0: already).
	OutageMs float64 `json:"outage_ms"`
	FirstMs  float64 `json:"reply_after_first_return_ms"`
	ServeMs  float64 `json:"serve_after_last_return_ms"`
	Acked    int     `json:"acked_writes"`
	// AckedBetween: writes acknowledged between the two failures (after
	// a secondary or primary loss, by an unprotected sole runner).
	AckedBetween int  `json:"acked_writes_between"`
	Lost         int  `json:"lost"`
	Divergent    int  `json:"divergent"`
	Served       bool `json:"served"`
	// TwoPrimaries counts status samples in which two nodes could release.
	TwoPrimaries int `json:"two_primaries_samples"`
	// Waiting: the reasons for nobody serving the nodes gave meanwhile.
	Waiting []string `json:"waiting_reasons,omitempty"`
	// Linearizable is the verdict on the scenario's kv history.
	Linearizable Linearizable `json:"linearizable"`
	Ops          int          `json:"history_ops"`
	Pending      int          `json:"history_pending"`
	OK           bool         `json:"ok"`
	Reason       string       `json:"reason,omitempty"`
}

// RunScenarios runs scs in order; the table goes to Out as they go.
func (d *Drill) RunScenarios(ctx context.Context, scs []Scenario) Summary {
	sum := Summary{Runs: len(scs), Guest: d.cfg.Guest, Seed: d.cfg.Seed, Dir: d.dir}
	// Requests wait through the whole outage; a client turned away waits a
	// little before the next node (no busy loop while nobody serves).
	d.loadPatience = ScenarioDown + ScenarioApart + ScenarioServeLimit + 10*time.Second
	d.loadBackoff = 20 * time.Millisecond
	// Unprotected, a write is acknowledged at once: paced, one scenario
	// stays far below the kv guest's table size (65,536 keys).
	d.loadPace = 3 * time.Millisecond
	out := d.cfg.Out
	fmt.Fprintf(out, "tandem drill: %d double-failure scenarios, %s guest (%s), seed %d, logs in %s\n", len(scs), d.cfg.Guest, d.cfg.Memory, d.cfg.Seed, d.dir)
	fmt.Fprintf(out, scenarioHeader, "scenario", "down (in order)", "back", "primary", "outage_ms", "1st_ret_ms", "serve_ms", "acked", "between", "lost", "divergent", "lin", "ok")
	needFresh := true
	for i, sc := range scs {
		var r ScenarioResult
		if needFresh {
			if _, _, err := d.FreshTrio(ctx); err != nil {
				r = ScenarioResult{Run: i + 1, Scenario: sc.Name, Reason: err.Error()}
				sum.recordScenario(out, r)
				fmt.Fprintf(out, "%s\n", d.LogTails())
				continue
			}
			needFresh = false
		}
		r, needFresh = d.scenarioOnce(ctx, i+1, sc)
		if !r.OK {
			fmt.Fprintf(out, "scenario %s failed: %s\nlogs in %s; their tails:\n%s", sc.Name, r.Reason, d.t.Dir(), d.LogTails())
		}
		sum.recordScenario(out, r)
	}
	d.Cleanup(!sum.OK())
	return sum
}

const scenarioHeader = "%-12s  %-26s  %-7s  %-7s  %9s  %10s  %9s  %6s  %7s  %4s  %9s  %4s  %s\n"

func (s *Summary) recordScenario(w io.Writer, r ScenarioResult) {
	s.Scenarios = append(s.Scenarios, r)
	ok := s.tally(r.Acked, r.Lost, r.Divergent, r.Linearizable, r.OK)
	serve := "-"
	if r.Served {
		serve = fmt.Sprintf("%.0f", r.ServeMs)
	}
	fmt.Fprintf(w, "%-12s  %-26s  %-7s  %-7s  %9.0f  %10.0f  %9s  %6d  %7d  %4d  %9d  %4s  %s\n", r.Scenario, strings.Join(r.Stopped, ", "),
		strings.Join(r.Returned, ","), r.Primary, r.OutageMs, r.FirstMs, serve, r.Acked, r.AckedBetween, r.Lost, r.Divergent, r.Linearizable.column(), ok)
}

func printScenarios(w io.Writer, s Summary) {
	fmt.Fprintf(w, "\n%d scenarios on %s (seed %d): %d acknowledged writes, %d lost, %d divergent replies, %d failed; %s\n",
		s.Runs, s.Guest, s.Seed, s.AckedWrites, s.AckedWritesLost, s.DivergentReplies, s.FailedRuns, s.linLine())
	for _, r := range s.Scenarios {
		if !r.OK {
			fmt.Fprintf(w, "  %s failed: %s\n", r.Scenario, r.Reason)
		}
		for _, why := range r.Waiting {
			fmt.Fprintf(w, "  %s, while nobody served: %s\n", r.Scenario, why)
		}
	}
}

// takeDown stops n as the scenario says: a witness with SIGTERM, a
// primary or secondary with kill -9.
func takeDown(n *e2e.Node, role string) (string, error) {
	if role == "witness" {
		return n.ID + " SIGTERM", n.Stop(syscall.SIGTERM)
	}
	return n.ID + " kill -9", n.Kill()
}
