package test

import (
	"bufio"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/test/linkproxy"
)

// Attacks on the trust between the two nodes of a pair (and a trio's
// switchover), each of which worked against earlier builds: activating a
// secondary whose primary is alive, a secondary that never acknowledges,
// a switchover whose client goes away, and a new protection target that
// did not take effect while protected. Real processes on loopback; the
// machinery is harness_test.go's and ft_harness_test.go's.

// trustStatus is the part of a pair node's status these tests read
// beyond ftStatus.
type trustStatus struct {
	Role             string `json:"role"`
	State            string `json:"state"`
	StateReason      string `json:"state_reason"`
	Protection       string `json:"protection"`
	ProtectionReason string `json:"protection_reason"`
	Secondary        string `json:"secondary"`
	Joins            uint64 `json:"joins"`
	Paused           bool   `json:"paused"`
	PrimaryData      string `json:"primary_data"`
	Activated        bool   `json:"activated"`
}

func getTrust(api string) (trustStatus, error) {
	var st trustStatus
	return st, getJSON(api, "/status", &st)
}

func waitTrust(t testing.TB, n *node, timeout time.Duration, what string, ok func(trustStatus) bool) (trustStatus, time.Duration) {
	t.Helper()
	t0 := time.Now()
	for {
		st, err := getTrust(n.api)
		if err == nil && ok(st) {
			return st, time.Since(t0)
		}
		if time.Since(t0) > timeout {
			t.Fatalf("%s: not %s after %v (last %+v, err %v)", n.name, what, timeout, st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// `tandem activate` on a secondary whose primary streams to it is
// refused with one line naming the primary and when it was heard; the
// pair goes on as before.
func TestPairActivateRefusedWhilePrimaryAlive(t *testing.T) {
	pri, sec, _ := startPair(t, "synth", primaryOpts{})
	w := dialConsole(t, pri, "w")
	if r := w.do("SET k before"); r != "OK" {
		t.Fatalf("SET: %q", r)
	}
	r := runCLI(t, 20*time.Second, "activate", "--api", sec.api)
	msg := strings.TrimSpace(r.stderr)
	t.Logf("activate: exit %d: %s", r.code, msg)
	if r.code != 1 {
		t.Fatalf("activate while the primary is alive: exit %d, want 1\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, "refusing to activate") || !strings.Contains(msg, "ago") || !strings.Contains(msg, "127.0.0.1:") {
		t.Errorf("the refusal should be one line naming the primary and when it was heard: %q", msg)
	}
	if st, _ := getTrust(sec.api); st.Role != "secondary" || st.Activated {
		t.Errorf("secondary after the refusal: %+v", st)
	}
	if r := w.do("SET k after"); r != "OK" {
		t.Fatalf("the primary stopped serving after a refused activation: %q", r)
	}
	if st := mustFT(t, pri, false); st.Protection != "protected" {
		t.Errorf("the primary lost protection over a refused activation: %s (%s)", st.Protection, st.ProtectionReason)
	}
}

// `tandem activate --force` while the primary is alive: the old primary
// hears it over the data link and fences itself. Nothing it released
// contradicts the new primary: every write it acknowledged is on the new
// one, and after the fence it says nothing at all.
func TestPairForcedActivationFencesPrimary(t *testing.T) {
	t.Parallel()
	forEachKind(t, func(t *testing.T, kind string) {
		pri, sec, _ := startPair(t, kind, primaryOpts{})
		c, err := dialConsoleErr(pri, "old")
		if err != nil {
			t.Fatal(err)
		}
		defer c.c.Close()
		log := newAckLog()
		stop := make(chan struct{})
		writerDone := make(chan error, 1)
		go func() { writerDone <- kvWriter(c, log, stop, 3*time.Second, rand.New(rand.NewPCG(5, 6))) }()
		waitAcksLog(t, log, 20, 10*time.Second)

		r := runCLI(t, 20*time.Second, "activate", "--api", sec.api, "--force")
		activatedAt := time.Now()
		if r.code != 0 {
			t.Fatalf("activate --force: exit %d: %s%s", r.code, r.stdout, r.stderr)
		}
		st, took := waitTrust(t, pri, 5*time.Second, "fenced", func(s trustStatus) bool { return s.State == "fenced" })
		t.Logf("%s: old primary fenced %v after activate --force returned: protection %q, %s", kind, took.Round(time.Millisecond), st.Protection, st.StateReason)
		if st.Protection != "fenced" || !strings.Contains(st.ProtectionReason, "activated") || !st.Paused {
			t.Errorf("fenced status: protection %q reason %q paused %v", st.Protection, st.ProtectionReason, st.Paused)
		}
		close(stop)
		select {
		case err := <-writerDone:
			t.Logf("old primary's client ended: %v", err)
		case <-time.After(10 * time.Second):
			t.Fatal("the old primary's client is still running")
		}
		// The connection of a client of the fenced primary carries
		// nothing more: EOF or silence.
		c.c.SetReadDeadline(time.Now().Add(time.Second))
		if b, _ := io.ReadAll(c.r); len(b) > 0 {
			t.Errorf("the fenced primary released %q after the fence", b)
		}
		// A new client is turned away, and a request sent anyway is not
		// answered.
		if late, err := dialConsoleErr(pri, "late"); err == nil {
			reply, err := late.requestSeq(1, "SET conflict old", time.Second)
			late.c.Close()
			if err == nil {
				t.Errorf("the fenced primary answered a write: %q", reply)
			}
		}
		// The new primary holds every write the old one acknowledged,
		// and takes writes of its own.
		checkAcked(t, sec, log)
		nc := dialConsole(t, sec, "new")
		if r := nc.do("SET conflict new"); r != "OK" {
			t.Fatalf("SET on the new primary: %q", r)
		}
		if r := nc.do("GET conflict"); r != "OK new" {
			t.Errorf("GET conflict on the new primary: %q", r)
		}
		log.mu.Lock()
		t.Logf("%s: %d writes acknowledged by the old primary, all on the new one; fence %v after activation", kind, len(log.acked), time.Since(activatedAt).Round(time.Millisecond))
		log.mu.Unlock()
	})
}

func waitAcksLog(t *testing.T, lg *ackLog, n int, timeout time.Duration) {
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

// fakeSecondary accepts data connections, reads the handshake, answers
// OK as a replica would, then reads and discards forever without ever
// acknowledging.
func fakeSecondary(t *testing.T) (string, func() int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	accepted := 0
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			accepted++
			conns = append(conns, c)
			mu.Unlock()
			go func() {
				br := bufio.NewReader(c)
				if _, err := br.ReadString('\n'); err != nil {
					return
				}
				io.WriteString(c, `{"ok":true,"build":"fake"}`+"\n")
				io.Copy(io.Discard, br)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return ln.Addr().String(), func() int {
		mu.Lock()
		defer mu.Unlock()
		return accepted
	}
}

// A secondary that accepts and never acknowledges: the primary drops it
// after its ack deadline and retries, serving its console all along.
func TestPairSilentSecondaryRetried(t *testing.T) {
	t.Parallel()
	addr, accepted := fakeSecondary(t)
	pri := startPrimary(t, "primary", "synth", addr, primaryOpts{extra: []string{"--ack-timeout", "2s"}})
	c := dialConsole(t, pri, "c")
	t0 := time.Now()
	var worst time.Duration
	n := 0
	for time.Since(t0) < 9*time.Second {
		n++
		s := time.Now()
		c.seq++
		if r, err := c.requestSeq(c.seq, fmt.Sprintf("SET k%d v", n), 3*time.Second); err != nil || r != "OK" {
			t.Fatalf("request %d after %v: %q, %v (status %+v)", n, time.Since(t0).Round(time.Millisecond), r, err, mustFT(t, pri, false))
		}
		worst = max(worst, time.Since(s))
		time.Sleep(50 * time.Millisecond)
	}
	st := mustFT(t, pri, false)
	t.Logf("after %v: joins %d, fake accepted %d, %d kv requests answered, slowest %v; protection %s: %s",
		time.Since(t0).Round(time.Millisecond), st.Joins, accepted(), n, worst.Round(time.Millisecond), st.Protection, st.ProtectionReason)
	if st.Joins < 3 || accepted() < 3 {
		t.Errorf("joins %d (fake accepted %d) in 9s with a 2s ack deadline: the silent secondary was not retried", st.Joins, accepted())
	}
	if st.Protected || st.AckedEpochs != 0 {
		t.Errorf("protected by a secondary that never acknowledged: %+v", st)
	}
	if worst > time.Second {
		t.Errorf("a kv request waited %v while the secondary was silent", worst)
	}
}

// `tandem protect` with a new secondary while protected: the primary
// drops the old link at once and protects with the new one, whose image
// then holds every acknowledged write.
func TestPairProtectNewTarget(t *testing.T) {
	t.Parallel()
	pri, secA, _ := startPair(t, "synth", primaryOpts{})
	sb := newSecAddrs(t)
	secB := startSecondary(t, "secondary-b", sb)
	lg, stop, done := pairLoad(t, pri)
	waitAcksLog(t, lg, 20, 10*time.Second)
	t0 := time.Now()
	r := runCLI(t, 20*time.Second, "protect", "--api", pri.api, "--secondary", sb.data)
	if r.code != 0 {
		t.Fatalf("protect: exit %d: %s%s", r.code, r.stdout, r.stderr)
	}
	st, _ := waitTrust(t, pri, 30*time.Second, "protected by the new secondary", func(s trustStatus) bool {
		return s.Secondary == sb.data && s.Protection == "protected"
	})
	took := time.Since(t0)
	waitTrust(t, secA, 10*time.Second, "left by its primary", func(s trustStatus) bool { return s.PrimaryData == "" })
	t.Logf("protected by %s %v after tandem protect (joins %d)", st.Secondary, took.Round(time.Millisecond), st.Joins)
	lg.mu.Lock()
	more := len(lg.acked) + 20
	lg.mu.Unlock()
	waitAcksLog(t, lg, more, 10*time.Second)
	close(stop)
	if err := <-done; err != nil {
		t.Fatalf("client: %v", err)
	}
	pri.kill()
	activate(t, secB)
	checkAcked(t, secB, lg)
}

// pairLoad runs a kvWriter on n's console until stop.
func pairLoad(t *testing.T, n *node) (*ackLog, chan struct{}, chan error) {
	t.Helper()
	c, err := dialConsoleErr(n, "load")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.c.Close() })
	lg, stop, done := newAckLog(), make(chan struct{}), make(chan error, 1)
	go func() { done <- kvWriter(c, lg, stop, 5*time.Second, rand.New(rand.NewPCG(3, 4))) }()
	return lg, stop, done
}

// A switchover whose HTTP client sends the request and goes away 20 ms
// later: the handover finishes (or rolls back) on its own, and the guest
// runs on one node within the switchover's timeout; a second switchover
// still works. 40 ms of one-way latency on the data link makes the final
// epoch's acknowledgement take longer than the client stays.
func TestFailoverSwitchoverClientGone(t *testing.T) {
	lt := newLinkTrio(t, "synth", false)
	lt.startAll()
	tr := lt.testTrio
	tr.waitProtected("a", "b", 30*time.Second)
	lg, stop, done := tr.startLoad("a", "sw")
	waitAcks(t, lg, 20, 30*time.Second)
	lt.proxy["b"].SetShape(linkproxy.Shape{Latency: 40 * time.Millisecond})
	time.Sleep(200 * time.Millisecond)
	conn, err := net.DialTimeout("tcp", tr.m["a"].API, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "POST /switchover HTTP/1.1\r\nHost: %s\r\nContent-Length: 0\r\n\r\n", tr.m["a"].API)
	time.Sleep(20 * time.Millisecond)
	conn.Close()
	t0 := time.Now()
	close(stop)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("writer still running")
	}
	// Within the switchover's timeout (20 s) one node serves.
	var serving string
	for serving == "" {
		for _, id := range []string{"a", "b"} {
			st, err := trioStat(tr.m[id].API)
			if err == nil && st.Role == "primary" && st.State == "running" {
				if c, err := dialConsoleErr(tr.m[id].n, "probe"); err == nil {
					_, err := c.requestSeq(1, "GET probe", 500*time.Millisecond)
					c.c.Close()
					if err == nil {
						serving = id
					}
				}
			}
		}
		if serving == "" && time.Since(t0) > 20*time.Second {
			sa, _ := trioStat(tr.m["a"].API)
			sb, _ := trioStat(tr.m["b"].API)
			t.Fatalf("nobody serves 20s after a switchover whose client went away: a %+v, b %+v", sa, sb)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("after the abandoned switchover %s serves, %v after the client went away", serving, time.Since(t0).Round(time.Millisecond))
	for _, id := range []string{"a", "b"} {
		if st, err := trioStat(tr.m[id].API); err == nil && id != serving && st.Role == "primary" && st.State == "running" {
			t.Errorf("both %s and %s say they run the guest", id, serving)
		}
	}
	checkAcked(t, tr.m[serving].n, lg)
	other := map[string]string{"a": "b", "b": "a"}[serving]
	tr.waitProtected(serving, other, 30*time.Second)
	r := runCLI(t, 30*time.Second, "switchover", "--api", tr.m[serving].API)
	if r.code != 0 {
		t.Fatalf("a second switchover: exit %d: %s%s", r.code, r.stdout, r.stderr)
	}
	tr.serveWithin(other, 10*time.Second)
	t.Logf("second switchover: %s", strings.TrimSpace(r.stdout))
}

// The two-party limit, and its end: the data link is partitioned, the
// secondary (no longer hearing its primary) is activated without --force
// once the failure timeout has passed, and the cut-off primary goes on
// unprotected meanwhile (it cannot tell a dead secondary from this).
// When the link heals the old primary hears of the activation and fences
// itself.
func TestPairPartitionedPrimaryFencesOnHeal(t *testing.T) {
	t.Parallel()
	sa := newSecAddrs(t)
	sec := startSecondary(t, "secondary", sa)
	proxy := startProxy(t, sa.data, 0)
	pri := startPrimary(t, "primary", "synth", proxy.Addr(), primaryOpts{extra: []string{"--ack-timeout", "2s"}})
	waitFT(t, pri, 30*time.Second, "protected", func(s ftStatus) bool { return s.Protection == "protected" })
	c := dialConsole(t, pri, "old")
	if r := c.do("SET before 1"); r != "OK" {
		t.Fatalf("SET: %q", r)
	}
	proxy.Partition(true)
	partAt := time.Now()
	refusals := 0
	for {
		r := runCLI(t, 20*time.Second, "activate", "--api", sec.api)
		if r.code == 0 {
			break
		}
		if !strings.Contains(r.stderr, "refusing to activate") {
			t.Fatalf("activate during the partition: exit %d: %s", r.code, r.stderr)
		}
		refusals++
		if time.Since(partAt) > 15*time.Second {
			t.Fatalf("activation still refused %v into the partition: %s", time.Since(partAt), r.stderr)
		}
		time.Sleep(200 * time.Millisecond)
	}
	activatedAfter := time.Since(partAt)
	// The secondary counts its 2 s from the last epoch it received,
	// which came up to an epoch interval (25 ms) before the cut: seen
	// once at 1.9996 s after it. 100 ms of slack for that.
	if activatedAfter < 2*time.Second-100*time.Millisecond {
		t.Errorf("activated %v into the partition, before the 2s failure timeout", activatedAfter)
	}
	// The cut-off primary cannot know: once its ack deadline passes it
	// serves unprotected (the documented two-party limit).
	c.seq++
	r, err := c.requestSeq(c.seq, "SET during-partition old", 10*time.Second)
	t.Logf("activated %v into the partition after %d refusals; the cut-off primary answers %q, %v", activatedAfter.Round(time.Millisecond), refusals, r, err)
	proxy.Partition(false)
	healAt := time.Now()
	st, took := waitTrust(t, pri, 20*time.Second, "fenced after the heal", func(s trustStatus) bool { return s.State == "fenced" })
	t.Logf("old primary fenced %v after the heal (%v after healAt): %s", took.Round(time.Millisecond), time.Since(healAt).Round(time.Millisecond), st.ProtectionReason)
	c.seq++
	if r, err := c.requestSeq(c.seq, "SET after-fence old", 2*time.Second); err == nil {
		t.Errorf("the fenced primary answered %q", r)
	}
	nc := dialConsole(t, sec, "new")
	if r := nc.do("GET before"); r != "OK 1" {
		t.Errorf("GET before on the activated secondary: %q", r)
	}
}
