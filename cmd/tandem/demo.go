package main

import (
	"flag"
	"os"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/drill"
	"github.com/tandemvm/tandem/internal/stopsignal"
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
		g, err := bootGuest(kind, cfg)
		if err != nil {
			return err
		}
		defer g.Close()
		return drill.EpochDemo(os.Stdout, g, kind, cfg, *dur, *epoch)
	}
	memory := "128MiB"
	if set["memory"] {
		memory = guest.FormatSize(gf.cfg.Memory)
	}
	if _, _, err := gf.config(); err != nil {
		return err
	}
	// Ctrl-C ends the demo through its context, so it removes what it
	// made (the trios, and the network part's bridge and namespace).
	ctx, cancel := stopsignal.Context()
	defer cancel()
	return drill.FailoverDemo(ctx, os.Stdout, gf.kind, memory, *keep, *plaintext)
}
