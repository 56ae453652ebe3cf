package drill

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
)

// Run is runs failover runs; the table goes to Out as they go.
func (d *Drill) Run(ctx context.Context, runs int) Summary {
	sum := Summary{Runs: runs, Guest: d.cfg.Guest, Seed: d.cfg.Seed, Dir: d.dir}
	out := d.cfg.Out
	coord := "raft trio"
	if d.etcdEndpoints != "" {
		coord = "etcd pair on " + d.etcdEndpoints
	}
	fmt.Fprintf(out, "tandem drill: %d runs, %s guest (%s), %s, seed %d, logs in %s\n", runs, d.cfg.Guest, d.cfg.Memory, coord, d.cfg.Seed, d.dir)
	fmt.Fprintf(out, runHeader, "run", "killed", "primary", "rto_ms", "acked", "lost", "divergent", "lin", "ok")
	var rtos []float64
	needFresh := true
	for i := 1; i <= runs; i++ {
		var r RunResult
		if needFresh {
			if _, _, err := d.FreshTrio(ctx); err != nil {
				r = RunResult{Run: i, Reason: err.Error()}
				sum.record(out, r)
				fmt.Fprintf(out, "%s\n", d.LogTails())
				continue
			}
			needFresh = false
		}
		r, needFresh = d.once(ctx, i)
		if r.OK {
			rtos = append(rtos, r.RTOMs)
		} else {
			fmt.Fprintf(out, "run %d failed: %s\nlogs in %s; their tails:\n%s", i, r.Reason, d.t.Dir(), d.LogTails())
		}
		sum.record(out, r)
	}
	slices.Sort(rtos)
	if len(rtos) > 0 {
		sum.RTOMs = RTOSummary{P50: percentile(rtos, 0.5), P99: percentile(rtos, 0.99), Max: rtos[len(rtos)-1]}
	}
	d.Cleanup(!sum.OK())
	return sum
}

// once is one run on a protected trio: load, kill -9 the primary at a
// random moment, measure the RTO, check the state and the history,
// restart the old primary and wait for protection. fresh says the trio
// must be rebuilt.
func (d *Drill) once(ctx context.Context, run int) (r RunResult, fresh bool) {
	r.Run = run
	p, pst, err := d.t.WaitProtected(ctx, Reprotect)
	if err != nil {
		r.Reason = err.Error()
		return r, true
	}
	r.Killed = p.ID
	lg, stopLoad := d.StartLoad(ctx, run, p)
	defer stopLoad()
	// A run that failed before its read-back still has a history: check
	// what the clients saw.
	defer func() {
		if r.Linearizable == "" {
			stopLoad()
			lin := lg.History.Check(CheckTimeout)
			r.Linearizable, r.Ops, r.Pending = Linearizable(lin.Verdict), lin.Ops, lin.Pending
		}
	}()

	delay := 300*time.Millisecond + time.Duration(d.rng.Int64N(int64(1700*time.Millisecond)))
	d.say("the guest serves kv requests; the primary is %s (generation %d, epoch %d); killing it in %v",
		p.ID, e2e.Cluster(pst).Generation, pst.LastCommittedEpoch(), delay.Round(time.Millisecond))
	sleep(ctx, delay)
	ackedBefore := lg.NumReplies()
	// The primary's replica proof over its reign (its epoch loop's
	// counters), read just before it dies: every run's primary is killed,
	// so the runs add up to every reign but the last one.
	if st, err := p.Status(ctx); err == nil {
		r.Verified, r.Mismatches = e2e.Epochs(st).VerifiedEpochs, e2e.Epochs(st).DigestMismatches
	}
	killAt := time.Now()
	if err := p.Kill(); err != nil {
		r.Reason = err.Error()
		return r, true
	}
	d.say("SIGKILL sent to %s after %d replies", p.ID, ackedBefore)
	rto, err := waitFailover(lg, killAt, p.Console)
	if err != nil {
		r.Reason = err.Error()
		return r, true
	}
	r.RTOMs = float64(rto.Microseconds()) / 1000
	// A little load on the new primary too, then stop and check.
	sleep(ctx, 150*time.Millisecond)
	stopLoad()
	if !d.check(ctx, run, lg, &r) {
		return r, true
	}
	// The old primary comes back as secondary with the same command.
	if err := d.t.Start(p); err != nil {
		r.Reason = err.Error()
		return r, true
	}
	t0 := time.Now()
	_, st, err := d.t.WaitProtected(ctx, Reprotect)
	if err != nil {
		r.Reason = fmt.Sprintf("restarted %s: %v", p.ID, err)
		return r, true
	}
	d.say("%s restarted with the same command: it rejoined as secondary; protected again in %v (epoch %d)",
		p.ID, time.Since(t0).Round(time.Millisecond), st.LastCommittedEpoch())
	if r.Mismatches > 0 && r.Reason == "" {
		r.Reason = fmt.Sprintf("%s's replica failed verification %d times", p.ID, r.Mismatches)
	}
	r.OK = r.Reason == "" && r.Lost == 0 && r.Divergent == 0 && r.Mismatches == 0 && r.Linearizable != Linearizable(e2e.NotLinearizable)
	// A failed run leaves a guest whose state is in question: rebuild.
	return r, !r.OK
}

// waitFailover waits at most FailoverLimit after killAt for the first
// reply from a console other than the killed one's, and returns how long
// after the kill it came.
func waitFailover(lg *e2e.RunLog, killAt time.Time, killed string) (time.Duration, error) {
	deadline := killAt.Add(FailoverLimit)
	for {
		if first, ok := lg.FirstReplyAfter(killAt, killed); ok {
			return first.Sub(killAt), nil
		}
		if e := lg.FirstErr(); e != "" {
			return 0, fmt.Errorf("client: %s", e)
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("no failover within %v", FailoverLimit)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// check finds the new primary, verifies the run's writes and replies on
// it and checks its history, filling r; false means the run cannot go on
// (r.Reason says why).
func (d *Drill) check(ctx context.Context, run int, lg *e2e.RunLog, r *RunResult) bool {
	np, npst, err := d.t.CurrentPrimary(ctx, 5*time.Second)
	if err != nil {
		r.Reason = err.Error()
		return false
	}
	r.NewPri, r.Gen = np.ID, e2e.Cluster(npst).Generation
	d.say("%s is primary now (generation %d); first reply %d ms after the kill", np.ID, r.Gen, int(r.RTOMs))
	lost, div, detail, lin, err := d.Verify(ctx, run, lg)
	r.Linearizable, r.Ops, r.Pending = Linearizable(lin.Verdict), lin.Ops, lin.Pending
	if err != nil {
		r.Reason = "verify: " + err.Error()
		return false
	}
	r.Acked, r.Lost, r.Divergent = lg.Acked(), lost, div
	if len(detail) > 0 {
		r.Reason = strings.Join(detail[:min(len(detail), 3)], "; ")
	}
	if e := lg.FirstErr(); e != "" && r.Reason == "" {
		r.Reason = "client: " + e
	}
	if lin.Verdict == e2e.NotLinearizable && r.Reason == "" {
		r.Reason = "the run's kv history is not linearizable: " + lin.String()
	}
	d.say("%d acknowledged writes checked on %s: %d missing, %d contradicted replies; %s", r.Acked, np.ID, lost, div, lin)
	return true
}
