package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/precopy"
)

func init() {
	register("demo", "the default end-to-end show, on the default guest (--epochs-only: the epoch capture show)", cmdDemo)
}

func cmdDemo(args []string) error {
	fs := newFlagSet("demo")
	var gf guestFlags
	addGuestFlags(fs, &gf)
	epochsOnly := fs.Bool("epochs-only", false, "only the epoch capture show: one guest captured every epoch, no cluster")
	dur := fs.Duration("duration", 3*time.Second, "--epochs-only: how long to run")
	epoch := fs.Duration("epoch", 25*time.Millisecond, "--epochs-only: epoch interval")
	keep := fs.String("keep", "", "keep the trio's data dirs and logs under this directory")
	plaintext := fs.Bool("plaintext", false, "run the trio without TLS (loopback only); by default it runs with mutual TLS on certificates made for it")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *epochsOnly {
		// The capture show's own defaults: a large guest dirtying steadily.
		for name, v := range map[string]string{"workload": guest.WorkloadDirty, "memory": "1GiB", "touch": "256MiB", "dirty-rate": "10000"} {
			if !set[name] {
				fs.Set(name, v)
			}
		}
		kind, cfg, err := gf.config()
		if err != nil {
			return err
		}
		return epochDemo(kind, cfg, *dur, *epoch)
	}
	memory := "128MiB"
	if set["memory"] {
		memory = guest.FormatSize(gf.cfg.Memory)
	}
	if _, _, err := gf.config(); err != nil {
		return err
	}
	return failoverDemo(gf.kind, memory, *keep, *plaintext)
}

// failoverDemo is one narrated drill: a trio starts, the guest serves kv
// requests under protection, the primary is killed with SIGKILL, the
// secondary takes over with every acknowledged write, the old primary
// comes back as secondary, and a planned switchover hands the guest back.
func failoverDemo(kind, memory, keep string, plaintext bool) error {
	t0 := time.Now()
	say := func(format string, a ...any) {
		fmt.Printf("[%5.1fs] %s\n", time.Since(t0).Seconds(), fmt.Sprintf(format, a...))
	}
	d, err := newDrill(kind, memory, keep, uint64(time.Now().UnixNano()), io.Discard, plaintext)
	if err != nil {
		return err
	}
	d.clients = 1
	defer d.close()
	failed := true
	defer func() {
		if failed {
			fmt.Printf("logs kept in %s; their tails:\n%s", d.dir, d.logTails())
		}
		d.cleanup(failed)
	}()
	ctx := context.Background()

	say("Tandem demo: a %s guest (%s, kv store workload) protected by a secondary, with a witness as the third raft voter", kind, memory)
	say("starting three processes of this binary on loopback: primary a, secondary b, witness w (data in %s)", d.dir)
	if d.tls != nil {
		say("mutual TLS on every channel: a CA and certificates for a, b, w and this demo's client (%s) made in %s", drillOperator, d.certDir)
	}
	p, st, err := d.freshTrio(ctx)
	if err != nil {
		return err
	}
	say("raft made %s primary (generation %d); it streamed its memory to the secondary and is protected", p.id, st.Cluster.Generation)

	c := newKVClient("demo", d.t.consoles(), d.tls)
	defer c.close()
	for _, kv := range [][2]string{{"greeting", "hello"}, {"city", "Lisbon"}, {"answer", "42"}} {
		cmd := "SET " + kv[0] + " " + kv[1]
		rep, err := c.do(ctx, cmd, time.Now().Add(5*time.Second))
		if err != nil {
			return err
		}
		say("  client> demo:%d %-22s guest> %s", c.seq, cmd, rep.text)
	}
	rep, err := c.do(ctx, "GET greeting", time.Now().Add(5*time.Second))
	if err != nil {
		return err
	}
	say("  client> demo:%d %-22s guest> %s", c.seq, "GET greeting", rep.text)
	say("each reply left the primary only after the secondary acknowledged the epoch that produced it")

	lg, stop := d.startLoad(ctx, 1, p)
	time.Sleep(time.Second)
	if st, err = d.t.fetchStatus(p.api); err != nil {
		stop()
		return err
	}
	say("under load: %.0f epochs/s, pause p50 %.2f ms, p99 %.2f ms, last committed epoch %d",
		st.EpochsPerSecond, st.PauseP50Ms, st.PauseP99Ms, st.LastCommittedEpoch)
	lg.mu.Lock()
	before := len(lg.replies)
	lg.mu.Unlock()
	killAt := time.Now()
	if err := p.kill(); err != nil {
		stop()
		return err
	}
	say("SIGKILL to the primary %s (its client had %d replies so far)", p.id, before)
	var first time.Time
	for deadline := killAt.Add(drillFailoverLimit); ; time.Sleep(5 * time.Millisecond) {
		lg.mu.Lock()
		f, ok := firstReplyAfter(lg.replies, killAt, p.console)
		lg.mu.Unlock()
		if ok {
			first = f
			break
		}
		if time.Now().After(deadline) {
			stop()
			return fmt.Errorf("no failover within %v", drillFailoverLimit)
		}
	}
	time.Sleep(200 * time.Millisecond)
	stop()
	np, nst, err := d.currentPrimary()
	if err != nil {
		return err
	}
	say("%s won the raft election and runs the guest from its last committed epoch (generation %d)", np.id, nst.Cluster.Generation)
	say("recovery time: the client's next reply came %d ms after the kill", first.Sub(killAt).Milliseconds())
	acked, err := d.demoVerify(ctx, 1, lg)
	if err != nil {
		return err
	}
	if rep, err := c.do(ctx, "GET greeting", time.Now().Add(5*time.Second)); err != nil || rep.text != "OK hello" {
		return fmt.Errorf("GET greeting after failover: %q %v", rep.text, err)
	}
	say("data intact: all %d acknowledged writes are there (and greeting is still hello)", acked)
	if ust, err := d.t.fetchStatus(np.api); err == nil {
		say("%s's status: role %s, protected %v (it runs unprotected until a secondary joins)", np.id, ust.Role, ust.Protected)
	}

	t1 := time.Now()
	if err := d.t.start(p); err != nil {
		return err
	}
	say("restarting %s with the same command and data dir", p.id)
	np, nst, err = d.t.waitProtected(ctx, drillReprotect)
	if err != nil {
		return err
	}
	say("%s rejoined as secondary; %s protected again after %.1f s (full sync, then epochs; epoch %d)",
		p.id, np.id, time.Since(t1).Seconds(), nst.LastCommittedEpoch)

	lg, stop = d.startLoad(ctx, 2, np)
	time.Sleep(500 * time.Millisecond)
	say("planned switchover: asking %s to hand the guest to %s (POST /switchover)", np.id, p.id)
	swAt := time.Now()
	out, err := newAPIClient(np.api, d.tls, switchoverTimeout+5*time.Second).Switchover(ctx)
	if err != nil {
		stop()
		return fmt.Errorf("switchover: %w", err)
	}
	time.Sleep(500 * time.Millisecond)
	stop()
	gap := maxReplyGap(lg.replies, swAt.Add(-time.Second))
	sp, sst, err := d.currentPrimary()
	if err != nil {
		return err
	}
	say("%s handed over final epoch %d in %d ms; %s is primary (generation %d); the client's longest wait for a reply was %d ms",
		np.id, out.FinalEpoch, out.TookMs, sp.id, sst.Cluster.Generation, gap.Milliseconds())
	acked, err = d.demoVerify(ctx, 2, lg)
	if err != nil {
		return err
	}
	say("nothing lost: all %d acknowledged writes of the switchover's client are there", acked)
	if _, _, err := d.t.waitProtected(ctx, drillReprotect); err == nil {
		say("%s is protected by %s again; demo done in %.1f s", sp.id, np.id, time.Since(t0).Seconds())
	} else {
		say("not protected again after the switchover: %v", err)
		return err
	}
	failed = false
	return nil
}

