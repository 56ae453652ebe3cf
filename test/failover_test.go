package test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/e2e"
)

// End-to-end tests of the raft trio (tandem primary/secondary/witness
// with --id): failover on kill -9, loss of the secondary or the witness,
// a frozen primary that must stay silent when it wakes, switchover, bad
// configurations, and the drill. The process machinery is harness_test.go's.

// trioMember is one configured node of a test trio (the harness's
// e2e.Node: its addresses stay fixed so a restart is the same command)
// and the test's handle on its current process.
type trioMember struct {
	*e2e.Node
	n *node
}

// testTrio is the harness's trio (e2e.Trio) run by a test: its processes
// die with the test, and their logs are printed if it failed.
type testTrio struct {
	*e2e.Trio
	t     *testing.T
	kind  string
	m     map[string]*trioMember
	order []string
	pki   *testPKI // TLS: each member's certificate is its ID's (tls_test.go)
}

func newTestTrio(t *testing.T, kind string) *testTrio {
	return newTestTrioAt(t, kind, nil)
}

// newTestTrioAt is newTestTrio on fixed addresses (nil: fresh loopback
// ports).
func newTestTrioAt(t *testing.T, kind string, addrs map[string]e2e.Addrs) *testTrio {
	base := t.TempDir()
	et, err := e2e.NewTrio(e2e.TrioConfig{Bin: tandemBin, Dir: base, LogDir: filepath.Join(base, "logs"), Guest: kind, Addrs: addrs})
	if err != nil {
		t.Fatal(err)
	}
	tr := &testTrio{Trio: et, t: t, kind: kind, m: map[string]*trioMember{}, order: []string{"a", "b", "w"}}
	for _, n := range et.Nodes() {
		tr.m[n.ID] = &trioMember{Node: n}
	}
	return tr
}

func (tr *testTrio) args(id string) []string {
	return tr.Args(tr.m[id].Node)
}

// start starts member id with its command, as a node of the test.
func (tr *testTrio) start(id string) *node {
	tr.t.Helper()
	m := tr.m[id]
	if tr.pki != nil {
		tr.SetTLS(tr.pki.dir, nil)
		useTLS(tr.pki.client(operator), m.API, m.Console)
	}
	if err := tr.Start(m.Node); err != nil {
		tr.t.Fatal(err)
	}
	n := adopt(tr.t, m.Proc(), tr.args(id))
	n.name = fmt.Sprintf("%s-%d", id, m.Starts())
	n.api, n.console = m.API, m.Console
	m.n = n
	return n
}

func (tr *testTrio) startAll() {
	for _, id := range tr.order {
		tr.start(id)
	}
}

// trioStatus is a member's GET /status.
type trioStatus = api.Status

// trioStat is the status of the node whose API is at addr, through the
// typed client (over TLS when the node runs with it).
func trioStat(addr string) (trioStatus, error) {
	base, hc := apiClient(addr)
	return api.NewClientHTTP(base, hc).Status(context.Background(), false)
}

