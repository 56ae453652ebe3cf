package main

import (
	"bytes"
	"strings"
	"testing"
)

// tandem migrate --abandon takes its own flags: each bad command line is
// one line naming the flag, exit 2, before anything is asked of a node.
func TestMigrateAbandonUsage(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"migrate", "--abandon"}, "--to"},
		{[]string{"migrate", "-abandon", "--to", "file:snap"}, "--to file:snap"},
		{[]string{"migrate", "--abandon=true", "--to", "127.0.0.1:1", "--id", "0123"}, "--id"},
		{[]string{"migrate", "--abandon", "--to", "127.0.0.1:1", "--id", "0123456789ABCDEF"}, "--id"},
		{[]string{"migrate", "--abandon", "--from", "127.0.0.1:2", "--to", "127.0.0.1:1"}, "--from"},
		{[]string{"migrate", "--abandon", "--to", "127.0.0.1:1", "--postcopy"}, "postcopy"},
		// --resume takes the same ids as --abandon (16 hex digits).
		{[]string{"migrate", "--resume", "--from", "127.0.0.1:2", "--id", "0123"}, "16 hex digits"},
		{[]string{"migrate", "--resume", "--from", "127.0.0.1:2", "--id", "0123456789abcdef0"}, "16 hex digits"},
	} {
		var out, errb bytes.Buffer
		rc := app.Main(c.args, &out, &errb)
		if rc != 2 || strings.Count(errb.String(), "\n") != 1 || !strings.Contains(errb.String(), c.want) {
			t.Errorf("%q: exit %d, stderr %q: want exit 2 and one line naming %s", c.args, rc, errb.String(), c.want)
		}
	}
	for args, want := range map[string]bool{"--abandon": true, "-abandon": true, "--abandon=1": true, "--abandon=TRUE": true, "--abandon=t": true, "--abandon=false": false, "--abandon=F": false, "--to x -- --abandon": false} {
		if got := abandonAsked(strings.Fields(args)); got != want {
			t.Errorf("abandonAsked(%q) = %v", args, got)
		}
	}
}
