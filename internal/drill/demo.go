package drill

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/e2e"
	"github.com/tandemvm/tandem/precopy"
)

// FailoverDemo is one narrated drill (tandem demo), written to w: a trio starts, the guest serves kv
// requests under protection, the primary is killed with SIGKILL, the
// secondary takes over with every acknowledged write, the old primary
// comes back as secondary, and a planned switchover hands the guest back.
// Then, as root with /dev/net/tun, the network part (networkDemo). It
// stops, removing what it made, when ctx ends (Ctrl-C).
func FailoverDemo(ctx context.Context, w io.Writer, kind, memory, keep string, plaintext bool) error {
	t0 := time.Now()
	say := func(format string, a ...any) {
		fmt.Fprintf(w, "[%5.1fs] %s\n", time.Since(t0).Seconds(), fmt.Sprintf(format, a...))
	}
	d, err := New(Config{Guest: kind, Memory: memory, Keep: keep, Seed: uint64(time.Now().UnixNano()),
		Plaintext: plaintext, Clients: 1})
	if err != nil {
		return err
	}
	failed := true
	defer func() { // one function, in order: the nodes die before their directory goes
		d.Close()
		if failed {
			fmt.Fprintf(w, "logs kept in %s; their tails:\n%s", d.Dir(), d.LogTails())
		}
		d.Cleanup(failed)
	}()

	say("Tandem demo: a %s guest (%s, kv store workload) protected by a secondary, with a witness as the third raft voter", kind, memory)
	say("starting three processes of this binary on loopback: primary a, secondary b, witness w (data in %s)", d.Dir())
	if d.TLS() != nil {
		say("mutual TLS on every channel: a CA and certificates for a, b, w and this demo's client (%s) made in %s", e2e.Operator, d.CertDir())
	}
	p, st, err := d.FreshTrio(ctx)
	if err != nil {
		return err
	}
	say("raft made %s primary (generation %d); it streamed its memory to the secondary and is protected", p.ID, e2e.Cluster(st).Generation)

	c := e2e.NewKVClient("demo", d.Trio().Consoles(), d.TLS())
	defer c.Close()
	for _, cmd := range []string{"SET greeting hello", "SET city Lisbon", "SET answer 42", "GET greeting"} {
		rep, err := c.Do(ctx, cmd, time.Now().Add(5*time.Second))
		if err != nil {
			return err
		}
		say("  client> demo:%d %-22s guest> %s", c.Seq, cmd, rep.Text)
	}
	say("each reply left the primary only after the secondary acknowledged the epoch that produced it")

	np, err := demoFailover(ctx, d, p, say)
	if err != nil {
		return err
	}
	if rep, err := c.Do(ctx, "GET greeting", time.Now().Add(5*time.Second)); err != nil || rep.Text != "OK hello" {
		return fmt.Errorf("GET greeting after failover: %q %v", rep.Text, err)
	}
	say("and greeting is still hello")
	if ust, err := np.Status(ctx); err == nil {
		say("%s's status: role %s, protected %v (it runs unprotected until a secondary joins)", np.ID, ust.Role, ust.Protected())
	}

	t1 := time.Now()
	if err := d.Trio().Start(p); err != nil {
		return err
	}
	say("restarting %s with the same command and data dir", p.ID)
	np, nst, err := d.Trio().WaitProtected(ctx, Reprotect)
	if err != nil {
		return err
	}
	say("%s rejoined as secondary; %s protected again after %.1f s (full sync, then epochs; epoch %d)",
		p.ID, np.ID, time.Since(t1).Seconds(), nst.LastCommittedEpoch())
	if err := demoSwitchover(ctx, d, np, p, say); err != nil {
		return err
	}
	d.Close()      // the network part runs a trio of its own,
	failed = false // and keeps its own logs if it fails
	if err := networkDemo(ctx, kind, memory, plaintext, say); err != nil {
		return err
	}
	say("demo done in %.1f s", time.Since(t0).Seconds())
	return nil
}