// waitMember polls id's status until ok or the deadline.
func (tr *testTrio) waitMember(id string, timeout time.Duration, what string, ok func(trioStatus) bool) trioStatus {
	tr.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, err := trioStat(tr.m[id].API)
		if err == nil && ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			tr.t.Fatalf("%s: not %s after %v (last role %q state %q cluster %+v, err %v)", id, what, timeout, st.Role, st.State, e2e.Cluster(st), err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func protectedPrimary(id string) func(trioStatus) bool {
	return func(st trioStatus) bool {
		c := e2e.Cluster(st)
		return st.Role == "primary" && st.State == "running" && st.Protected() && c.Protected && c.Primary == id
	}
}

// waitProtected waits until pri is a protected primary and sec its secondary.
func (tr *testTrio) waitProtected(pri, sec string, timeout time.Duration) trioStatus {
	tr.t.Helper()
	st := tr.waitMember(pri, timeout, "a protected primary", protectedPrimary(pri))
	tr.waitMember(sec, timeout, "secondary", func(s trioStatus) bool { return s.Role == "secondary" })
	return st
}

// startLoad runs the harness's kvWriter on id's console until stop or the
// primary goes away.
func (tr *testTrio) startLoad(id, client string) (*ackLog, chan struct{}, chan error) {
	tr.t.Helper()
	c, err := dialConsoleErr(tr.m[id].n, client)
	if err != nil {
		tr.t.Fatal(err)
	}
	tr.t.Cleanup(func() { c.c.Close() })
	lg, stop, done := newAckLog(), make(chan struct{}), make(chan error, 1)
	go func() { done <- kvWriter(c, lg, stop, 3*time.Second, rand.New(rand.NewPCG(1, 2))) }()
	return lg, stop, done
}

// serveWithin polls id's console until a GET is answered; it returns how
// long that took.
func (tr *testTrio) serveWithin(id string, timeout time.Duration) time.Duration {
	tr.t.Helper()
	t0 := time.Now()
	for i := 0; ; i++ {
		if c, err := dialConsoleErr(tr.m[id].n, fmt.Sprintf("probe%d", i)); err == nil {
			_, err := c.requestSeq(1, "GET probe", 500*time.Millisecond)
			c.c.Close()
			if err == nil {
				return time.Since(t0)
			}
		}
		if time.Since(t0) > timeout {
			tr.t.Fatalf("%s's console served nothing within %v", id, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func waitAcks(t *testing.T, lg *ackLog, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		lg.mu.Lock()
		got := len(lg.acked)
		lg.mu.Unlock()
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d acknowledged writes after %v, want %d", got, timeout, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestFailoverKillPrimary: kill -9 the primary under load; the secondary
// serves with every acknowledged write; the old primary, restarted with
// the same command, rejoins as secondary and the pair is protected again.
func TestFailoverKillPrimary(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		tr := newTestTrio(t, kind)
		tr.startAll()
		tr.waitProtected("a", "b", 30*time.Second)
		lg, stop, done := tr.startLoad("a", "w1")
		waitAcks(t, lg, 20, 30*time.Second)
		killAt := time.Now()
		tr.m["a"].n.kill()
		<-done // the writer stops at its first error: the primary is gone
		close(stop)
		tr.serveWithin("b", 10*time.Second)
		rto := time.Since(killAt)
		st := tr.waitMember("b", 5*time.Second, "primary", func(s trioStatus) bool { return s.Role == "primary" && e2e.Cluster(s).Primary == "b" })
		t.Logf("%s: b primary at generation %d; first reply %v after the kill; %d acknowledged writes", kind, e2e.Cluster(st).Generation, rto.Round(time.Millisecond), len(lg.acked))
		if e2e.Cluster(st).Generation < 2 {
			t.Errorf("generation %d after a failover, want >= 2", e2e.Cluster(st).Generation)
		}
		checkAcked(t, tr.m["b"].n, lg)

		tr.start("a")
		tr.waitProtected("b", "a", 30*time.Second)
		c := dialConsole(t, tr.m["b"].n, "after")
		if r := c.do("SET after-rejoin yes"); r != "OK" {
			t.Fatalf("SET after the rejoin: %q", r)
		}
	})
}

// TestFailoverKillSecondary: the primary stays primary, says it is
// unprotected, keeps serving; the restarted secondary re-protects it.
func TestFailoverKillSecondary(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		tr := newTestTrio(t, kind)
		tr.startAll()
		tr.waitProtected("a", "b", 30*time.Second)
		tr.m["b"].n.kill()
		st := tr.waitMember("a", 10*time.Second, "unprotected primary", func(s trioStatus) bool {
			return s.Role == "primary" && !s.Protected() && !e2e.Cluster(s).Protected
		})
		if e2e.Cluster(st).Primary != "a" {
			t.Fatalf("cluster primary %q after the secondary died, want a", e2e.Cluster(st).Primary)
		}
		c := dialConsole(t, tr.m["a"].n, "solo")
		for i := 0; i < 5; i++ {
			if r := c.do(fmt.Sprintf("SET solo%d x", i)); r != "OK" {
				t.Fatalf("unprotected SET: %q", r)
			}
		}
		tr.start("b")
		tr.waitProtected("a", "b", 30*time.Second)
		if r := c.do("GET solo4"); r != "OK x" {
			t.Fatalf("GET after re-protection: %q", r)
		}
	})
}

// TestFailoverKillWitness: raft keeps a majority of two; the primary stays
// primary and protected, and keeps serving.
func TestFailoverKillWitness(t *testing.T) {
	tr := newTestTrio(t, "synth")
	tr.startAll()
	tr.waitProtected("a", "b", 30*time.Second)
	tr.m["w"].n.kill()
	c := dialConsole(t, tr.m["a"].n, "now")
	end := time.Now().Add(3 * time.Second)
	for i := 0; time.Now().Before(end); i++ {
		if r := c.do(fmt.Sprintf("SET w%d x", i)); r != "OK" {
			t.Fatalf("SET without the witness: %q", r)
		}
	}
	st, err := trioStat(tr.m["a"].API)
	if err != nil || !protectedPrimary("a")(st) {
		t.Fatalf("without the witness a is not a protected primary: %+v %v", st, err)
	}
}

// TestFailoverFrozenPrimaryStaysSilent: SIGSTOP the primary (it cannot
// fence itself while stopped); the secondary takes over; on SIGCONT the
// old primary must release nothing to a client that was connected to it,
// and must say it is no longer primary.
func TestFailoverFrozenPrimaryStaysSilent(t *testing.T) {
	tr := newTestTrio(t, "synth")
	tr.startAll()
	tr.waitProtected("a", "b", 30*time.Second)
	old := dialConsole(t, tr.m["a"].n, "old")
	if r := old.do("SET before-freeze 1"); r != "OK" {
		t.Fatalf("SET: %q", r)
	}
	pid := tr.m["a"].n.Pid()
	if err := syscall.Kill(-pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(-pid, syscall.SIGCONT)
	// kill returns before every thread has stopped: on a loaded machine
	// the primary ran on for milliseconds, served the next request and
	// released its reply legitimately (its epoch was acknowledged), which
	// this test then took for a release after the freeze.
	waitThreadsStopped(t, pid, 5*time.Second)
	// Requests sent to the frozen primary wait in its socket buffer.
	fmt.Fprintf(old.c, "old:2 SET during-freeze 1\n")
	tr.serveWithin("b", 10*time.Second)
	tr.waitMember("b", 5*time.Second, "primary", func(s trioStatus) bool { return s.Role == "primary" })
	nc := dialConsole(t, tr.m["b"].n, "new")
	if r := nc.do("SET after-takeover 1"); r != "OK" {
		t.Fatalf("SET on the new primary: %q", r)
	}
	if err := syscall.Kill(-pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	// Whatever the old primary does now, no byte of guest output may
	// reach its client: EOF or silence only.
	old.c.SetReadDeadline(time.Now().Add(3 * time.Second))
	br := bufio.NewReader(old.c)
	for {
		l, err := br.ReadString('\n')
		if l != "" {
			t.Errorf("the resumed old primary released %q", l)
		}
		if err != nil {
			break
		}
	}
	st := tr.waitMember("a", 10*time.Second, "fenced", func(s trioStatus) bool {
		return s.Role == "secondary" && e2e.Cluster(s).Primary == "b"
	})
	t.Logf("old primary after SIGCONT: role %s state %s, cluster primary %s generation %d", st.Role, st.State, e2e.Cluster(st).Primary, e2e.Cluster(st).Generation)
	if r := nc.do("GET during-freeze"); r != "NOTFOUND" && r != "OK 1" {
		t.Errorf("GET during-freeze on the new primary: %q", r)
	}
	if r := nc.do("GET before-freeze"); r != "OK 1" {
		t.Errorf("acknowledged write lost across the freeze: %q", r)
	}
}

// TestFailoverSwitchover: `tandem switchover` hands the guest to the
// secondary with every acknowledged write, and the pair re-protects.
func TestFailoverSwitchover(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		tr := newTestTrio(t, kind)
		tr.startAll()
		tr.waitProtected("a", "b", 30*time.Second)
		lg, stop, done := tr.startLoad("a", "sw")
		waitAcks(t, lg, 20, 30*time.Second)
		r := runCLI(t, 30*time.Second, "switchover", "--api", tr.m["a"].API)
		if r.code != 0 {
			t.Fatalf("switchover exit %d: %s%s", r.code, r.stdout, r.stderr)
		}
		t.Logf("%s: %s", kind, strings.TrimSpace(r.stdout))
		close(stop)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("writer still running")
		}
		tr.serveWithin("b", 10*time.Second)
		checkAcked(t, tr.m["b"].n, lg)
		tr.waitProtected("b", "a", 30*time.Second)
	})
}

// dirSnapshot is every file under dir with its size and modification time.
func dirSnapshot(t *testing.T, dir string) map[string]string {
	snap := map[string]string{}
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			snap[p] = fmt.Sprintf("%d %v", fi.Size(), fi.ModTime().UnixNano())
		}
		return nil
	})
	return snap
}

