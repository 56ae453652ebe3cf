package test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
)

// End-to-end tests of `tandem console` (the binary) following the
// primary: two consoles run against a trio, one fed a request every few
// tens of milliseconds and one idle (a request only between events, none
// while they happen), through a kill -9 of the primary, a switchover and
// (on network-namespace hosts) a cut of the primary's link. Both must
// get replies after each event, exit 0 once their input ends, and every
// write they saw acknowledged must be there at the end, read back by a
// third console fed from a pipe.

// consoleProc is a running `tandem console` whose stdin the test writes
// and whose stdout lines it reads.
type consoleProc struct {
	t      *testing.T
	client string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string // stdout, line by line; closed at EOF
	done   chan error  // the process's end
	notes  *syncBuffer // stderr: what the client says it does
	out    *syncBuffer // stdout as it came
	seq    uint64
}

// syncBuffer is a bytes.Buffer written by one goroutine and read by
// others; each write is stamped with the time it came.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fmt.Fprintf(&s.b, "%s ", time.Now().Format("15:04:05.000"))
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startConsole runs `tandem console --connect addrs` with extra flags as
// kv client "client".
func startConsole(t *testing.T, client string, addrs []string, extra ...string) *consoleProc {
	t.Helper()
	args := append([]string{"console", "--connect", strings.Join(addrs, ",")}, extra...)
	cmd := exec.Command(tandemBin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	c := &consoleProc{t: t, client: client, cmd: cmd, stdin: stdin, lines: make(chan string, 1024), done: make(chan error, 1), notes: &syncBuffer{}, out: &syncBuffer{}}
	cmd.Stderr = c.notes
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(c.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.out.Write([]byte(sc.Text() + "\n"))
			c.lines <- sc.Text()
		}
	}()
	go func() { c.done <- cmd.Wait() }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		if t.Failed() {
			t.Logf("---- console %s stderr\n%s", client, c.notes.String())
			if client != "busy" {
				t.Logf("---- console %s stdout\n%s", client, c.out.String())
			}
		}
	})
	return c
}

// request sends the next request of the console's client and waits for
// its reply (another id's line, a repeat of an answered one, is skipped).
func (c *consoleProc) request(cmd string, timeout time.Duration) (string, error) {
	c.seq++
	id := fmt.Sprintf("%s:%d", c.client, c.seq)
	c.out.Write([]byte("> " + id + " " + cmd + "\n"))
	if _, err := fmt.Fprintf(c.stdin, "%s %s\n", id, cmd); err != nil {
		return "", err
	}
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-c.lines:
			if !ok {
				return "", fmt.Errorf("%s: the console exited: %v", id, c.exitErr())
			}
			if rest, found := strings.CutPrefix(l, id+" "); found {
				return rest, nil
			}
		case <-deadline:
			return "", fmt.Errorf("%s %s: no reply within %v", id, cmd, timeout)
		}
	}
}

func (c *consoleProc) exitErr() error {
	select {
	case err := <-c.done:
		c.done <- err
		return err
	case <-time.After(time.Second):
		return errors.New("still running")
	}
}

// finish ends the console's input and waits for it to exit, which must
// be with 0 within timeout.
func (c *consoleProc) finish(timeout time.Duration) {
	c.t.Helper()
	c.stdin.Close()
	select {
	case err := <-c.done:
		if err != nil {
			c.t.Errorf("console %s: %v (stderr: %s)", c.client, err, c.notes.String())
		}
	case <-time.After(timeout):
		c.t.Errorf("console %s still running %v after its input ended", c.client, timeout)
	}
}

// busyConsole feeds its console a SET every 20 ms, each waited for.
type busyConsole struct {
	c     *consoleProc
	mu    sync.Mutex
	acked map[string]string
	at    []time.Time // when each reply came
	err   error
	dump  func()
	stop  chan struct{}
	done  chan struct{}
}