// demoVerify checks a load's writes and replies against the final state
// and returns how many acknowledged writes it checked.
func (d *drill) demoVerify(ctx context.Context, run int, lg *runLog) (int, error) {
	lost, div, detail, err := d.verify(ctx, run, lg)
	if err != nil {
		return 0, err
	}
	if lost > 0 || div > 0 {
		return 0, fmt.Errorf("%d acknowledged writes lost, %d divergent replies: %s", lost, div, strings.Join(detail[:min(3, len(detail))], "; "))
	}
	n := 0
	for _, s := range lg.sets {
		if s.acked {
			n++
		}
	}
	return n, nil
}

// maxReplyGap is the longest time between consecutive replies after since.
func maxReplyGap(replies []kvReply, since time.Time) time.Duration {
	var ts []time.Time
	for _, r := range replies {
		if r.at.After(since) {
			ts = append(ts, r.at)
		}
	}
	slices.SortFunc(ts, func(a, b time.Time) int { return a.Compare(b) })
	var gap time.Duration
	for i := 1; i < len(ts); i++ {
		gap = max(gap, ts[i].Sub(ts[i-1]))
	}
	return gap
}

// epochDemo runs a guest and captures it every epoch as a primary would,
// printing its dirty rate and the pause each capture cost.
func epochDemo(kind string, cfg guest.Config, dur, epoch time.Duration) error {
	fmt.Printf("Tandem demo: a %s guest, %s memory, %d vCPU(s), workload %s touching %s then dirtying %d pages/s (%s)\n",
		kind, guest.FormatSize(cfg.Memory), cfg.VCPUs, cfg.Workload.Kind, guest.FormatSize(cfg.Workload.Touch), cfg.Workload.DirtyRate, cfg.Workload.Pattern)
	g, err := bootGuest(kind, cfg)
	if err != nil {
		return err
	}
	defer g.Close()
	core := precopy.NewCore(g, nil)
	if _, err := g.Resume(); err != nil {
		return err
	}
	// Let the touch phase finish so the figures show the steady dirty rate.
	time.Sleep(500 * time.Millisecond)
	core.Sync()
	core.Dirty.Clear()

	fmt.Printf("capturing every %v for %v: pause, sync the dirty log, save state, copy dirty pages, resume\n", epoch, dur)
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
			fmt.Printf("  %3d epochs, %7d dirty pages captured, last pause %v\n", len(pauses), pages, cp.Breakdown.Total().Round(time.Microsecond))
		}
	}
	elapsed := time.Since(start)
	slices.Sort(pauses)
	q := func(p float64) time.Duration { return pauses[min(len(pauses)-1, int(p*float64(len(pauses))))] }
	fmt.Printf("\n%d epochs in %v: dirty rate %.0f pages/s (%.1f MiB/s)\n", len(pauses), elapsed.Round(time.Millisecond),
		float64(pages)/elapsed.Seconds(), float64(pages)*guest.PageSize/elapsed.Seconds()/(1<<20))
	fmt.Printf("pause latency: p50 %v  p99 %v  max %v\n", q(0.5).Round(time.Microsecond), q(0.99).Round(time.Microsecond), pauses[len(pauses)-1].Round(time.Microsecond))
	return nil
}
