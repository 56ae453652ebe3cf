package main

import (
	"context"
	"os"
	"os/signal"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/top"
	"golang.org/x/sys/unix"
)

func init() {
	register("top", "a live view of a node: protection, pauses, output delay, the slowest phases and handlers, slow events (--once for one snapshot)", cmdTop)
}

func cmdTop(args []string) error {
	fs := newFlagSet("top")
	addr := fs.String("api", defaultAPI, "API address of the node")
	interval := fs.Duration("interval", time.Second, "refresh interval")
	once := fs.Bool("once", false, "print one snapshot (figures over one interval) and exit; the default when stdout is not a terminal")
	rows := fs.Int("rows", 10, "rows in the table of phases and handlers, and slow events shown")
	id, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if *interval < 100*time.Millisecond || *interval > time.Hour {
		return usagef("--interval %v: give 100ms to 1h", *interval)
	}
	if *rows < 1 || *rows > 1000 {
		return usagef("--rows %d: give 1 to 1000", *rows)
	}
	c := newAPIClient(*addr, id, 0)
	live := !*once && isTerminal(os.Stdout)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, unix.SIGTERM)
	defer stop()
	prev, err := sampleNode(ctx, c)
	if err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(*interval):
		}
		cur, err := sampleNode(ctx, c)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if live {
			os.Stdout.WriteString("\x1b[H\x1b[2J") // home, clear
		}
		top.Render(os.Stdout, *addr, prev, cur, *rows)
		if !live {
			return nil
		}
		prev = cur
	}
}

// sampleNode takes one look at a node: status, metrics and slow list,
// each bounded by a 5 s deadline.
func sampleNode(ctx context.Context, c *api.Client) (top.Sample, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := c.Status(ctx, false)
	if err != nil {
		return top.Sample{}, err
	}
	m, err := c.Metrics(ctx)
	if err != nil {
		return top.Sample{}, err
	}
	slow, err := c.Slow(ctx)
	if err != nil {
		return top.Sample{}, err
	}
	return top.Sample{At: time.Now(), Status: st, Metrics: m, Slow: slow}, nil
}
