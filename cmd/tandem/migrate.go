package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/ft"
	"github.com/tandemvm/tandem/internal/progress"
	"github.com/tandemvm/tandem/precopy"
)

func init() {
	register("migrate", "live-migrate the guest of a running node to a receiver or a snapshot file", cmdMigrate)
}

func cmdMigrate(args []string) error {
	fs := newFlagSet("migrate")
	from := fs.String("from", "", "API address of the node running the guest")
	to := fs.String("to", "", "destination: a receiver's data ADDR, or file:NAME (a snapshot the node writes into its --snapshot-dir)")
	bw := fs.String("max-bandwidth", "0", "bandwidth cap, e.g. 100Mbit, 50MB, 1Gbit (0: none)")
	downtime := fs.Duration("downtime-limit", precopy.DefaultDowntimeLimit, "longest acceptable pause")
	maxTime := fs.Duration("max-time", precopy.DefaultMaxTime, "give up (guest keeps running here) after this long")
	minRetry := fs.Duration("min-retry", precopy.DefaultMinRetryInterval, "least time between completion attempts after a flush missed its deadline")
	comp := fs.String("compression", "default", "stream compression: none, fastest, default, better or best")
	autoConverge := fs.Bool("auto-converge", true, "throttle the vCPUs when the guest dirties memory faster than the link carries it")
	asJSON := fs.Bool("json", false, "print the final status as JSON")
	streams := fs.Int("streams", 1, fmt.Sprintf("goroutines encoding the stream on the source, 1 to %d (one connection)", api.MaxMigrateStreams))
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *from == "" || *to == "" {
		return usagef("--from API and --to ADDR|file:NAME are required")
	}
	if name, ok := strings.CutPrefix(*to, "file:"); ok {
		// The node resolves NAME under its own --snapshot-dir; it never
		// writes to a path a caller names.
		if err := ft.PlainName(name); err != nil {
			return usagef("--to file:%s: %v", name, err)
		}
	}
	rate, err := parseBandwidth(*bw)
	if err != nil {
		return usagef("--max-bandwidth: %v", err)
	}
	if _, err := checkpoint.ParseCompression(*comp); err != nil {
		return usagef("--compression: %v", err)
	}
	if *streams < 1 || *streams > api.MaxMigrateStreams {
		return usagef("--streams %d: want 1 to %d", *streams, api.MaxMigrateStreams)
	}
	if *downtime <= 0 || *maxTime <= 0 || *minRetry <= 0 {
		return usagef("--downtime-limit, --max-time and --min-retry must be positive")
	}
	// These flags authenticate this command to the source's API; the
	// source dials --to with its own identity.
	id, err := tf.load()
	if err != nil {
		return err
	}
	c := newAPIClient(*from, id, 0)
	ctx := context.Background()
	req := api.MigrateRequest{To: *to, MaxBandwidth: rate, DowntimeLimitMs: downtime.Milliseconds(),
		MaxTimeMs: maxTime.Milliseconds(), MinRetryMs: minRetry.Milliseconds(), Compression: *comp, AutoConverge: autoConverge,
		SourceAPI: *from}
	if err := c.MigrateStreams(ctx, api.MigrateStreamsRequest{MigrateRequest: req, Streams: *streams}); err != nil {
		return fmt.Errorf("start migration: %w", err)
	}
	return followMigration(ctx, c, *maxTime+time.Minute, *downtime, *asJSON)
}

