package main

import (
	"context"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/precopy"
)

func init() {
	register("demo", "the default end-to-end show, on the default guest", cmdDemo)
}

func cmdDemo(args []string) error {
	fs := newFlagSet("demo")
	var gf guestFlags
	addGuestFlags(fs, &gf)
	dur := fs.Duration("duration", 3*time.Second, "how long to run")
	epoch := fs.Duration("epoch", 25*time.Millisecond, "epoch interval")
	fs.Set("workload", guest.WorkloadDirty)
	fs.Set("memory", "1GiB")
	fs.Set("touch", "256MiB")
	fs.Set("dirty-rate", "10000")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	kind, cfg, err := gf.config()
	if err != nil {
		return err
	}
	return epochDemo(kind, cfg, *dur, *epoch)
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
	fmt.Fprintln(os.Stderr, "(this demo becomes the failover show once protection lands)")
	return nil
}
