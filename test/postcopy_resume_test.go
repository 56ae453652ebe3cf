package test

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// The post-copy link cut for real: source and destination each in a
// network namespace of its own, with two links: one on a management
// bridge (the APIs and consoles, which the test reaches as the operator)
// and one on a migration bridge (the migration's data), so the cut of
// the destination's migration link (`ip link set down`) leaves both ends'
// status readable.

// migNet is a lab's second bridge, for the migration's data.
type migNet struct {
	l  *netLab
	ip map[string]string // node ID -> its address on the migration bridge
}

func newMigNet(t *testing.T, l *netLab) *migNet {
	t.Helper()
	m := &migNet{l: l, ip: map[string]string{}}
	// The management subnet's 10.A.B becomes 172.16+A%16.B: as unique.
	var a, b int
	for _, ip := range l.ip {
		fmt.Sscanf(ip, "10.%d.%d.", &a, &b)
	}
	subnet := fmt.Sprintf("172.%d.%d", 16+a%16, b)
	br := l.prefix + "mb"
	t.Cleanup(func() { exec.Command("ip", "link", "del", br).Run() })
	l.run("ip", "link", "add", br, "type", "bridge")
	l.run("ip", "link", "set", br, "up")
	i := 0
	for id := range l.ip {
		i++
		host, peer := m.dev(id), l.prefix+"q"+id
		m.ip[id] = fmt.Sprintf("%s.%d", subnet, i)
		l.run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
		l.run("ip", "link", "set", peer, "netns", l.ns(id))
		l.run("ip", "link", "set", host, "master", br)
		l.run("ip", "link", "set", host, "up")
		l.run("ip", "-n", l.ns(id), "addr", "add", m.ip[id]+"/24", "dev", peer)
		l.run("ip", "-n", l.ns(id), "link", "set", peer, "up")
	}
	return m
}

// dev is id's migration link, on the bridge's side.
func (m *migNet) dev(id string) string { return m.l.prefix + "m" + id }

// setLink cuts id's migration link (down) or restores it.
func (m *migNet) setLink(id string, up bool) {
	m.l.t.Helper()
	state := "down"
	if up {
		state = "up"
	}
	m.l.run("ip", "link", "set", m.dev(id), state)
}

// pcResumeStatus is what these tests read of a node's status.
type pcResumeStatus struct {
	Status                 string `json:"status"`
	State                  string `json:"state"`
	Paused                 bool   `json:"paused"`
	Outcome                string `json:"outcome"`
	MigrationID            string `json:"migration_id"`
	PostcopyActive         bool   `json:"postcopy_active"`
	PostcopyPages          uint64 `json:"postcopy_pages"`
	PostcopyRemainingPages uint64 `json:"postcopy_remaining_pages"`
	PostcopyLinkDownSince  string `json:"postcopy_link_down_since"`
	PostcopyLinkError      string `json:"postcopy_link_error"`
	PostcopyResumes        int    `json:"postcopy_resumes"`
	SwitchoverDigest       string `json:"switchover_digest"`
	DestinationDigest      string `json:"destination_digest"`
}

