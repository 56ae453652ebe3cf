package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Double failures (`tandem drill --scenario`): two of the trio's three
// nodes go away one after the other, under kv load, then come back in a
// given order. After the last one is back the guest must be served by
// exactly one primary within scenarioServeLimit, with every acknowledged
// write present, including those the sole survivor acknowledged while the
// cluster was unprotected.

// scenario is one double failure. Roles are those of the nodes when the
// scenario starts (the primary moves from run to run).
type scenario struct {
	Name          string
	First, Second string // roles taken down, in order
	ReturnFirst   string // which of the two comes back first
}

var scenarios = []scenario{
	{"w-s/w-first", "witness", "secondary", "witness"},
	{"w-s/s-first", "witness", "secondary", "secondary"},
	{"s-w/s-first", "secondary", "witness", "secondary"},
	{"s-w/w-first", "secondary", "witness", "witness"},
	{"p-w/p-first", "primary", "witness", "primary"},
	{"p-w/w-first", "primary", "witness", "witness"},
}

func scenarioNames() []string {
	var out []string
	for _, s := range scenarios {
		out = append(out, s.Name)
	}
	return out
}

// pickScenarios resolves --scenario: a name, an order (both return
// orders) or all, or a comma-separated list of them, run in that order on
// the same trio (while it stays healthy).
func pickScenarios(names string) ([]scenario, error) {
	var out []scenario
	for _, name := range strings.Split(names, ",") {
		name = strings.TrimSpace(name)
		if name == "all" {
			out = append(out, scenarios...)
			continue
		}
		n := len(out)
		for _, s := range scenarios {
			if s.Name == name || strings.HasPrefix(s.Name, name+"/") {
				out = append(out, s)
			}
		}
		if len(out) == n {
			return nil, usagef("--scenario %q: want all, w-s, s-w, p-w or one of %s (or a comma-separated list)", name, strings.Join(scenarioNames(), ", "))
		}
	}
	return out, nil
}

// The scenario's timeline.
const (
	scenarioLoadBefore  = 1500 * time.Millisecond // load on the protected trio before the first failure
	scenarioLoadBetween = time.Second             // load between the two failures (the survivors' state reached)
	scenarioDown        = 3 * time.Second         // both down, until the first returns
	scenarioApart       = 3 * time.Second         // between the two returns
	scenarioServeLimit  = 15 * time.Second        // last return until served
	scenarioSettle      = 10 * time.Second        // first failure until the survivors' state (failover, unprotected)
)

// scenarioResult is one scenario's outcome; JSON names are part of
// `tandem drill --scenario --json`.
type scenarioResult struct {
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
	OK      bool     `json:"ok"`
	Reason  string   `json:"reason,omitempty"`
}

func (d *drill) runScenarios(scs []scenario) drillSummary {
	ctx := context.Background()
	sum := drillSummary{Runs: len(scs), Guest: d.kind, Seed: d.seed, Dir: d.dir}
	// Requests wait through the whole outage; a client turned away waits a
	// little before the next node (no busy loop while nobody serves).
	d.loadPatience = scenarioDown + scenarioApart + scenarioServeLimit + 10*time.Second
	d.loadBackoff = 20 * time.Millisecond
	// Unprotected, a write is acknowledged at once: paced, one scenario
	// stays far below the kv guest's table size (65,536 keys).
	d.loadPace = 3 * time.Millisecond
	fmt.Fprintf(d.out, "tandem drill: %d double-failure scenarios, %s guest (%s), seed %d, logs in %s\n", len(scs), d.kind, d.memory, d.seed, d.dir)
	fmt.Fprintf(d.out, "%-12s  %-26s  %-7s  %-7s  %9s  %10s  %9s  %6s  %7s  %4s  %9s  %s\n",
		"scenario", "down (in order)", "back", "primary", "outage_ms", "1st_ret_ms", "serve_ms", "acked", "between", "lost", "divergent", "ok")
	needFresh := true
	for i, sc := range scs {
		var r scenarioResult
		if needFresh {
			if _, _, err := d.freshTrio(ctx); err != nil {
				r = scenarioResult{Run: i + 1, Scenario: sc.Name, Reason: err.Error()}
				d.recordScenario(&sum, r)
				fmt.Fprintf(d.out, "%s\n", d.logTails())
				continue
			}
			needFresh = false
		}
		r, needFresh = d.scenarioOnce(ctx, i+1, sc)
		if !r.OK {
			fmt.Fprintf(d.out, "scenario %s failed: %s\nlogs in %s; their tails:\n%s", sc.Name, r.Reason, d.t.dir, d.logTails())
		}
		d.recordScenario(&sum, r)
	}
	d.cleanup(!sum.ok())
	return sum
}