func runBusy(c *consoleProc) *busyConsole {
	b := &busyConsole{c: c, acked: map[string]string{}, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(b.done)
		for i := 1; ; i++ {
			select {
			case <-b.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			k, v := fmt.Sprintf("busy%d", i), fmt.Sprintf("v%d", i)
			r, err := c.request("SET "+k+" "+v, 60*time.Second)
			b.mu.Lock()
			if err == nil && r != "OK" {
				err = fmt.Errorf("SET %s: %q", k, r)
			}
			if err != nil {
				b.err = err
				b.mu.Unlock()
				return
			}
			b.acked[k] = v
			b.at = append(b.at, time.Now())
			b.mu.Unlock()
		}
	}()
	return b
}

// replies is how many requests were answered so far.
func (b *busyConsole) replies() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		b.c.t.Fatalf("busy console: %v", b.err)
	}
	return len(b.at)
}

// waitMore waits until n more replies than now have come in.
func (b *busyConsole) waitMore(n int, timeout time.Duration, what string) {
	b.c.t.Helper()
	want := b.replies() + n
	deadline := time.Now().Add(timeout)
	for b.replies() < want {
		if time.Now().After(deadline) {
			if b.dump != nil {
				b.dump()
			}
			b.c.t.Fatalf("busy console: %d replies within %v of %s, want %d more", b.replies()-want+n, timeout, what, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// gapSince is the longest wait between two replies after t0.
func (b *busyConsole) gapSince(t0 time.Time) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	var gap time.Duration
	prev := t0
	for _, at := range b.at {
		if at.Before(t0) {
			continue
		}
		gap = max(gap, at.Sub(prev))
		prev = at
	}
	return gap
}

// consoleFollow runs the scenario on tr (a protected, b its secondary):
// consoleArgs are the consoles' TLS flags; cut, if set, cuts a node's
// link (down) and heals it.
func consoleFollow(t *testing.T, tr *testTrio, consoleArgs []string, cut func(id string, down bool)) {
	addrs := []string{tr.m["a"].Console, tr.m["b"].Console}
	busy := runBusy(startConsole(t, "busy", addrs, consoleArgs...))
	idle := startConsole(t, "idle", addrs, consoleArgs...)
	idleAcked := map[string]string{}
	idleSet := func(when string) {
		t.Helper()
		k := fmt.Sprintf("idle%d", idle.seq+1)
		t0 := time.Now()
		r, err := idle.request("SET "+k+" "+when, 60*time.Second)
		if err != nil || r != "OK" {
			t.Fatalf("idle console %s: %q %v", when, r, err)
		}
		idleAcked[k] = when
		t.Logf("idle console %s: answered in %v", when, time.Since(t0).Round(time.Millisecond))
	}
	busy.waitMore(20, 20*time.Second, "the start")
	idleSet("before-kill")

	// 1. kill -9 the primary, the idle console quiet meanwhile. Only a
	// protected one: on a loaded host a's raft lease can lapse, and a
	// primary that came back unprotected is not failed over when it dies
	// (a double failure, not this test's case). Checked just before.
	tr.waitProtected("a", "b", 20*time.Second)
	t0 := time.Now()
	tr.m["a"].n.kill()
	busy.dump = func() {
		t.Logf("busy console stdout:\n%s", busy.c.out.String())
		for _, id := range []string{"a", "b", "w"} {
			r := runCLI(t, 10*time.Second, append([]string{"status", "--api", tr.m[id].API}, consoleArgs...)...)
			t.Logf("status of %s:\n%s%s", id, r.stdout, r.stderr)
		}
	}
	busy.waitMore(20, 30*time.Second, "the kill")
	time.Sleep(2 * time.Second)
	idleSet("after-kill")
	t.Logf("kill -9 of a: the busy console's longest wait for a reply %v", busy.gapSince(t0).Round(time.Millisecond))
	tr.start("a")
	tr.waitProtected("b", "a", 45*time.Second)
	idleSet("before-switchover")

	// 2. A switchover back to a.
	t0 = time.Now()
	r := runCLI(t, 30*time.Second, append([]string{"switchover", "--api", tr.m["b"].API}, consoleArgs...)...)
	if r.code != 0 {
		t.Fatalf("switchover: %d %s %s", r.code, r.stdout, r.stderr)
	}
	busy.waitMore(20, 30*time.Second, "the switchover")
	time.Sleep(2 * time.Second)
	idleSet("after-switchover")
	t.Logf("switchover to a: the busy console's longest wait for a reply %v", busy.gapSince(t0).Round(time.Millisecond))
	tr.waitProtected("a", "b", 45*time.Second)

	// 3. Cut the primary's link: b takes over; the consoles' connections
	// to a go silent (no reset crosses a cut).
	if cut != nil {
		idleSet("before-cut")
		t0 = time.Now()
		cut("a", true)
		tr.waitMember("b", 30*time.Second, "primary after the cut", func(s trioStatus) bool {
			return s.Role == "primary" && s.State == "running" && e2e.Cluster(s).Primary == "b"
		})
		busy.waitMore(20, 60*time.Second, "the cut")
		time.Sleep(2 * time.Second)
		idleSet("after-cut")
		t.Logf("cut of a's link: the busy console's longest wait for a reply %v", busy.gapSince(t0).Round(time.Millisecond))
		cut("a", false)
		tr.waitProtected("b", "a", 60*time.Second)
		busy.waitMore(10, 30*time.Second, "the heal")
	}

	close(busy.stop)
	<-busy.done
	busy.replies() // fails on a busy console error
	busy.c.finish(30 * time.Second)
	idle.finish(30 * time.Second)

	// Every acknowledged write, read back by a console fed from a pipe
	// (it must wait for the replies before it exits).
	want := map[string]string{}
	for k, v := range busy.acked {
		want[k] = v
	}
	for k, v := range idleAcked {
		want[k] = v
	}
	var in strings.Builder
	var keys []string
	for k := range want {
		keys = append(keys, k)
		fmt.Fprintf(&in, "verify:%d GET %s\n", len(keys), k)
	}
	cmd := exec.Command(tandemBin, append([]string{"console", "--connect", strings.Join(addrs, ",")}, consoleArgs...)...)
	cmd.Stdin = strings.NewReader(in.String())
	var out, notes bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &notes
	if err := cmd.Run(); err != nil {
		t.Fatalf("piped console: %v (%s)", err, notes.String())
	}
	got := map[string]string{}
	for _, l := range strings.Split(out.String(), "\n") {
		id, rest, ok := strings.Cut(l, " ")
		if ok {
			got[id] = rest
		}
	}
	lost := 0
	for i, k := range keys {
		if r := got[fmt.Sprintf("verify:%d", i+1)]; r != "OK "+want[k] {
			lost++
			if lost <= 10 {
				t.Errorf("acknowledged %s=%s reads back %q", k, want[k], r)
			}
		}
	}
	t.Logf("%d acknowledged writes (%d busy, %d idle) read back, %d missing; console notes:\n%s", len(keys), len(busy.acked), len(idleAcked), lost, busy.c.notes.String())
}

// TestConsoleFollowsPrimary: on a loopback trio, kill -9 of the primary
// and a switchover.
func TestConsoleFollowsPrimary(t *testing.T) {
	tr := newTestTrio(t, "synth")
	tr.startAll()
	tr.waitProtected("a", "b", 30*time.Second)
	consoleFollow(t, tr, nil, nil)
}

// TestConsoleFollowsPrimaryNetns: on three network-namespace hosts over
// TLS, kill -9, a switchover and a cut of the primary's link.
func TestConsoleFollowsPrimaryNetns(t *testing.T) {
	l := newNetLab(t, "a", "b", "w")
	pki := newPKI(t, "a", "b", "w", operator)
	tr := newNetnsTrio(t, "synth", l, pki)
	tr.startAll()
	tr.waitProtected("a", "b", 45*time.Second)
	consoleFollow(t, tr, e2e.CertArgs(pki.dir, operator), func(id string, down bool) { l.setLink(id, !down) })
}