// TestFailoverBadConfigRefused: a node whose --peers differ from its data
// dir's cluster, an --id not in --peers, and another cluster's data dir
// are refused at start with one clear line and exit code != 0, and the
// data dir is left as it was.
func TestFailoverBadConfigRefused(t *testing.T) {
	tr := newTestTrio(t, "synth")
	tr.startAll()
	tr.waitProtected("a", "b", 30*time.Second)
	tr.m["b"].n.kill()
	bdir := tr.m["b"].DataDir
	before := dirSnapshot(t, bdir)
	other := newTestTrio(t, "synth")

	withPeers := func(args []string, peers string) []string {
		out := append([]string(nil), args...)
		for i := range out {
			if out[i] == "--peers" {
				out[i+1] = peers
			}
		}
		return out
	}
	withID := func(args []string, id string) []string {
		out := append([]string(nil), args...)
		for i := range out {
			if out[i] == "--id" {
				out[i+1] = id
			}
		}
		return out
	}
	wrongW := strings.Replace(tr.Peers(), "w="+tr.m["w"].Raft, "w="+freeAddr(t), 1)
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"peers differ from the data dir's", withPeers(tr.args("b"), wrongW), "cluster"},
		{"id not in peers", withID(tr.args("b"), "zz"), "not in --peers"},
		{"another cluster's data dir", append(other.args("b"), "--data-dir", bdir), "cluster"},
	}
	for _, c := range cases {
		r := runCLI(t, 20*time.Second, c.args...)
		line := strings.TrimSpace(r.stderr)
		if i := strings.LastIndexByte(line, '\n'); i >= 0 {
			line = line[i+1:]
		}
		if r.code == 0 || !strings.Contains(line, c.want) {
			t.Errorf("%s: exit %d, last line %q; want exit != 0 and a line naming %q", c.name, r.code, line, c.want)
		}
		t.Logf("%s: exit %d: %s", c.name, r.code, line)
	}
	after := dirSnapshot(t, bdir)
	for p, v := range before {
		if strings.HasSuffix(p, "LOCK") {
			continue
		}
		if after[p] != v {
			t.Errorf("%s changed by a refused start (%s -> %s)", p, v, after[p])
		}
	}
	// The right command still works: the data dir was not damaged.
	tr.start("b")
	tr.waitProtected("a", "b", 30*time.Second)
}