func waitPaused(t *testing.T, n *node, timeout time.Duration) pcResumeStatus {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var st pcResumeStatus
		err := getJSON(n.api, "/status", &st)
		if err == nil && st.Status == "postcopy-paused" {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not postcopy-paused after %v (last %+v, err %v)", n.name, timeout, st, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// oneLineRefusal checks a command that must fail (exit 1) with one line
// on stderr holding every one of want.
func oneLineRefusal(t *testing.T, what string, r cliResult, want ...string) {
	t.Helper()
	line := strings.TrimSpace(r.stderr)
	ok := r.code == 1 && !strings.Contains(line, "\n")
	for _, w := range want {
		ok = ok && strings.Contains(line, w)
	}
	if !ok {
		t.Errorf("%s: exit %d, stderr %q: want exit 1 and one line with %q", what, r.code, r.stderr, want)
	}
	t.Logf("%s: %s", what, line)
}

// A kv guest under a writing client migrates with --postcopy (no round
// first, a capped link) from one namespace to another; while pages still
// flow, the destination's migration link is cut with `ip link set down`.
// Both ends report the post-copy paused (since when, why, pages owed);
// the migrate command fails saying so. With the link back, a resume
// against another receiver is refused (it holds no such migration), and
// one with a made-up id as stale, both naming the ids; `tandem migrate
// --resume` then completes with equal digests, and every write the
// client saw acknowledged reads back on the destination.
func TestMigratePostcopyResume(t *testing.T) {
	t.Parallel()
	l := newNetLab(t, "s", "d")
	mn := newMigNet(t, l)
	pki := newPKI(t, "src", "dst", operator)
	op := pki.nodeArgs(operator)
	// inNS starts tandem in id's namespace with its API and console on
	// the management bridge and cert's TLS identity.
	inNS := func(id, name, cert, apiPort, conPort string, args ...string) *node {
		api, con := l.ip[id]+":"+apiPort, l.ip[id]+":"+conPort
		useTLS(pki.client(operator), api, con)
		args = append(append(args, "--api", api, "--console", con), pki.nodeArgs(cert)...)
		n := startProcIn(t, l.ns(id), name, args...)
		n.api, n.console = api, con
		if err := n.waitReady(20 * time.Second); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return n
	}
	src := inNS("s", "source", "src", "7321", "7331", "run", "--guest", "synth", "--memory", "64MiB", "--workload", "kv", "--vcpus", "2")
	dstData, otherData := mn.ip["d"]+":7311", mn.ip["d"]+":7312"
	dst := inNS("d", "receiver", "dst", "7321", "7331", "receive", "--listen", dstData)
	inNS("d", "other-receiver", "dst", "7322", "7332", "receive", "--listen", otherData)

	r := runCLI(t, time.Minute, append([]string{"migrate", "--resume", "--from", src.api}, op...)...)
	oneLineRefusal(t, "resume without a migration", r, "holds no migration", "--abandon")

	w := &pcWriter{c: dialConsole(t, src, "w")}
	for i := range 300 {
		if r := w.c.do(fmt.Sprintf("SET key%d v%d", i, i)); r != "OK" {
			t.Fatalf("SET key%d: %q", i, r)
		}
		w.acked = append(w.acked, i)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { w.run(stop, 300) })
	time.Sleep(200 * time.Millisecond)
	migrating := startCLI(append([]string{"migrate", "--from", src.api, "--to", dstData, "--postcopy", "--postcopy-after-rounds", "0",
		"--max-bandwidth", "64Mbit", "--compression", "none", "--json"}, op...)...)
	waitStatus(t, dst, 30*time.Second, "running with pages missing", func(s status) bool {
		return s.State == "running" && s.PostcopyActive && s.PostcopyRemainingPages > 0
	})
	// The writer stops by itself at its first unanswered request (the
	// source paused for the switch); it is joined after the cut.
	// Nothing to resume while the link is up.
	r = runCLI(t, time.Minute, append([]string{"migrate", "--resume", "--from", src.api}, op...)...)
	oneLineRefusal(t, "resume with the link up", r, "not paused")

	cutAt := time.Now()
	mn.setLink("d", false)
	ss, ds := waitPaused(t, src, 15*time.Second), waitPaused(t, dst, 15*time.Second)
	noticed := time.Since(cutAt)
	for _, c := range []struct {
		who string
		st  pcResumeStatus
	}{{"source", ss}, {"destination", ds}} {
		if c.st.PostcopyLinkDownSince == "" || c.st.PostcopyLinkError == "" || c.st.PostcopyRemainingPages == 0 || c.st.MigrationID == "" {
			t.Errorf("%s while paused: %+v: want since when, why, pages owed and the migration id", c.who, c.st)
		}
	}
	if !ss.Paused || !strings.Contains(ss.Outcome, "--resume") {
		t.Errorf("source while paused: guest paused %v, outcome %q: want its guest kept paused and the outcome naming --resume", ss.Paused, ss.Outcome)
	}
	id := ss.MigrationID
	first, err := migrating(time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if first.code == 0 || !strings.Contains(first.stderr, "--resume") {
		t.Errorf("migrate after the cut: exit %d, stderr %q: want a failure naming --resume", first.code, first.stderr)
	}
	close(stop)
	wg.Wait()
	mn.setLink("d", true)

	r = runCLI(t, time.Minute, append([]string{"migrate", "--resume", "--from", src.api, "--to", otherData}, op...)...)
	oneLineRefusal(t, "resume to another receiver", r, "holds post-copy migration none", id)
	r = runCLI(t, time.Minute, append([]string{"migrate", "--resume", "--from", src.api, "--id", "0123456789abcdef"}, op...)...)
	oneLineRefusal(t, "resume of a stale id", r, "stale migration", id, "0123456789abcdef")
	r = runCLI(t, time.Minute, "migrate", "--resume", "--from", src.api, "--postcopy")
	if r.code != 2 || strings.Contains(strings.TrimSpace(r.stderr), "\n") || !strings.Contains(r.stderr, "--postcopy") {
		t.Errorf("--resume --postcopy: exit %d, stderr %q: want exit 2 and one line naming the flag", r.code, r.stderr)
	}
	if st := waitPaused(t, src, time.Second); st.MigrationID != id {
		t.Errorf("source after the refusals: migration %q, want %q still paused", st.MigrationID, id)
	}

	r = runCLI(t, 2*time.Minute, append([]string{"migrate", "--resume", "--from", src.api, "--to", dstData, "--id", id, "--json"}, op...)...)
	var st pcResumeStatus
	if i := strings.Index(r.stdout, "\n{"); i >= 0 {
		json.Unmarshal([]byte(r.stdout[i+1:]), &st)
	}
	if r.code != 0 || st.Status != "completed" || st.SwitchoverDigest == "" || st.DestinationDigest != st.SwitchoverDigest || st.PostcopyResumes != 1 {
		t.Fatalf("migrate --resume: exit %d, status %q, digests %q / %q, %d resumes\nstdout:\n%s\nstderr:\n%s",
			r.code, st.Status, st.SwitchoverDigest, st.DestinationDigest, st.PostcopyResumes, r.stdout, r.stderr)
	}
	var dEnd pcResumeStatus
	if err := getJSON(dst.api, "/status", &dEnd); err != nil || dEnd.PostcopyActive || dEnd.Status == "postcopy-paused" || dEnd.PostcopyResumes != 1 {
		t.Errorf("destination after the resume: %+v (%v): want post-copy done after one resume", dEnd, err)
	}
	d := &pcWriter{c: dialConsole(t, dst, "w")}
	d.c.seq = w.c.seq + 1 // past a request the source never answered
	for _, i := range w.acked {
		if got := d.c.do(fmt.Sprintf("GET key%d", i)); got != fmt.Sprintf("OK v%d", i) {
			t.Fatalf("destination GET key%d = %q, want the acknowledged v%d", i, got, i)
		}
	}
	t.Logf("cut with %d of %d pages owed (destination's count); both ends paused %v after the cut; %d writes acknowledged; resumed and completed, digests equal",
		ds.PostcopyRemainingPages, ds.PostcopyPages, noticed.Round(time.Millisecond), len(w.acked))
}