// followMigration prints a migration's progress until it ends, or gives
// up after patience.
func followMigration(ctx context.Context, c *api.Client, patience, limit time.Duration, asJSON bool) error {
	tty := isTerminal(os.Stdout)
	deadline := time.Now().Add(patience)
	var last time.Time
	var tr progress.Tracker
	for {
		st, err := c.Status(ctx, false)
		if err != nil {
			return fmt.Errorf("follow migration: %w", err)
		}
		done := st.Status == precopy.StatusCompleted || st.Status == precopy.StatusFailed || st.Status == precopy.StatusUnknown
		ms := st.MigrationStatus
		pct, eta, etaOK := tr.Observe(progress.Sample{At: time.Now(), Transferred: ms.TransferredBytes, Remaining: ms.RemainingBytes,
			Total: ms.TotalBytes, Mbps: ms.Mbps, Done: ms.Status == precopy.StatusCompleted})
		where := fmt.Sprintf("%5.1f%% %s", pct, progress.FormatETA(eta, etaOK))
		if tty {
			fmt.Fprintf(os.Stdout, "\r\033[K%s %s", where, progressBar(ms, pct))
			if done {
				fmt.Println()
			}
		} else if done || time.Since(last) >= time.Second {
			fmt.Fprintln(os.Stdout, where+" "+progressLine(ms))
			last = time.Now()
		}
		if done {
			if asJSON {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				enc.Encode(st)
			} else {
				printMigrationSummary(os.Stdout, st.MigrationStatus, limit)
			}
			switch st.Status {
			case precopy.StatusFailed:
				return fmt.Errorf("migration %s (the guest keeps running on the source): %s", cmp.Or(st.Outcome, "failed"), st.Error)
			case precopy.StatusUnknown:
				return fmt.Errorf("migration outcome %s: the destination resumes once it learns of the commit (it asks the source's API), or by POST /migrate/commit on it: %s", st.Outcome, st.Error)
			}
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("migration still %s after %v; gave up following it", st.Status, patience)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func progressLine(s precopy.MigrationStatus) string {
	remaining := humanBytes(s.RemainingBytes)
	if s.Round == 0 && s.RemainingBytes == 0 && s.Status != precopy.StatusCompleted {
		remaining = "?" // round 0 has not measured it yet
	}
	return fmt.Sprintf("status=%s round=%d sent=%s remaining=%s dirty_rate=%d pages/s mbps=%.1f expected_downtime=%dms throttle=%d%% aborted=%d",
		s.Status, s.Round, humanBytes(s.TransferredBytes), remaining, s.DirtyPagesRate, s.Mbps,
		s.ExpectedDowntimeMs, s.ThrottlePercent, s.AbortedCompletions)
}

func progressBar(s precopy.MigrationStatus, percent float64) string {
	frac := percent / 100
	const width = 30
	filled := int(frac * width)
	filled = max(0, min(width, filled))
	return fmt.Sprintf("[%s%s] %-9s round %d  sent %s  left %s  dirty %d p/s  %.0f Mbit/s  exp. downtime %d ms",
		strings.Repeat("#", filled), strings.Repeat(".", width-filled), s.Status, s.Round,
		humanBytes(s.TransferredBytes), humanBytes(s.RemainingBytes), s.DirtyPagesRate, s.Mbps, s.ExpectedDowntimeMs)
}

func printMigrationSummary(w io.Writer, s precopy.MigrationStatus, limit time.Duration) {
	fmt.Fprintf(w, "migration %s in %d ms: downtime %d ms (limit %v), %s on the wire, %d completion attempts (%d aborted)\n",
		s.Status, s.TotalTimeMs, s.DowntimeMs, limit, humanBytes(s.TransferredBytes), s.CompletionAttempts, s.AbortedCompletions)
	downtime := time.Duration(max(float64(s.DowntimeMs), s.DowntimeBreakdown.TotalMs) * float64(time.Millisecond))
	if v := progress.DowntimeVerdict(downtime, limit); v != "" && s.Status == precopy.StatusCompleted {
		defer fmt.Fprintf(w, "  %s\n", v) // the final line
	}
	if s.Outcome != "" {
		fmt.Fprintf(w, "  outcome: %s\n", s.Outcome)
	}
	b := s.DowntimeBreakdown
	if b.Completed {
		fmt.Fprintf(w, "  downtime breakdown: pause %.2f, flush %.2f, dirty sync %.2f, state save %.2f, final send %.2f, destination load %.2f, resume %.2f = %.2f ms\n",
			b.PauseVCPUsMs, b.FlushMs, b.DirtySyncMs, b.StateSaveMs, b.FinalSendMs, b.DestinationLoadMs, b.ResumeMs, b.TotalMs)
	}
	if s.SwitchoverDigest != "" {
		fmt.Fprintf(w, "  switchover digest: source %s, destination %s\n", s.SwitchoverDigest, cmp.Or(s.DestinationDigest, "(file)"))
	}
	if s.Error != "" {
		fmt.Fprintf(w, "  error: %s\n", s.Error)
	}
}

func humanBytes(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2fGiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fKiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}

// parseBandwidth reads a rate in bits (100Mbit, 1Gbit) or bytes (50MB,
// 12MiB) per second, with an optional "/s", into bytes per second.
func parseBandwidth(s string) (uint64, error) {
	t := strings.TrimSuffix(strings.TrimSpace(s), "/s")
	units := []struct {
		suffix string
		mult   float64
	}{
		{"Gbit", 1e9 / 8}, {"Mbit", 1e6 / 8}, {"Kbit", 1e3 / 8}, {"bit", 1.0 / 8},
		{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
		{"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3}, {"B", 1},
	}
	mult := 1.0
	for _, u := range units {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSuffix(t, u.suffix), u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v < 0 || v*mult > 1e15 {
		return 0, fmt.Errorf("bad rate %q: want e.g. 100Mbit, 1Gbit, 50MB or 0 for no limit", s)
	}
	return uint64(v * mult), nil
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
