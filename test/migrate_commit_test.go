package test

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/test/linkproxy"
)

// The two-phase switch-over of a live migration, attacked on the wire: a
// link proxy cuts the connection exactly as the source's commit (or the
// destination's ready) crosses it. Whatever is lost, the guest never runs
// on both nodes; the node that does not run answers no kv request.

// commitStatus is the part of a migration node's status these tests read.
type commitStatus struct {
	Role        string `json:"role"`
	State       string `json:"state"`
	StateReason string `json:"state_reason"`
	Paused      bool   `json:"paused"`
	Status      string `json:"status"`
	Outcome     string `json:"outcome"`
	CommitSent  bool   `json:"commit_sent"`
	MigrationID string `json:"migration_id"`
	Error       string `json:"error"`
}

func getCommit(api string) (commitStatus, error) {
	var st commitStatus
	return st, getJSON(api, "/status", &st)
}

func (s commitStatus) runs() bool { return s.State == "running" && !s.Paused }

// runnerWatch samples both nodes' status every few milliseconds and
// records any moment both ran, and every state the destination showed.
type runnerWatch struct {
	stop chan struct{}
	wg   sync.WaitGroup

	mu        sync.Mutex
	both      []string
	dstStates map[string]bool
	samples   int
}

func watchRunners(src, dst *node) *runnerWatch {
	w := &runnerWatch{stop: make(chan struct{}), dstStates: map[string]bool{}}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		for {
			select {
			case <-w.stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			// The destination first: once it runs it keeps running,
			// so a source still running after it was seen running ran
			// at the same moment. Read the other way round, a source
			// that stopped between the two reads (a slow read on a
			// busy machine) looked like both running.
			d, err2 := getCommit(dst.api)
			s, err1 := getCommit(src.api)
			if err1 != nil || err2 != nil {
				continue
			}
			w.mu.Lock()
			w.samples++
			w.dstStates[d.State] = true
			if s.runs() && d.runs() {
				w.both = append(w.both, time.Now().Format("15:04:05.000"))
			}
			w.mu.Unlock()
		}
	}()
	return w
}

func (w *runnerWatch) end(t *testing.T) map[string]bool {
	t.Helper()
	close(w.stop)
	w.wg.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.both) > 0 {
		t.Errorf("both nodes ran the guest at %d of %d samples (first %s)", len(w.both), w.samples, w.both[0])
	}
	return w.dstStates
}

// noKV checks that n's console answers no kv request.
func noKV(t *testing.T, n *node) {
	t.Helper()
	c, err := dialConsoleErr(n, "probe")
	if err != nil {
		return // refused outright
	}
	defer c.c.Close()
	if r, err := c.requestSeq(1, "GET a", time.Second); err == nil {
		t.Errorf("%s does not run the guest but answered GET a with %q", n.name, r)
	}
}

// kvSeed writes a few keys on n and returns them.
func kvSeed(t *testing.T, n *node) map[string]string {
	t.Helper()
	c := dialConsole(t, n, "seed")
	kv := map[string]string{}
	for _, k := range []string{"a", "b", "c", "d"} {
		v := "v-" + k
		if r := c.do("SET " + k + " " + v); r != "OK" {
			t.Fatalf("SET %s: %q", k, r)
		}
		kv[k] = v
	}
	return kv
}

// kvChecks numbers kvCheck's clients: the kv guest answers a client's
// stale seq from its record, and the record migrates with the guest.
var kvChecks atomic.Int64

func kvCheck(t *testing.T, n *node, kv map[string]string) {
	t.Helper()
	c := dialConsole(t, n, fmt.Sprintf("check%d", kvChecks.Add(1)))
	for k, v := range kv {
		if r := c.do("GET " + k); r != "OK "+v {
			t.Errorf("%s: GET %s = %q, want OK %s", n.name, k, r, v)
		}
	}
}

// The commit is cut on the wire: the source stays stopped and reports
// "unknown"; the destination holds the guest paused (awaiting-commit),
// asks the source's API, learns the source committed, and resumes. The
// same with the destination's final acknowledgement cut instead (the
// attack that made an older source resume beside a running destination).
// At no moment do both run.
func TestMigrateCommitLost(t *testing.T) {
	cases := []struct {
		name    string
		dir     linkproxy.Direction
		pattern string
	}{
		{"commit", linkproxy.Up, `"migrate":"commit"`},
		{"final-ack", linkproxy.Down, `"final":true`},
	}
	forEachKind(t, func(t *testing.T, kind string) {
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				src := startSource(t, kind, guestOpts{workload: "kv", memory: "128MiB"})
				dst := startReceiver(t)
				proxy := startProxy(t, dst.data, 0)
				fired := proxy.CutOn(tc.dir, []byte(tc.pattern))
				kv := kvSeed(t, src)
				w := watchRunners(src, dst)
				r, st := migrate(t, src, proxy.Addr())
				select {
				case <-fired:
				default:
					t.Fatalf("%s never crossed the proxy: exit %d\n%s\n%s", tc.pattern, r.code, r.stdout, r.stderr)
				}
				t.Logf("%s, %s lost: tandem migrate exit %d: %s", kind, tc.name, r.code, lastLine(r.stderr))
				if r.code != 1 || st.Status != "unknown" || !strings.Contains(r.stderr, "unknown: destination awaiting commit; source stopped") {
					t.Errorf("tandem migrate with the %s lost: exit %d, status %q\nstdout:\n%s\nstderr:\n%s", tc.name, r.code, st.Status, r.stdout, r.stderr)
				}
				ss, err := getCommit(src.api)
				if err != nil || ss.State != "postmigrate" || !ss.Paused || ss.Outcome != "unknown: destination awaiting commit; source stopped" || !ss.CommitSent {
					t.Errorf("source after the lost %s: %+v, %v", tc.name, ss, err)
				}
				ds, took := waitCommit(t, dst, 15*time.Second, "running", func(s commitStatus) bool { return s.runs() })
				t.Logf("%s: destination %s %v after tandem migrate returned", kind, ds.State, took.Round(time.Millisecond))
				states := w.end(t)
				if tc.name == "commit" && !states["awaiting-commit"] {
					t.Errorf("the destination never said awaiting-commit (states seen: %v)", states)
				}
				if s, _ := getCommit(src.api); s.runs() {
					t.Errorf("the source runs after the destination resumed: %+v", s)
				}
				kvCheck(t, dst, kv)
				noKV(t, src)
			})
		}
	})
}

