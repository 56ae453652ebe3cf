package drill

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
)

// scenarioWatch samples every node's status while a scenario runs.
type scenarioWatch struct {
	mu           sync.Mutex
	twoPrimaries int
	noneSince    time.Time // first sample after mark in which no node served
	mark         time.Time
	waiting      []string
	stop         func() // ends the sampler and waits for it; idempotent
}

func (d *Drill) watch(ctx context.Context) *scenarioWatch {
	w := &scenarioWatch{}
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	w.stop = sync.OnceFunc(func() { cancel(); <-done })
	go func() {
		defer close(done)
		for wctx.Err() == nil {
			w.sample(wctx, d.t)
			sleep(wctx, 100*time.Millisecond)
		}
	}()
	return w
}

// sample reads every running node's status once.
func (w *scenarioWatch) sample(ctx context.Context, t *e2e.Trio) {
	serving := 0
	for _, n := range t.Nodes() {
		if !n.Running() {
			continue
		}
		st, err := n.Status(ctx)
		if err != nil {
			continue
		}
		if n.Role != "witness" && e2e.Cluster(st).CanRelease {
			serving++
		}
		why := e2e.Waiting(st)
		w.mu.Lock()
		if why != "" && !slices.Contains(w.waiting, why) && len(w.waiting) < 8 {
			w.waiting = append(w.waiting, why)
		}
		w.mu.Unlock()
	}
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	if serving > 1 {
		w.twoPrimaries++
	}
	if serving == 0 && !w.mark.IsZero() && w.noneSince.IsZero() {
		w.noneSince = now
	}
}

func (w *scenarioWatch) reasons() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.waiting)
}

// scenarioRun is one scenario under way.
type scenarioRun struct {
	d        *Drill
	sc       Scenario
	r        ScenarioResult
	lg       *e2e.RunLog
	w        *scenarioWatch
	stopLoad func()    // ends the load and waits for it; idempotent
	p        *e2e.Node // the primary at the start
	t1, t2   time.Time // the two failures
}

// fail ends the scenario with a reason; the trio must be rebuilt.
func (s *scenarioRun) fail(format string, a ...any) (ScenarioResult, bool) {
	s.r.Reason = fmt.Sprintf(format, a...)
	s.r.Acked = s.lg.Acked()
	s.r.Waiting = s.w.reasons()
	if s.r.Linearizable == "" {
		// No read-back: check what the clients saw.
		s.stopLoad()
		lin := s.lg.History.Check(CheckTimeout)
		s.r.Linearizable, s.r.Ops, s.r.Pending = Linearizable(lin.Verdict), lin.Ops, lin.Pending
	}
	return s.r, true
}

// scenarioOnce runs sc on a protected trio. fresh says the trio must be
// rebuilt before the next scenario.
func (d *Drill) scenarioOnce(ctx context.Context, run int, sc Scenario) (r ScenarioResult, fresh bool) {
	r.Run, r.Scenario = run, sc.Name
	p, _, err := d.t.WaitProtected(ctx, Reprotect)
	if err != nil {
		r.Reason = err.Error()
		return r, true
	}
	roles := map[string]*e2e.Node{"primary": p}
	for _, n := range d.t.Nodes() {
		switch {
		case n.Role == "witness":
			roles["witness"] = n
		case n != p:
			roles["secondary"] = n
		}
	}
	first, second := roles[sc.First], roles[sc.Second]
	back := []*e2e.Node{first, second}
	if sc.ReturnFirst == sc.Second {
		back = []*e2e.Node{second, first}
	}
	d.say("scenario %s: primary %s, secondary %s, witness %s", sc.Name, p.ID, roles["secondary"].ID, roles["witness"].ID)

	lg, stopLoad := d.StartLoad(ctx, run, p)
	defer stopLoad()
	s := &scenarioRun{d: d, sc: sc, r: r, lg: lg, w: d.watch(ctx), stopLoad: stopLoad, p: p}
	defer s.w.stop()

	sleep(ctx, ScenarioLoadBefore+time.Duration(d.rng.Int64N(int64(500*time.Millisecond))))
	if err := s.firstFailure(ctx, first); err != nil {
		return s.fail("%v", err)
	}
	sleep(ctx, ScenarioLoadBetween)
	s.t2 = time.Now()
	s.w.mu.Lock()
	s.w.mark = s.t2
	s.w.mu.Unlock()
	what, err := takeDown(second, sc.Second)
	s.r.Stopped = append(s.r.Stopped, what)
	if err != nil {
		return s.fail("%s: %v", what, err)
	}
	d.say("%s, then %s; the survivor must stop serving", s.r.Stopped[0], s.r.Stopped[1])
	sleep(ctx, ScenarioDown)
	firstReturn := time.Now()
	for i, n := range back {
		if i > 0 {
			sleep(ctx, ScenarioApart)
		}
		if err := d.t.Start(n); err != nil {
			return s.fail("restart %s: %v", n.ID, err)
		}
		s.r.Returned = append(s.r.Returned, n.ID)
	}
	if err := s.waitServed(ctx, firstReturn, time.Now()); err != nil {
		return s.fail("%v", err)
	}
	sleep(ctx, 300*time.Millisecond) // a little load on the one who serves
	stopLoad()
	d.say("%s serves (generation %d): outage %.0f ms, %.0f ms after the last return", s.r.Primary, s.r.Gen, s.r.OutageMs, s.r.ServeMs)
	return s.finish(ctx, run)
}

