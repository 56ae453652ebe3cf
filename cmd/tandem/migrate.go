package main

import (
	"context"
	"fmt"
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
	if abandonAsked(args) {
		return cmdMigrateAbandon(args)
	}
	fs := newFlagSet("migrate")
	from := fs.String("from", "", "API address of the node running the guest")
	to := fs.String("to", "", "destination: a receiver's data ADDR, or file:NAME (a snapshot the node writes into its --snapshot-dir)")
	bw := fs.String("max-bandwidth", "0", "bandwidth cap, e.g. 100Mbit, 50MB, 1Gbit (0: none)")
	downtime := fs.Duration("downtime-limit", precopy.DefaultDowntimeLimit, "longest acceptable pause")
	maxTime := fs.Duration("max-time", precopy.DefaultMaxTime, "give up (guest keeps running here) after this long; with --postcopy, switch to post-copy instead")
	minRetry := fs.Duration("min-retry", precopy.DefaultMinRetryInterval, "least time between completion attempts after a flush missed its deadline")
	comp := fs.String("compression", "default", "stream compression: none, fastest, default, better or best")
	autoConverge := fs.Bool("auto-converge", true, "throttle the vCPUs when the guest dirties memory faster than the link carries it")
	asJSON := fs.Bool("json", false, "print the final status as JSON")
	streams := fs.Int("streams", 1, fmt.Sprintf("goroutines encoding the stream on the source, 1 to %d (one connection)", api.MaxMigrateStreams))
	postcopy := fs.Bool("postcopy", false, "switch to post-copy (the guest resumes on the destination at once; missing pages follow on demand) when the controller predicts precopy will not converge, or after --postcopy-after-rounds rounds")
	pcRoundsFlag := fs.String("postcopy-after-rounds", "", fmt.Sprintf("with --postcopy: switch after `N` precopy rounds at the latest, N from 0 to %d (0: before any page is sent; 1: after the first full pass); the controller may switch sooner (default: no limit, the controller decides)", api.MaxPostcopyAfterRounds))
	switchPC := fs.Bool("switch-postcopy", false, "switch the running --postcopy migration of the node at --from to post-copy now (POST /migrate/postcopy), then return")
	fs.Bool("abandon", false, "with --to API [--id ID] only: declare the guest of a post-copy migration whose source is lost; the destination stops its half guest for good (see docs/POSTCOPY.md)")
	resume := fs.Bool("resume", false, "continue a post-copy paused by a lost link (the source's status says postcopy-paused): with --from, and optionally --to (default: the migration's destination) and --id")
	migID := fs.String("id", "", "with --resume: the migration to resume (its migration_id; default: the source's current one)")
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *resume {
		return migrateResume(fs, resumeArgs{from: *from, to: *to, id: *migID, maxTime: *maxTime, json: *asJSON}, tf)
	}
	if *migID != "" {
		return usagef("--id is for --resume (or --abandon) only")
	}
	if *switchPC {
		return switchPostcopy(*from, *to, tf)
	}
	req, err := migrateRequestOf(migrateFlags{from: *from, to: *to, bw: *bw, comp: *comp, pcRounds: *pcRoundsFlag, streams: *streams,
		downtime: *downtime, maxTime: *maxTime, minRetry: *minRetry, autoConverge: *autoConverge, postcopy: *postcopy})
	if err != nil {
		return err
	}
	// These flags authenticate this command to the source's API; the
	// source dials --to with its own identity.
	id, err := tf.load()
	if err != nil {
		return err
	}
	c := newAPIClient(*from, id, 0)
	ctx := context.Background()
	var reply struct {
		PostcopyRefused string `json:"postcopy_refused"`
	}
	if err := c.Post(ctx, "/migrate", req, &reply); err != nil {
		return fmt.Errorf("start migration: %w", err)
	}
	if reply.PostcopyRefused != "" {
		fmt.Fprintf(os.Stderr, "--postcopy refused by the destination (%s): migrating precopy-only\n", reply.PostcopyRefused)
	}
	return progress.Follow(ctx, c, progress.Watch{Out: os.Stdout, TTY: isTerminal(os.Stdout), Patience: *maxTime + time.Minute, Limit: *downtime, JSON: *asJSON})
}

// migrateFlags are tandem migrate's flags that make its request.
type migrateFlags struct {
	from, to, bw, comp, pcRounds string
	streams                      int
	downtime, maxTime, minRetry  time.Duration
	autoConverge, postcopy       bool
}

// migrateRequestOf checks f and makes POST /migrate's request; a bad
// flag is a one-line usage error.
func migrateRequestOf(f migrateFlags) (api.MigrateRequest, error) {
	var req api.MigrateRequest
	if f.from == "" || f.to == "" {
		return req, usagef("--from API and --to ADDR|file:NAME are required")
	}
	if name, ok := strings.CutPrefix(f.to, "file:"); ok {
		// The node resolves NAME under its own --snapshot-dir; it never
		// writes to a path a caller names.
		if err := ft.PlainName(name); err != nil {
			return req, usagef("--to file:%s: %v", name, err)
		}
	}
	rate, err := precopy.ParseBandwidth(f.bw)
	if err != nil {
		return req, usagef("--max-bandwidth: %v", err)
	}
	if _, err := checkpoint.ParseCompression(f.comp); err != nil {
		return req, usagef("--compression: %v", err)
	}
	if f.streams < 1 || f.streams > api.MaxMigrateStreams {
		return req, usagef("--streams %d: want 1 to %d", f.streams, api.MaxMigrateStreams)
	}
	var pcRounds *int
	if f.pcRounds != "" {
		n, err := strconv.Atoi(f.pcRounds)
		if err != nil || n < 0 || n > api.MaxPostcopyAfterRounds {
			return req, usagef("--postcopy-after-rounds %s: want 0 to %d", f.pcRounds, api.MaxPostcopyAfterRounds)
		}
		pcRounds = &n
	}
	if f.downtime <= 0 || f.maxTime <= 0 || f.minRetry <= 0 {
		return req, usagef("--downtime-limit, --max-time and --min-retry must be positive")
	}
	autoConverge := f.autoConverge
	req = api.MigrateRequest{To: f.to, MaxBandwidth: rate, DowntimeLimitMs: f.downtime.Milliseconds(),
		MaxTimeMs: f.maxTime.Milliseconds(), MinRetryMs: f.minRetry.Milliseconds(), Compression: f.comp, AutoConverge: &autoConverge,
		SourceAPI: f.from, Streams: f.streams}
	if f.postcopy {
		req.Postcopy, req.PostcopyAfterRounds = true, pcRounds
	}
	return req, nil
}

// switchPostcopy is --switch-postcopy: POST /migrate/postcopy on the
// source. A refusal (no migration, or one without post-copy) is the
// API's one line.
func switchPostcopy(from, to string, tf tlsFlags) error {
	switch {
	case from == "":
		return usagef("--switch-postcopy needs --from API (the source)")
	case to != "":
		return usagef("--switch-postcopy takes no --to: it switches the migration already running")
	}
	id, err := tf.load()
	if err != nil {
		return err
	}
	c := newAPIClient(from, id, 10*time.Second)
	if err := c.Post(context.Background(), "/migrate/postcopy", nil, nil); err != nil {
		return fmt.Errorf("switch to post-copy: %w", err)
	}
	fmt.Println("post-copy switch asked for: the source stops its round and switches (its status says when: postcopy_active, postcopy_switch_reason command)")
	return nil
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
