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
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *switchPC {
		return switchPostcopy(*from, *to, tf)
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
	rate, err := precopy.ParseBandwidth(*bw)
	if err != nil {
		return usagef("--max-bandwidth: %v", err)
	}
	if _, err := checkpoint.ParseCompression(*comp); err != nil {
		return usagef("--compression: %v", err)
	}
	if *streams < 1 || *streams > api.MaxMigrateStreams {
		return usagef("--streams %d: want 1 to %d", *streams, api.MaxMigrateStreams)
	}
	var pcRounds *int
	if *pcRoundsFlag != "" {
		n, err := strconv.Atoi(*pcRoundsFlag)
		if err != nil || n < 0 || n > api.MaxPostcopyAfterRounds {
			return usagef("--postcopy-after-rounds %s: want 0 to %d", *pcRoundsFlag, api.MaxPostcopyAfterRounds)
		}
		pcRounds = &n
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
		SourceAPI: *from, Streams: *streams}
	if *postcopy {
		req.Postcopy, req.PostcopyAfterRounds = true, pcRounds
	}
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