// demoFailover puts load on the primary p, kills it, and shows the
// secondary taking over with every acknowledged write; it returns the new
// primary.
func demoFailover(ctx context.Context, d *Drill, p *e2e.Node, say func(string, ...any)) (*e2e.Node, error) {
	lg, stop := d.StartLoad(ctx, 1, p)
	defer stop()
	time.Sleep(time.Second)
	st, err := p.Status(ctx)
	if err != nil {
		return nil, err
	}
	ep := e2e.Epochs(st)
	say("under load: %.0f epochs/s, pause p50 %.2f ms, p99 %.2f ms, last committed epoch %d",
		ep.EpochsPerSecond, ep.PauseP50Ms, ep.PauseP99Ms, ep.LastCommittedEpoch)
	before := lg.NumReplies()
	killAt := time.Now()
	if err := p.Kill(); err != nil {
		return nil, err
	}
	say("SIGKILL to the primary %s (its client had %d replies so far)", p.ID, before)
	var first time.Time
	for deadline := killAt.Add(FailoverLimit); ; time.Sleep(5 * time.Millisecond) {
		if f, ok := lg.FirstReplyAfter(killAt, p.Console); ok {
			first = f
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no failover within %v", FailoverLimit)
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
	time.Sleep(200 * time.Millisecond)
	stop()
	np, nst, err := d.Trio().CurrentPrimary(ctx, 5*time.Second)
	if err != nil {
		return nil, err
	}
	say("%s won the raft election and runs the guest from its last committed epoch (generation %d)", np.ID, e2e.Cluster(nst).Generation)
	say("recovery time: the client's next reply came %d ms after the kill", first.Sub(killAt).Milliseconds())
	acked, lin, err := demoVerify(ctx, d, 1, lg)
	if err != nil {
		return nil, err
	}
	say("data intact: all %d acknowledged writes are there; the client's history is %s", acked, lin)
	return np, nil
}

// demoSwitchover hands the guest from np to p under load (POST
// /switchover) and waits until the pair is protected again.
func demoSwitchover(ctx context.Context, d *Drill, np, p *e2e.Node, say func(string, ...any)) error {
	lg, stop := d.StartLoad(ctx, 2, np)
	defer stop()
	time.Sleep(500 * time.Millisecond)
	say("planned switchover: asking %s to hand the guest to %s (POST /switchover)", np.ID, p.ID)
	swAt := time.Now()
	out, err := d.Trio().Switchover(ctx, np)
	if err != nil {
		return fmt.Errorf("switchover: %w", err)
	}
	time.Sleep(500 * time.Millisecond)
	stop()
	gap := e2e.MaxReplyGap(lg.Replies, swAt.Add(-time.Second))
	sp, sst, err := d.Trio().CurrentPrimary(ctx, 5*time.Second)
	if err != nil {
		return err
	}
	say("%s handed over final epoch %d in %d ms; %s is primary (generation %d); the client's longest wait for a reply was %d ms",
		np.ID, out.FinalEpoch, out.TookMs, sp.ID, e2e.Cluster(sst).Generation, gap.Milliseconds())
	acked, lin, err := demoVerify(ctx, d, 2, lg)
	if err != nil {
		return err
	}
	say("nothing lost: all %d acknowledged writes of the switchover's client are there; its history is %s", acked, lin)
	if _, _, err := d.Trio().WaitProtected(ctx, Reprotect); err != nil {
		say("not protected again after the switchover: %v", err)
		return err
	}
	say("%s is protected by %s again", sp.ID, np.ID)
	return nil
}

// demoVerify checks a load's writes, replies and history against the
// final state and returns how many acknowledged writes it checked.
func demoVerify(ctx context.Context, d *Drill, run int, lg *e2e.RunLog) (int, e2e.CheckResult, error) {
	lost, div, detail, lin, err := d.Verify(ctx, run, lg)
	if err != nil {
		return 0, lin, err
	}
	if lost > 0 || div > 0 {
		return 0, lin, fmt.Errorf("%d acknowledged writes lost, %d divergent replies: %s", lost, div, strings.Join(detail[:min(3, len(detail))], "; "))
	}
	if lin.Verdict == e2e.NotLinearizable {
		return 0, lin, fmt.Errorf("the client's kv history is not linearizable: %s", lin)
	}
	return lg.Acked(), lin, nil
}

// EpochDemo captures a booted guest g every epoch as a primary would,
// printing its dirty rate and the pause each capture cost.
func EpochDemo(w io.Writer, g guest.Guest, kind string, cfg guest.Config, dur, epoch time.Duration) error {
	fmt.Fprintf(w, "Tandem demo: a %s guest, %s memory, %d vCPU(s), workload %s touching %s then dirtying %d pages/s (%s)\n",
		kind, guest.FormatSize(cfg.Memory), cfg.VCPUs, cfg.Workload.Kind, guest.FormatSize(cfg.Workload.Touch), cfg.Workload.DirtyRate, cfg.Workload.Pattern)
	core := precopy.NewCore(g, nil)
	if _, err := g.Resume(); err != nil {
		return err
	}
	// Let the touch phase finish so the figures show the steady dirty rate.
	time.Sleep(500 * time.Millisecond)
	core.Sync()
	core.Dirty.Clear()

	fmt.Fprintf(w, "capturing every %v for %v: pause, sync the dirty log, save state, copy dirty pages, resume\n", epoch, dur)
	var pauses []time.Duration
	var pages uint64
	start := time.Now()
	tick := time.NewTicker(epoch)
	defer tick.Stop()
	for time.Since(start) < dur {
		<-tick.C
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		cp, err := core.Capture(ctx, precopy.CaptureOptions{FlushBudget: 10 * time.Millisecond})
		cancel()
		if err != nil {
			return fmt.Errorf("capture: %w", err)
		}
		pauses = append(pauses, cp.Breakdown.Total())
		pages += uint64(len(cp.Pages))
		if len(pauses)%40 == 0 {
			fmt.Fprintf(w, "  %3d epochs, %7d dirty pages captured, last pause %v\n", len(pauses), pages, cp.Breakdown.Total().Round(time.Microsecond))
		}
	}
	elapsed := time.Since(start)
	slices.Sort(pauses)
	q := func(p float64) time.Duration { return pauses[min(len(pauses)-1, int(p*float64(len(pauses))))] }
	fmt.Fprintf(w, "\n%d epochs in %v: dirty rate %.0f pages/s (%.1f MiB/s)\n", len(pauses), elapsed.Round(time.Millisecond),
		float64(pages)/elapsed.Seconds(), float64(pages)*guest.PageSize/elapsed.Seconds()/(1<<20))
	fmt.Fprintf(w, "pause latency: p50 %v  p99 %v  max %v\n", q(0.5).Round(time.Microsecond), q(0.99).Round(time.Microsecond), pauses[len(pauses)-1].Round(time.Microsecond))
	return nil
}
