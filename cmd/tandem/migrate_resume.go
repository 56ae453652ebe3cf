package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/ft"
	"github.com/tandemvm/tandem/internal/progress"
)

// resumeArgs are the flags `tandem migrate --resume` takes.
type resumeArgs struct {
	from, to, id string
	maxTime      time.Duration
	json         bool
}

// resumeFlags are the flags that go with --resume; any other is refused.
var resumeFlags = map[string]bool{"resume": true, "from": true, "to": true, "id": true, "max-time": true, "json": true,
	"tls-ca": true, "tls-cert": true, "tls-key": true}

// migrateResume is `tandem migrate --resume`: the source dials new
// post-copy channels to the destination (POST /migrate/resume), then the
// command follows the migration to its end, as a migration's own
// command does, for at most --max-time.
func migrateResume(fs *flag.FlagSet, a resumeArgs, tf tlsFlags) error {
	var other string
	fs.Visit(func(f *flag.Flag) {
		if !resumeFlags[f.Name] && other == "" {
			other = f.Name
		}
	})
	switch {
	case other != "":
		return usagef("--%s does not go with --resume (it takes --from, --to, --id, --max-time, --json and the TLS flags)", other)
	case a.from == "":
		return usagef("--resume needs --from API (the source's)")
	case strings.HasPrefix(a.to, "file:"):
		return usagef("--to %s: a resume goes to a receiver's data HOST:PORT, not a file", a.to)
	case a.id != "" && !isMigrationID(a.id):
		return usagef("--id %q: want a migration id, 16 hex digits (migration_id in the source's status)", a.id)
	case a.maxTime <= 0:
		return usagef("--max-time must be positive")
	}
	if a.to != "" {
		if _, _, err := net.SplitHostPort(a.to); err != nil {
			return usagef("--to %q: want the receiver's data HOST:PORT", a.to)
		}
	}
	id, err := tf.load()
	if err != nil {
		return err
	}
	// Longer than the source's own bound on the resume's dials: against
	// a link still dead the operator gets its one-line refusal, not the
	// client's timeout.
	c := newAPIClient(a.from, id, ft.PostcopyResumeDialTimeout+api.DefaultTimeout)
	ctx := context.Background()
	var reply struct {
		MigrationID string `json:"migration_id"`
		To          string `json:"to"`
	}
	if err := c.Post(ctx, "/migrate/resume", api.MigrateResumeRequest{To: a.to, MigrationID: a.id}, &reply); err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	fmt.Fprintf(os.Stderr, "post-copy of migration %s resumed to %s\n", reply.MigrationID, reply.To)
	return progress.Follow(ctx, c, progress.Watch{Out: os.Stdout, TTY: isTerminal(os.Stdout), Patience: a.maxTime, JSON: a.json})
}