func (d *drill) recordScenario(sum *drillSummary, r scenarioResult) {
	sum.Scenarios = append(sum.Scenarios, r)
	ok := sum.tally(r.Acked, r.Lost, r.Divergent, r.OK)
	serve := "-"
	if r.Served {
		serve = fmt.Sprintf("%.0f", r.ServeMs)
	}
	fmt.Fprintf(d.out, "%-12s  %-26s  %-7s  %-7s  %9.0f  %10.0f  %9s  %6d  %7d  %4d  %9d  %s\n", r.Scenario, strings.Join(r.Stopped, ", "),
		strings.Join(r.Returned, ","), r.Primary, r.OutageMs, r.FirstMs, serve, r.Acked, r.AckedBetween, r.Lost, r.Divergent, ok)
}

func printScenarios(w io.Writer, s drillSummary) {
	fmt.Fprintf(w, "\n%d scenarios on %s (seed %d): %d acknowledged writes, %d lost, %d divergent replies, %d failed\n",
		s.Runs, s.Guest, s.Seed, s.AckedWrites, s.AckedWritesLost, s.DivergentReplies, s.FailedRuns)
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
func takeDown(n *trioNode, role string) (string, error) {
	if role == "witness" {
		return n.id + " SIGTERM", n.stop(syscall.SIGTERM)
	}
	return n.id + " kill -9", n.kill()
}

// scenarioWatch samples every node's status while a scenario runs.
type scenarioWatch struct {
	mu           sync.Mutex
	twoPrimaries int
	noneSince    time.Time // first sample after mark in which no node served
	mark         time.Time
	waiting      []string
	stop         func()
}

func (d *drill) watch(ctx context.Context) *scenarioWatch {
	w := &scenarioWatch{}
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	w.stop = func() { cancel(); <-done }
	go func() {
		defer close(done)
		for wctx.Err() == nil {
			serving := 0
			for _, n := range d.t.nodes {
				if !n.running() {
					continue
				}
				st, err := d.t.fetchStatus(n.api)
				if err != nil {
					continue
				}
				if n.role != "witness" && st.Cluster.CanRelease {
					serving++
				}
				why := st.Cluster.Waiting
				if why == "" {
					why = st.Waiting
				}
				w.mu.Lock()
				if why != "" && !slices.Contains(w.waiting, why) && len(w.waiting) < 8 {
					w.waiting = append(w.waiting, why)
				}
				w.mu.Unlock()
			}
			now := time.Now()
			w.mu.Lock()
			if serving > 1 {
				w.twoPrimaries++
			}
			if serving == 0 && !w.mark.IsZero() && w.noneSince.IsZero() {
				w.noneSince = now
			}
			w.mu.Unlock()
			select {
			case <-wctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return w
}

// servingPrimary returns the one node that serves the guest: it says it
// is the running primary, the cluster names it and it may release; n is
// how many running nodes say they are the running primary.
func (t *trio) servingPrimary() (p *trioNode, st memberStatus, n int) {
	for _, nd := range t.nodes {
		if nd.role == "witness" || !nd.running() {
			continue
		}
		s, err := t.fetchStatus(nd.api)
		if err != nil || s.Role != "primary" || s.State != "running" {
			continue
		}
		n++
		if s.Cluster.Primary == nd.id && s.Cluster.CanRelease {
			p, st = nd, s
		}
	}
	if n != 1 {
		return nil, memberStatus{}, n
	}
	return p, st, n
}

// scenarioOnce runs sc on a protected trio. fresh says the trio must be
// rebuilt before the next scenario.
func (d *drill) scenarioOnce(ctx context.Context, run int, sc scenario) (r scenarioResult, fresh bool) {
	r.Run, r.Scenario = run, sc.Name
	p, _, err := d.t.waitProtected(ctx, drillReprotect)
	if err != nil {
		r.Reason = err.Error()
		return r, true
	}
	roles := map[string]*trioNode{"primary": p}
	for _, n := range d.t.nodes {
		switch {
		case n.role == "witness":
			roles["witness"] = n
		case n != p:
			roles["secondary"] = n
		}
	}
	first, second := roles[sc.First], roles[sc.Second]
	back := []*trioNode{first, second}
	if sc.ReturnFirst == sc.Second {
		back = []*trioNode{second, first}
	}
	d.say("scenario %s: primary %s, secondary %s, witness %s", sc.Name, p.id, roles["secondary"].id, roles["witness"].id)

	lg, stopLoad := d.startLoad(ctx, run, p)
	defer stopLoad()
	w := d.watch(ctx)
	defer w.stop()
	fail := func(format string, a ...any) (scenarioResult, bool) {
		r.Reason = fmt.Sprintf(format, a...)
		lg.mu.Lock()
		for _, s := range lg.sets {
			if s.acked {
				r.Acked++
			}
		}
		lg.mu.Unlock()
		w.mu.Lock()
		r.Waiting = slices.Clone(w.waiting)
		w.mu.Unlock()
		return r, true
	}
	clientErr := func() string {
		lg.mu.Lock()
		defer lg.mu.Unlock()
		if len(lg.errs) > 0 {
			return lg.errs[0]
		}
		return ""
	}

	time.Sleep(scenarioLoadBefore + time.Duration(d.rng.Int64N(int64(500*time.Millisecond))))
	t1 := time.Now()
	what, err := takeDown(first, sc.First)
	r.Stopped = append(r.Stopped, what)
	if err != nil {
		return fail("%s: %v", what, err)
	}
	// Let the survivors get where the scenario wants them: a failover
	// after the primary's loss, an unprotected primary after the
	// secondary's. Then more load, acknowledged by that state.
	deadline := t1.Add(scenarioSettle)
	switch sc.First {
	case "primary":
		for {
			lg.mu.Lock()
			_, ok := firstReplyAfter(lg.replies, t1, p.console)
			lg.mu.Unlock()
			if ok {
				break
			}
			if e := clientErr(); e != "" || time.Now().After(deadline) {
				return fail("no failover to the secondary within %v after %s (client: %s)", scenarioSettle, what, e)
			}
			time.Sleep(10 * time.Millisecond)
		}
	case "secondary":
		for {
			if st, err := d.t.fetchStatus(p.api); err == nil && st.State == "running" && !st.Cluster.Protected {
				break
			}
			if time.Now().After(deadline) {
				return fail("primary %s not marked unprotected within %v after %s", p.id, scenarioSettle, what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	time.Sleep(scenarioLoadBetween)

	t2 := time.Now()
	w.mu.Lock()
	w.mark = t2
	w.mu.Unlock()
	what, err = takeDown(second, sc.Second)
	r.Stopped = append(r.Stopped, what)
	if err != nil {
		return fail("%s: %v", what, err)
	}
	d.say("%s, then %s; the survivor must stop serving", r.Stopped[0], r.Stopped[1])
	time.Sleep(scenarioDown)
	var firstReturn time.Time
	for i, n := range back {
		if i > 0 {
			time.Sleep(scenarioApart)
		} else {
			firstReturn = time.Now()
		}
		if err := d.t.start(n); err != nil {
			return fail("restart %s: %v", n.id, err)
		}
		r.Returned = append(r.Returned, n.id)
	}
	lastReturn := time.Now()

	// Served: exactly one primary, and a kv reply after every node had
	// stopped serving (the survivor may answer for a moment after the
	// second failure, until its lease runs out).
	deadline = lastReturn.Add(scenarioServeLimit)
	var servedAt time.Time
	for {
		w.mu.Lock()
		none := w.noneSince
		w.mu.Unlock()
		if !none.IsZero() {
			lg.mu.Lock()
			first, ok := firstReplyAfter(lg.replies, none, "")
			lg.mu.Unlock()
			if ok {
				if np, st, _ := d.t.servingPrimary(); np != nil {
					servedAt = time.Now()
					r.Primary, r.Gen, r.Served = np.id, st.Cluster.Generation, true
					r.OutageMs = float64(first.Sub(t2).Microseconds()) / 1000
					r.FirstMs = float64(first.Sub(firstReturn).Microseconds()) / 1000
					break
				}
			}
		}
		if e := clientErr(); e != "" {
			return fail("client: %s", e)
		}
		if time.Now().After(deadline) {
			_, _, n := d.t.servingPrimary()
			w.mu.Lock()
			r.Waiting = slices.Clone(w.waiting)
			w.mu.Unlock()
			why := "none of the nodes says why"
			if len(r.Waiting) > 0 {
				why = "last reason given: " + r.Waiting[len(r.Waiting)-1]
			}
			return fail("the guest is not served %v after the last return (%d nodes say they are the running primary; %s)", scenarioServeLimit, n, why)
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.ServeMs = float64(max(servedAt.Sub(lastReturn), 0).Microseconds()) / 1000
	time.Sleep(300 * time.Millisecond) // a little load on the one who serves
	stopLoad()
	d.say("%s serves (generation %d): outage %.0f ms, %.0f ms after the last return", r.Primary, r.Gen, r.OutageMs, r.ServeMs)

	lost, div, detail, err := d.verify(ctx, run, lg)
	if err != nil {
		return fail("verify: %v", err)
	}
	lg.mu.Lock()
	for _, s := range lg.sets {
		if s.acked {
			r.Acked++
			if s.ackAt.After(t1) && s.ackAt.Before(t2) {
				r.AckedBetween++
			}
		}
	}
	lg.mu.Unlock()
	r.Lost, r.Divergent = lost, div
	if len(detail) > 0 {
		r.Reason = strings.Join(detail[:min(len(detail), 3)], "; ")
	}
	if e := clientErr(); e != "" && r.Reason == "" {
		r.Reason = "client: " + e
	}
	w.stop()
	w.stop = func() {}
	r.Waiting, r.TwoPrimaries = w.waiting, w.twoPrimaries
	if r.TwoPrimaries > 0 && r.Reason == "" {
		r.Reason = fmt.Sprintf("two nodes could release output at once in %d status samples", r.TwoPrimaries)
	}
	// Every node is back: the trio must protect itself again.
	if _, _, err := d.t.waitProtected(ctx, drillReprotect); err != nil && r.Reason == "" {
		r.Reason = "after the returns: " + err.Error()
	}
	r.OK = r.Reason == "" && lost == 0 && div == 0
	return r, !r.OK
}
