package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/tandemvm/tandem/api"
)

// abandonAsked reports whether a migrate command line is --abandon (any
// of the flag package's spellings), which has flags of its own.
func abandonAsked(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "abandon" {
			continue
		}
		// The flag package's own reading of a boolean (1, t, TRUE...):
		// any spelling it takes for true must not fall through to a
		// plain migrate that ignores the flag. One it refuses falls
		// through, and the plain migrate's parse rejects it (exit 2).
		on, err := strconv.ParseBool(val)
		if !hasVal || (err == nil && on) {
			return true
		}
	}
	return false
}

// cmdMigrateAbandon is `tandem migrate --abandon --to DST [--id ID]`: on
// the destination of a post-copy migration whose source is gone, declare
// the guest lost (POST /migrate/abandon). The destination stops its half
// guest for good; the source's copy, if its process lives, stays paused.
func cmdMigrateAbandon(args []string) error {
	fs := newFlagSet("migrate --abandon")
	fs.Bool("abandon", true, "declare the guest of a post-copy migration whose source is lost: the destination stops its half guest for good")
	to := fs.String("to", "", "API address of the post-copy destination (its --api, not its data address)")
	id := fs.String("id", "", "the migration's id (migration_id in the destination's status); refused if the destination holds another")
	asJSON := fs.Bool("json", false, "print the destination's answer as JSON")
	from := fs.String("from", "", "not with --abandon: it asks the destination only (the source is lost)")
	idFlags, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	switch {
	case *from != "":
		return usagef("--abandon asks the destination only: drop --from (give the destination's API with --to)")
	case *to == "":
		return usagef("--abandon needs --to API, the destination's API address")
	case strings.HasPrefix(*to, "file:"):
		return usagef("--to %s: a snapshot runs no guest to abandon; want the destination's API address", *to)
	case *id != "" && !isMigrationID(*id):
		return usagef("--id %q: want a migration id, 16 hex digits (migration_id in the destination's status)", *id)
	}
	var res api.AbandonResult
	c := newAPIClient(*to, idFlags, 0)
	if err := c.Post(context.Background(), "/migrate/abandon", api.AbandonRequest{MigrationID: *id}, &res); err != nil {
		return fmt.Errorf("abandon refused by %s: %w", *to, err)
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Printf("guest lost: post-copy migration %s from %s abandoned on %s; %d pages never received\n", res.MigrationID, res.Source, *to, res.PagesLost)
	fmt.Printf("  %s\n", res.Detail)
	return nil
}

// isMigrationID is the form of the ids sources give migrations.
func isMigrationID(s string) bool {
	if len(s) != 16 {
		return false
	}
	for _, r := range s {
		if !strings.ContainsRune("0123456789abcdef", r) {
			return false
		}
	}
	return true
}