// firstFailure takes the first node down and waits until the survivors
// are where the scenario wants them: a failover after the primary's
// loss, an unprotected primary after the secondary's.
func (s *scenarioRun) firstFailure(ctx context.Context, first *e2e.Node) error {
	s.t1 = time.Now()
	what, err := takeDown(first, s.sc.First)
	s.r.Stopped = append(s.r.Stopped, what)
	if err != nil {
		return fmt.Errorf("%s: %v", what, err)
	}
	deadline := s.t1.Add(ScenarioSettle)
	switch s.sc.First {
	case "primary":
		for {
			if _, ok := s.lg.FirstReplyAfter(s.t1, s.p.Console); ok {
				return nil
			}
			if e := s.lg.FirstErr(); e != "" || time.Now().After(deadline) {
				return fmt.Errorf("no failover to the secondary within %v after %s (client: %s)", ScenarioSettle, what, e)
			}
			time.Sleep(10 * time.Millisecond)
		}
	case "secondary":
		for {
			if st, err := s.p.Status(ctx); err == nil && st.State == "running" && !e2e.Cluster(st).Protected {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("primary %s not marked unprotected within %v after %s", s.p.ID, ScenarioSettle, what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// waitServed waits at most ScenarioServeLimit after the last return until
// exactly one primary serves and a kv reply came after every node had
// stopped serving (the survivor may answer for a moment after the second
// failure, until its lease runs out).
func (s *scenarioRun) waitServed(ctx context.Context, firstReturn, lastReturn time.Time) error {
	deadline := lastReturn.Add(ScenarioServeLimit)
	for {
		s.w.mu.Lock()
		none := s.w.noneSince
		s.w.mu.Unlock()
		if !none.IsZero() {
			if first, ok := s.lg.FirstReplyAfter(none, ""); ok {
				if np, st, _ := s.d.t.ServingPrimary(ctx); np != nil {
					s.r.Primary, s.r.Gen, s.r.Served = np.ID, e2e.Cluster(st).Generation, true
					s.r.OutageMs = float64(first.Sub(s.t2).Microseconds()) / 1000
					s.r.FirstMs = float64(first.Sub(firstReturn).Microseconds()) / 1000
					s.r.ServeMs = float64(max(time.Since(lastReturn), 0).Microseconds()) / 1000
					return nil
				}
			}
		}
		if e := s.lg.FirstErr(); e != "" {
			return fmt.Errorf("client: %s", e)
		}
		if time.Now().After(deadline) {
			_, _, n := s.d.t.ServingPrimary(ctx)
			s.r.Waiting = s.w.reasons()
			why := "none of the nodes says why"
			if len(s.r.Waiting) > 0 {
				why = "last reason given: " + s.r.Waiting[len(s.r.Waiting)-1]
			}
			return fmt.Errorf("the guest is not served %v after the last return (%d nodes say they are the running primary; %s)", ScenarioServeLimit, n, why)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// finish verifies the scenario's writes and history, and waits for the
// trio to protect itself again.
func (s *scenarioRun) finish(ctx context.Context, run int) (ScenarioResult, bool) {
	lost, div, detail, lin, err := s.d.Verify(ctx, run, s.lg)
	s.r.Linearizable, s.r.Ops, s.r.Pending = Linearizable(lin.Verdict), lin.Ops, lin.Pending
	if err != nil {
		return s.fail("verify: %v", err)
	}
	s.lg.Mu.Lock()
	for _, w := range s.lg.Sets {
		if w.Acked {
			s.r.Acked++
			if w.AckAt.After(s.t1) && w.AckAt.Before(s.t2) {
				s.r.AckedBetween++
			}
		}
	}
	s.lg.Mu.Unlock()
	s.r.Lost, s.r.Divergent = lost, div
	r := &s.r
	if len(detail) > 0 {
		r.Reason = strings.Join(detail[:min(len(detail), 3)], "; ")
	}
	if e := s.lg.FirstErr(); e != "" && r.Reason == "" {
		r.Reason = "client: " + e
	}
	if lin.Verdict == e2e.NotLinearizable && r.Reason == "" {
		r.Reason = "the scenario's kv history is not linearizable: " + lin.String()
	}
	s.w.stop()
	r.Waiting, r.TwoPrimaries = s.w.waiting, s.w.twoPrimaries
	if r.TwoPrimaries > 0 && r.Reason == "" {
		r.Reason = fmt.Sprintf("two nodes could release output at once in %d status samples", r.TwoPrimaries)
	}
	// Every node is back: the trio must protect itself again.
	if _, _, err := s.d.t.WaitProtected(ctx, Reprotect); err != nil && r.Reason == "" {
		r.Reason = "after the returns: " + err.Error()
	}
	r.OK = r.Reason == "" && lost == 0 && div == 0
	return *r, !r.OK
}
