package test

import (
	"strings"
	"testing"
	"time"
)

// TestMigrateStreamsBadInput: --streams out of 1..16 is refused in one
// line naming the flag and the range, exit 2.
func TestMigrateStreamsBadInput(t *testing.T) {
	api := freeAddr(t)
	for _, v := range []string{"0", "-1", "17", "many"} {
		r := runCLI(t, 30*time.Second, "migrate", "--from", api, "--to", "127.0.0.1:1", "--streams", v)
		msg := strings.TrimSpace(r.stderr)
		want := "1 to 16"
		if v == "many" {
			want = "streams" // the flag package's own line
		}
		if r.code != 2 || strings.Contains(msg, "\n") || !strings.Contains(msg, "streams") || !strings.Contains(msg, want) {
			t.Errorf("--streams %s: exit %d, stderr %q; want exit 2 and one line naming --streams and %q", v, r.code, r.stderr, want)
		}
	}
}

// TestMigrateStreams: a migration encoded on several goroutines (random
// and text pages, 4 KiB random rewrites) completes within the limit and
// both ends agree on the switch-over digest.
func TestMigrateStreams(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		src := startWithPorts(t, "source-"+kind, false, profileArgs(kind, "256MiB", "64MiB", "5000",
			"--fill", "mixed", "--write-bytes", "4096", "--write-data", "random")...)
		dst := startReceiver(t)
		waitWorkload(t, src, 64<<20)
		time.Sleep(time.Second) // the micro-guest's generated fill
		st := mustMigrate(t, src, dst.data, "--downtime-limit", downtimeFlag, "--streams", "3")
		checkSwitchover(t, src, dst, st)
		checkDowntime(t, st)
		t.Logf("%s, 3 streams: total %d ms, downtime %d ms, wire %.1f MiB", kind, st.TotalTimeMs, st.DowntimeMs, float64(st.TransferredBytes)/(1<<20))
	})
}
