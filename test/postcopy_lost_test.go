package test

import (
	"fmt"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// lostStatus is what a post-copy destination says of its source's death
// (docs/POSTCOPY.md, "Source death").
type lostStatus struct {
	State                          string  `json:"state"`
	StateReason                    string  `json:"state_reason"`
	Status                         string  `json:"status"`
	GuestKind                      string  `json:"guest_kind"`
	MigrationID                    string  `json:"migration_id"`
	PostcopyActive                 bool    `json:"postcopy_active"`
	PostcopyRemainingPages         uint64  `json:"postcopy_remaining_pages"`
	PostcopySource                 string  `json:"postcopy_source"`
	PostcopySourceUnreachableSince string  `json:"postcopy_source_unreachable_since"`
	PostcopySourceUnreachableMs    int64   `json:"postcopy_source_unreachable_ms"`
	PostcopyWaitingMs              []int64 `json:"postcopy_waiting_ms"`
	PostcopyAbandonedAt            string  `json:"postcopy_abandoned_at"`
}

// slowestStatus is the longest status call waitLost saw (for the log).
var slowestStatus atomic.Int64

// waitLost polls dst's status until ok or the deadline; each call must
// answer within 2 s (status never waits for a page; a call takes a few
// ms, the bound leaves room for a loaded machine).
func waitLost(t *testing.T, dst *node, timeout time.Duration, what string, ok func(lostStatus) bool) lostStatus {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var st lostStatus
		t0 := time.Now()
		err := getJSON(dst.api, "/status", &st)
		took := time.Since(t0)
		if took > 2*time.Second {
			t.Errorf("a status call took %v on a destination with pages owed", took)
		}
		for prev := slowestStatus.Load(); int64(took) > prev && !slowestStatus.CompareAndSwap(prev, int64(took)); prev = slowestStatus.Load() {
		}
		if err == nil && ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("destination: not %s after %v (last %+v, err %v)", what, timeout, st, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// abandon runs tandem migrate --abandon against dst's API.
func abandon(t *testing.T, dst *node, extra ...string) cliResult {
	t.Helper()
	return runCLI(t, 30*time.Second, append([]string{"migrate", "--abandon", "--to", dst.api}, extra...)...)
}

// refusedWith checks a refused abandon: exit 1, one line naming want.
func refusedWith(t *testing.T, what string, r cliResult, want ...string) {
	t.Helper()
	line := strings.TrimSpace(r.stderr)
	ok := r.code == 1 && !strings.Contains(line, "\n")
	for _, w := range want {
		ok = ok && strings.Contains(line, w)
	}
	if !ok {
		t.Errorf("abandon %s: exit %d, stderr %q: want exit 1 and one line with %q", what, r.code, r.stderr, want)
	}
}

// The source of an unprotected guest dies during post-copy (SIGKILL), or
// stops answering (SIGSTOP: a hung host) and comes back after the
// operator gave up on it. The destination's status says, within a
// bounded time and without a status call ever waiting, that the source
// is unreachable and since when, how many pages exist only there, which
// vCPU is blocked on one and for how long, and the two ways on (also in
// tandem status's table). `tandem migrate --abandon` is refused while
// nothing is wrong (no post-copy migration, a source still connected,
// another id); given, the guest is lost: state lost with the migration,
// the source and the pages never received, nothing served any more, and
// a second abandon refused. A source that comes back stays paused.
func TestMigratePostcopySourceLost(t *testing.T) {
	t.Parallel()
	t.Run("killed", func(t *testing.T) { t.Parallel(); testSourceLost(t, "synth", true) })
	t.Run("stopped", func(t *testing.T) { t.Parallel(); testSourceLost(t, "synth", false) })
	t.Run("whole", func(t *testing.T) { t.Parallel(); testAbandonWhole(t) })
	// The KVM guest's vCPUs wait for pages inside KVM_RUN, and its close
	// must stop them there (about 1 s).
	t.Run("killed-kvm", func(t *testing.T) {
		skipUnlessKind(t, "kvm")
		t.Parallel()
		testSourceLost(t, "kvm", true)
	})
}

// A post-copy migration whose every page arrived leaves a whole guest:
// abandon is refused, naming the migration, and the guest runs on.
func testAbandonWhole(t *testing.T) {
	src := startSource(t, "synth", guestOpts{memory: "64MiB", workload: "kv"})
	dst := startReceiver(t)
	c := dialConsole(t, src, "c")
	if r := c.do("SET k v"); r != "OK" {
		t.Fatal(r)
	}
	st := mustMigrate(t, src, dst.data, "--postcopy", "--postcopy-after-rounds", "0")
	if st.PostcopyPages == 0 {
		t.Fatalf("no post-copy switch: %v", st)
	}
	ds := waitLost(t, dst, 10*time.Second, "whole", func(s lostStatus) bool { return s.State == "running" && !s.PostcopyActive })
	refusedWith(t, "after every page arrived", abandon(t, dst), "every page arrived", "whole")
	if ds.PostcopySourceUnreachableSince != "" || ds.Status == "postcopy-paused" {
		t.Errorf("a whole guest reported as waiting for its source: %+v", ds)
	}
	d := dialConsole(t, dst, "c")
	d.seq = c.seq + 1
	if got := d.do("GET k"); got != "OK v" {
		t.Errorf("GET k on the destination after the refused abandon: %q", got)
	}
}

func testSourceLost(t *testing.T, kind string, kill bool) {
	src := startSource(t, kind, guestOpts{memory: "64MiB", workload: "kv", vcpus: 2})
	dst := startReceiver(t)
	c := dialConsole(t, src, "c")
	for i := range 300 {
		if r := c.do(fmt.Sprintf("SET key%d v%d", i, i)); r != "OK" {
			t.Fatalf("SET: %q", r)
		}
	}
	if kill {
		refusedWith(t, "before any migration", abandon(t, dst), "no post-copy migration")
		if r := abandon(t, dst, "--id", "nothex"); r.code != 2 || !strings.Contains(r.stderr, "--id") {
			t.Errorf("--id nothex: exit %d, stderr %q: want exit 2 naming --id", r.code, r.stderr)
		}
	}
	wait := startCLI("migrate", "--from", src.api, "--to", dst.data, "--postcopy", "--postcopy-after-rounds", "0",
		"--max-bandwidth", "256Kbit", "--compression", "none", "--json")
	st := waitLost(t, dst, 30*time.Second, "running with pages missing", func(s lostStatus) bool {
		return s.State == "running" && s.PostcopyActive && s.PostcopyRemainingPages > 0 && s.MigrationID != ""
	})
	id := st.MigrationID
	if st.PostcopySource != src.api || st.PostcopySourceUnreachableSince != "" {
		t.Errorf("while connected: source %q (want %s), unreachable since %q (want none)", st.PostcopySource, src.api, st.PostcopySourceUnreachableSince)
	}
	if kill {
		refusedWith(t, "while the source is connected", abandon(t, dst), "is connected", id)
		src.kill()
	} else if err := src.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	lostAt := time.Now()
	// A client reads the preloaded keys: the vCPU serving it blocks on
	// the first page that never came.
	var replies atomic.Int64
	r := dialConsole(t, dst, "r") // closed by the test's cleanup, which ends the loop below
	go func() {
		for i := range 300 {
			r.seq++
			if _, err := r.requestSeq(r.seq, fmt.Sprintf("GET key%d", i), 20*time.Second); err != nil {
				return
			}
			replies.Add(1)
		}
	}()
	// Killed: the connections reset at once; stopped: the link timeout
	// (5 s of silence) finds it.
	st = waitLost(t, dst, 12*time.Second, "reporting its source unreachable with a vCPU blocked", func(s lostStatus) bool {
		return s.Status == "postcopy-paused" && s.PostcopySourceUnreachableSince != "" && slicesMax(s.PostcopyWaitingMs) >= 200
	})
	t.Logf("unreachable reported %v after the source's %s; %s", time.Since(lostAt).Round(time.Millisecond), map[bool]string{true: "SIGKILL", false: "SIGSTOP"}[kill], st.StateReason)
	for _, want := range []string{id, src.api, fmt.Sprintf("%d pages exist only there", st.PostcopyRemainingPages),
		"cannot run past a missing page", "blocked on a missing page: vCPU", "tandem migrate --resume", "tandem migrate --abandon --to " + dst.api + " --id " + id} {
		if !strings.Contains(st.StateReason, want) {
			t.Errorf("state_reason %q: no %q", st.StateReason, want)
		}
	}
	if st.State != "running" || st.PostcopyRemainingPages == 0 || st.PostcopySourceUnreachableMs <= 0 {
		t.Errorf("outage status %+v", st)
	}
	// "Since" is the source's last word, not when the link timeout
	// noticed its silence (5 s later for the stopped source).
	if since, err := time.Parse(time.RFC3339Nano, st.PostcopySourceUnreachableSince); err != nil ||
		since.Before(lostAt.Add(-time.Second)) || since.After(lostAt.Add(time.Second)) {
		t.Errorf("unreachable since %q (%v), the source went at %v", st.PostcopySourceUnreachableSince, err, lostAt)
	}
	if v := metric(t, dst, "tandem_postcopy_source_unreachable_seconds"); v <= 0 {
		t.Errorf("tandem_postcopy_source_unreachable_seconds %v while the source is unreachable", v)
	}
	if table := runCLI(t, 10*time.Second, "status", "--api", dst.api); !strings.Contains(table.stdout, "POST-COPY SOURCE UNREACHABLE: "+src.api) {
		t.Errorf("tandem status table has no alert:\n%s", table.stdout)
	}
	refusedWith(t, "with another id", abandon(t, dst, "--id", "00000000deadbeef"), "00000000deadbeef", id)
	before := replies.Load()
	ab := abandon(t, dst, "--id", id)
	if ab.code != 0 || !strings.Contains(ab.stdout, "guest lost: post-copy migration "+id+" from "+src.api) ||
		!strings.Contains(ab.stdout, fmt.Sprintf("%d pages never received", st.PostcopyRemainingPages)) {
		t.Fatalf("abandon: exit %d\nstdout %s\nstderr %s", ab.code, ab.stdout, ab.stderr)
	}
	lost := waitLost(t, dst, 2*time.Second, "lost", func(s lostStatus) bool { return s.State == "lost" })
	if lost.MigrationID != id || lost.PostcopySource != src.api || lost.PostcopyRemainingPages != st.PostcopyRemainingPages ||
		lost.PostcopyAbandonedAt == "" || lost.PostcopyActive || lost.GuestKind != "" || lost.Status != "lost" ||
		!strings.Contains(lost.StateReason, "stays paused") {
		t.Errorf("after abandon: %+v", lost)
	}
	refusedWith(t, "twice", abandon(t, dst), "already abandoned", id)
	if lostM, downM := metric(t, dst, "tandem_guest_lost"), metric(t, dst, "tandem_postcopy_source_unreachable_seconds"); lostM != 1 || downM != 0 {
		t.Errorf("metrics after abandon: tandem_guest_lost %v, unreachable seconds %v", lostM, downM)
	}
	// Nothing of the half guest answers any more.
	k := dialConsole(t, dst, "k")
	if got, err := k.requestSeq(1, "GET key0", time.Second); err == nil {
		t.Errorf("the lost guest answered %q", got)
	}
	if n := replies.Load(); n != before {
		t.Errorf("the lost guest answered %d requests after abandon", n-before)
	}
	if !kill {
		checkSourceStaysPaused(t, src)
	}
	t.Logf("slowest status call so far (all cases): %v", time.Duration(slowestStatus.Load()).Round(time.Microsecond))
	if mr, err := wait(time.Minute); err != nil || mr.code == 0 {
		t.Errorf("migrate: exit %d, %v: want a failure", mr.code, err)
	}
}

// checkSourceStaysPaused resumes a stopped source after its destination
// abandoned the guest: it finds its link gone and waits, paused, for a
// resume (postcopy-paused); a resume fails in one line (the destination
// that abandoned the guest closed its data port; had it not, it would
// refuse the migration's channels naming the abandon), and the source's
// guest stays paused, holding its pages.
func checkSourceStaysPaused(t *testing.T, src *node) {
	t.Helper()
	if err := src.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, src, 15*time.Second, "the source paused on its lost link", func(s status) bool { return s.Status == "postcopy-paused" })
	r := runCLI(t, time.Minute, "migrate", "--resume", "--from", src.api)
	if r.code == 0 || strings.Count(strings.TrimSpace(r.stderr), "\n") > 0 {
		t.Errorf("resume after the abandon: exit %d, stderr %q: want a one-line failure", r.code, r.stderr)
	}
	time.Sleep(500 * time.Millisecond)
	st := mustStatus(t, src)
	if !st.Paused || st.Status != "postcopy-paused" {
		t.Errorf("source after the abandon: status %q paused %v: want it paused, holding its pages", st.Status, st.Paused)
	}
}

func slicesMax(s []int64) int64 {
	var m int64
	for _, v := range s {
		m = max(m, v)
	}
	return m
}

// metric is metricValue of n, failing the test without it.
func metric(t *testing.T, n *node, name string) float64 {
	t.Helper()
	v, err := metricValue(n.api, name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}