// TestDrill runs `tandem drill --runs 5` on synth and checks its summary
// (`make drill` runs 100).
func TestDrill(t *testing.T) {
	const runs = 5
	r := runCLI(t, 4*time.Minute, "drill", "--runs", strconv.Itoa(runs), "--guest", "synth", "--json")
	var sum struct {
		Runs  int `json:"runs"`
		RTOMs struct {
			P50, P99, Max float64
		} `json:"rto_ms"`
		AckedWrites      int `json:"acked_writes"`
		AckedWritesLost  int `json:"acked_writes_lost"`
		DivergentReplies int `json:"divergent_replies"`
		FailedRuns       int `json:"failed_runs"`
		VerifiedEpochs   int `json:"verified_epochs"`
		DigestMismatches int `json:"digest_mismatches"`
		// Linearizable: true, false or "unknown" (the checker's time ran
		// out); each run's verdict as well.
		Linearizable json.RawMessage `json:"linearizable"`
		Results      []struct {
			Linearizable json.RawMessage `json:"linearizable"`
		} `json:"results"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &sum); err != nil {
		t.Fatalf("drill --json output: %v\nstdout:\n%s\nstderr:\n%s", err, r.stdout, r.stderr)
	}
	t.Logf("drill: %d runs, RTO p50 %.0f ms p99 %.0f ms max %.0f ms, %d acknowledged writes, %d epochs verified", sum.Runs, sum.RTOMs.P50, sum.RTOMs.P99, sum.RTOMs.Max, sum.AckedWrites, sum.VerifiedEpochs)
	if sum.Runs != runs || sum.FailedRuns != 0 || sum.AckedWritesLost != 0 || sum.DivergentReplies != 0 || sum.AckedWrites == 0 ||
		sum.DigestMismatches != 0 || sum.VerifiedEpochs == 0 {
		t.Errorf("drill summary %+v\nstderr:\n%s", sum, r.stderr)
	}
	if string(sum.Linearizable) != "true" || len(sum.Results) != runs {
		t.Errorf("drill histories linearizable %s over %d runs, want true over %d", sum.Linearizable, len(sum.Results), runs)
	}
	for i, res := range sum.Results {
		if string(res.Linearizable) != "true" {
			t.Errorf("run %d: linearizable %s", i+1, res.Linearizable)
		}
	}
	if r.code != 0 {
		t.Errorf("drill exit %d with a clean summary", r.code)
	}
}

// waitThreadsStopped waits until every thread of pid is stopped (state T
// in /proc), i.e. a SIGSTOP has taken effect.
func waitThreadsStopped(t *testing.T, pid int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		stopped := len(tasks) > 0
		for _, f := range tasks {
			b, err := os.ReadFile(f)
			if err != nil {
				continue // the thread is gone
			}
			// pid (comm) state ...: the state follows the last ')'.
			if i := strings.LastIndexByte(string(b), ')'); i < 0 || i+2 >= len(b) || (b[i+2] != 'T' && b[i+2] != 't') {
				stopped = false
				break
			}
		}
		if stopped {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d not stopped %v after SIGSTOP", pid, timeout)
		}
		time.Sleep(time.Millisecond)
	}
}
