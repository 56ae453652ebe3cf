package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/tandemvm/tandem/internal/statustext"
)

func init() {
	register("status", "show the cluster as a node sees it, then the node (--json for machines, --watch to refresh, --digest for the memory digest)", cmdStatus)
}

// statusTimeout bounds one GET /status (a digest scans guest memory).
const statusTimeout = 30 * time.Second

func cmdStatus(args []string) error {
	fs := newFlagSet("status")
	api := fs.String("api", defaultAPI, "API address of the node (any role: primary, secondary or witness)")
	asJSON := fs.Bool("json", false, "print one JSON object (the node's, as it sent it)")
	digest := fs.Bool("digest", false, "add memory_digest, the digest of guest memory now (a node that is not protecting a guest)")
	watch := fs.Duration("watch", 0, "refresh every so often (e.g. 1s) until interrupted; 0: once")
	id, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if *watch < 0 || (*watch > 0 && *watch < 100*time.Millisecond) {
		return usagef("--watch %v: want 0 or at least 100ms", *watch)
	}
	path := "/status"
	if *digest {
		path += "?digest=1"
	}
	client := newAPIClient(*api, id, statusTimeout)
	once := func(ctx context.Context) error {
		// Every field the node sends, as it sends it (not api.Status): a
		// node of a newer build may add some.
		var raw map[string]any
		if err := client.Get(ctx, path, &raw); err != nil {
			if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("%w (is %s the node's --api address? its raft, data and console ports do not answer HTTP)", err, *api)
			}
			return err
		}
		if *digest && raw["memory_digest"] == nil && raw["committed_digest"] == nil { // present on every role, null when none was taken
			fmt.Fprintln(os.Stderr, "tandem status: no memory_digest: a node protecting its guest (or migrating it) is not paused for a scan; its replica is proven by --verify-epochs (digest_mismatches, verified_epochs)")
		}
		if *asJSON {
			enc := json.NewEncoder(os.Stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(raw)
		}
		return statustext.Write(os.Stdout, raw)
	}
	if *watch == 0 {
		return once(context.Background())
	}
	ctx, stop := stopContext()
	defer stop()
	t := time.NewTicker(*watch)
	defer t.Stop()
	for {
		if !*asJSON {
			if isTerminal(os.Stdout) {
				fmt.Print("\033[H\033[2J") // clear the terminal
			}
			fmt.Printf("%s  every %v  (ctrl-c to stop)\n\n", time.Now().Format(time.TimeOnly), *watch)
		}
		if err := once(ctx); err != nil && ctx.Err() == nil {
			fmt.Printf("%v\n", err) // keep watching: the node may come back
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