// The commit is cut and the source's API cannot be reached from the
// destination: the destination stays paused in awaiting-commit (saying
// why), refuses POST /migrate/commit without the source's word, and runs
// the guest once the operator forces it.
func TestMigrateCommitLostSourceUnreachable(t *testing.T) {
	t.Parallel()
	src := startSource(t, "synth", guestOpts{workload: "kv", memory: "128MiB"})
	dst := startReceiver(t, "--commit-timeout", "1s")
	proxy := startProxy(t, dst.data, 0)
	proxy.CutOn(linkproxy.Up, []byte(`"migrate":"commit"`))
	kv := kvSeed(t, src)
	w := watchRunners(src, dst)
	if err := postJSON(src.api, "/migrate", map[string]any{"to": proxy.Addr(), "source_api": "127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	ss, _ := waitCommit(t, src, 30*time.Second, "finished", func(s commitStatus) bool {
		return s.Status == "completed" || s.Status == "failed" || s.Status == "unknown"
	})
	if ss.Status != "unknown" || ss.State != "postmigrate" || !ss.Paused {
		t.Fatalf("source: %+v", ss)
	}
	ds, _ := waitCommit(t, dst, 10*time.Second, "awaiting-commit", func(s commitStatus) bool { return s.State == "awaiting-commit" })
	time.Sleep(3 * time.Second) // it stays so: nothing resolves it by itself
	ds, _ = getCommit(dst.api)
	if ds.State != "awaiting-commit" || !ds.Paused || !strings.Contains(ds.StateReason, "POST /migrate/commit") {
		t.Fatalf("destination while the source cannot be asked: %+v", ds)
	}
	t.Logf("destination: %s: %s", ds.State, ds.StateReason)
	noKV(t, dst)
	noKV(t, src)
	err := postJSON(dst.api, "/migrate/commit", nil)
	if err == nil || !strings.Contains(err.Error(), "force") {
		t.Fatalf("POST /migrate/commit without the source's word: %v, want a refusal asking for force", err)
	}
	if err := postJSON(dst.api, "/migrate/commit", map[string]any{"force": true}); err != nil {
		t.Fatalf("forced commit: %v", err)
	}
	waitCommit(t, dst, 10*time.Second, "running", func(s commitStatus) bool { return s.runs() })
	w.end(t)
	kvCheck(t, dst, kv)
	noKV(t, src)
}

// The destination's ready is cut: the source resumes (aborted), and the
// destination, which never got a commit, drops its copy once the source's
// API says the migration failed there. At no moment do both run.
func TestMigrateReadyLost(t *testing.T) {
	src := startSource(t, "synth", guestOpts{workload: "kv", memory: "128MiB"})
	dst := startReceiver(t)
	proxy := startProxy(t, dst.data, 0)
	proxy.CutOn(linkproxy.Down, []byte(`"ready":true`))
	kv := kvSeed(t, src)
	w := watchRunners(src, dst)
	r, st := migrate(t, src, proxy.Addr())
	t.Logf("tandem migrate exit %d: %s", r.code, lastLine(r.stderr))
	if r.code != 1 || st.Status != "failed" || !strings.Contains(r.stdout+r.stderr, "aborted: source resumed") {
		t.Errorf("tandem migrate with ready lost: exit %d status %q\nstdout:\n%s\nstderr:\n%s", r.code, st.Status, r.stdout, r.stderr)
	}
	_, took := waitCommit(t, dst, 15*time.Second, "waiting again", func(s commitStatus) bool { return s.State == "waiting" })
	t.Logf("destination dropped its copy %v after the migration ended", took.Round(time.Millisecond))
	w.end(t)
	if s, _ := getCommit(src.api); !s.runs() {
		t.Fatalf("source does not run after an aborted switch-over: %+v", s)
	}
	kvCheck(t, src, kv)
	noKV(t, dst)
	// The destination takes a new migration, which now commits.
	st2 := mustMigrate(t, src, dst.data)
	t.Logf("second migration: %s in %d ms, downtime %d ms", st2.Status, st2.TotalTimeMs, st2.DowntimeMs)
	kvCheck(t, dst, kv)
	noKV(t, src)
}

func waitCommit(t *testing.T, n *node, timeout time.Duration, what string, ok func(commitStatus) bool) (commitStatus, time.Duration) {
	t.Helper()
	t0 := time.Now()
	for {
		st, err := getCommit(n.api)
		if err == nil && ok(st) {
			return st, time.Since(t0)
		}
		if time.Since(t0) > timeout {
			t.Fatalf("%s: not %s after %v (last %+v, err %v)", n.name, what, timeout, st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
