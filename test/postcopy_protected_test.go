package test

import (
	"context"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/test/linkproxy"
)

// pcProtectedBandwidth caps the protected moves so that their post-copy
// lasts a few seconds: pcProtectedGuest's pages at this rate.
const pcProtectedBandwidth = "512Kbit"

// pcProtectedGuest is the protected moves' guest: kv on vCPU 0, and a
// second vCPU that keeps the top 256 KiB of memory filled with random
// pages (dirtying 20 a second), so that a switch owes about 64 pages of
// incompressible data besides the table's. A switch owes only the pages
// the host holds (holes are zero at both ends), and the kv guest alone
// holds a page or two: its post-copy was over in milliseconds.
func pcProtectedGuest(o primaryOpts) primaryOpts {
	o.memory = "64MiB"
	o.extra = append(o.extra, "--vcpus", "2", "--touch", "256KiB", "--dirty-rate", "20", "--fill", "random")
	return o
}

// apiStatus is a node's full status (with state_reason), or the error.
func apiStatus(n *node) (api.Status, error) {
	return nodeAPI(n.api).Status(context.Background(), false)
}

// waitAPI polls n's status until ok or timeout, and fails the test then.
func waitAPI(t *testing.T, n *node, timeout time.Duration, what string, ok func(api.Status) bool) api.Status {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, err := apiStatus(n)
		if err == nil && ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not %s within %v: state %q (%s), err %v", n.name, what, timeout, st.State, st.StateReason, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// protectedMove starts a pair (primary P protected by secondary S) of a
// small synth kv guest, writes to P until 20 writes are acknowledged,
// then starts `tandem migrate --postcopy --postcopy-after-rounds 0` of P
// to a receiver D with a low bandwidth cap. It returns once D runs the
// guest with pages missing, with a client on D whose one write was sent
// there (its reply, if any, arrives on held).
type protectedMove struct {
	pri, sec, dst *node
	log           *ackLog
	wait          func(time.Duration) (cliResult, error)
	held          *console
	heldReply     chan string // the reply to held's write ("" : none within its deadline)
}

func startProtectedMove(t *testing.T, kind string, heldWait time.Duration, refusals bool) *protectedMove {
	pri, sec, _ := startPair(t, kind, pcProtectedGuest(primaryOpts{}))
	dst := startReceiver(t)
	pm := &protectedMove{pri: pri, sec: sec, dst: dst, log: newAckLog()}
	c, err := dialConsoleErr(pri, "p")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.c.Close() })
	stop := make(chan struct{})
	writerDone := make(chan error, 1)
	go func() { writerDone <- kvWriter(c, pm.log, stop, 2*time.Second, rand.New(rand.NewPCG(16, 3))) }()
	waitAcksLog(t, pm.log, 20, 20*time.Second)
	if refusals {
		checkProtectedRefusals(t, pri)
		waitAcksLog(t, pm.log, 40, 20*time.Second) // still served after the refusals
	}
	pm.wait = startCLI("migrate", "--from", pri.api, "--to", dst.data, "--postcopy", "--postcopy-after-rounds", "0",
		"--max-bandwidth", pcProtectedBandwidth, "--compression", "none", "--json")
	waitAPI(t, dst, 30*time.Second, "running with pages missing", func(s api.Status) bool {
		return s.State == "running" && s.PostcopyActive && s.PostcopyRemainingPages > 0
	})
	// The writer on P stops once P paused for its final epoch: it never
	// gets a reply after that.
	close(stop)
	select {
	case <-writerDone:
	case <-time.After(10 * time.Second):
		t.Fatal("the writer on the source is still running")
	}
	held, err := dialConsoleErr(dst, "d")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { held.c.Close() })
	pm.held, pm.heldReply = held, make(chan string, 1)
	go func() {
		held.seq++
		r, _ := held.requestSeq(held.seq, "SET held-write x", heldWait)
		pm.heldReply <- r
	}()
	return pm
}

// checkProtectedRefusals: a protected guest is not migrated without
// --postcopy, with precopy rounds, or to a destination that does not
// hold its output (post-copy refused there); each refusal is one line,
// and the primary stays protected.
func checkProtectedRefusals(t *testing.T, pri *node) {
	t.Helper()
	noHold := startReceiver(t, "--postcopy=false")
	for _, c := range []struct {
		to   string
		args []string
		want string
	}{
		{noHold.data, nil, "migrate it with --postcopy"},
		{noHold.data, []string{"--postcopy", "--postcopy-after-rounds", "0"}, "does not hold the guest's output"},
	} {
		r := runCLI(t, 30*time.Second, append([]string{"migrate", "--from", pri.api, "--to", c.to}, c.args...)...)
		if r.code == 0 || !strings.Contains(r.stderr, c.want) || strings.Count(strings.TrimSpace(r.stderr), "\n") > 0 {
			t.Errorf("migrate %v of a protected guest: exit %d, stderr %q: want one line saying %q", c.args, r.code, r.stderr, c.want)
		}
	}
	if st := mustFT(t, pri, false); st.Protection != "protected" || st.State != "running" {
		t.Errorf("after the refused migrations: state %q, protection %q", st.State, st.Protection)
	}
}

// noReplyYet fails the test if the destination's client got a reply
// (within a short wait): D must hold all output during post-copy.
func (pm *protectedMove) noReplyYet(t *testing.T) {
	t.Helper()
	select {
	case r := <-pm.heldReply:
		t.Fatalf("the destination released output during post-copy of a protected guest: reply %q", r)
	case <-time.After(500 * time.Millisecond):
	}
	st, _ := apiStatus(pm.dst)
	if !st.PostcopyActive || !strings.Contains(st.StateReason, "output held") {
		t.Errorf("destination during post-copy: active %v, state_reason %q: want it to say the output is held", st.PostcopyActive, st.StateReason)
	}
	ss, _ := apiStatus(pm.sec)
	if !strings.Contains(ss.StateReason, "moving the guest") {
		t.Errorf("secondary during the move: state_reason %q: want it to say the primary moves the guest", ss.StateReason)
	}
	// The primary is alive (its move notice heard): activation refused.
	if r := runCLI(t, 20*time.Second, "activate", "--api", pm.sec.api); r.code == 0 {
		t.Fatalf("the secondary activated while its primary was moving the guest: %s", r.stdout)
	}
}

// A protected guest moved by post-copy; the source is killed (SIGKILL)
// while pages are still missing on the destination. The secondary is
// activated and falls back to the final epoch: every write the source
// acknowledged is there, and its status says it fell back; the
// destination released nothing at all and says so. The other case lets
// the move complete: the destination releases what it held and serves,
// the secondary is retired and refuses activation, even forced.
//
// synth always; kvm only with TANDEM_LONG=1 (make test's budget).
func TestMigratePostcopyProtected(t *testing.T) {
	t.Parallel()
	forEachKind(t, func(t *testing.T, kind string) {
		if kind == "kvm" && !longRun {
			t.Skip("kvm: TANDEM_LONG=1 only")
		}
		testProtectedMove(t, kind)
	})
}

func testProtectedMove(t *testing.T, kind string) {
	t.Run("source-killed", func(t *testing.T) {
		t.Parallel()
		pm := startProtectedMove(t, kind, 30*time.Second, false)
		pm.noReplyYet(t)
		pm.pri.kill()
		r, err := pm.wait(time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if r.code == 0 {
			t.Errorf("migrate exited 0 after its source was killed\n%s", r.stdout)
		}
		ar := runCLI(t, 30*time.Second, "activate", "--api", pm.sec.api)
		if ar.code != 0 {
			t.Fatalf("activate after the source's death: exit %d\n%s%s", ar.code, ar.stdout, ar.stderr)
		}
		ss := waitAPI(t, pm.sec, 10*time.Second, "running", func(s api.Status) bool { return s.State == "running" })
		if !strings.Contains(ss.StateReason, "fell back") || !strings.Contains(ss.StateReason, "discarded") {
			t.Errorf("secondary after activation: state_reason %q: want it to say it fell back and the destination's guest is discarded", ss.StateReason)
		}
		checkAcked(t, pm.sec, pm.log)
		// The destination released nothing: its client got no reply,
		// and reads nothing more.
		ds := waitAPI(t, pm.dst, 10*time.Second, "saying its source is unreachable", func(s api.Status) bool {
			return strings.Contains(s.StateReason, "unreachable")
		})
		select {
		case r := <-pm.heldReply:
			if r != "" {
				t.Errorf("the destination released a reply after its protected source died: %q", r)
			}
		case <-time.After(2 * time.Second):
		}
		// The operator discards the half guest: refused without force
		// (the source cannot be asked), then it never releases.
		if err := postJSON(pm.dst.api, "/migrate/abort", nil); err == nil || !strings.Contains(err.Error(), "force") {
			t.Errorf("discard without force while the source is unreachable: %v, want refused", err)
		}
		if err := postJSON(pm.dst.api, "/migrate/abort", map[string]bool{"force": true}); err != nil {
			t.Errorf("forced discard: %v", err)
		}
		dd, _ := apiStatus(pm.dst)
		if dd.State != "discarded" || !strings.Contains(dd.StateReason, "released no output") {
			t.Errorf("destination after the discard: state %q, state_reason %q", dd.State, dd.StateReason)
		}
		if err := postJSON(pm.dst.api, "/migrate/commit", map[string]bool{"force": true}); err == nil {
			t.Error("a discarded destination accepted a release")
		}
		// Nothing came after the discard either. The held write's
		// goroutine still reads its connection (its own deadline is
		// long): closing the connection ends that read, and a reply that
		// arrived first is what it hands over (reading the connection here
		// as well raced with it).
		pm.held.c.Close()
		select {
		case r := <-pm.heldReply:
			if r != "" {
				t.Errorf("the destination released %q", r)
			}
		case <-time.After(5 * time.Second):
		}
		pm.log.mu.Lock()
		t.Logf("%d writes acknowledged by the source, all on the activated secondary; secondary: %s; destination: %s",
			len(pm.log.acked), ss.StateReason, ds.StateReason)
		pm.log.mu.Unlock()
	})
	t.Run("secondary-killed", func(t *testing.T) {
		// The secondary dies during the move: it cannot be retired, so
		// the source reports unknown and the destination keeps holding,
		// until the operator, who knows the secondary is gone, forces
		// the release there.
		t.Parallel()
		pm := startProtectedMove(t, kind, 2*time.Minute, false)
		pm.noReplyYet(t)
		pm.sec.kill()
		r, err := pm.wait(2 * time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if r.code == 0 || !strings.Contains(r.stdout+r.stderr, "not retired") {
			t.Errorf("migrate with the secondary killed: exit %d, want a failure saying the secondary was not retired\n%s%s", r.code, r.stdout, r.stderr)
		}
		waitAPI(t, pm.dst, 10*time.Second, "holding with every page", func(s api.Status) bool {
			return !s.PostcopyActive && strings.Contains(s.StateReason, "output held")
		})
		select {
		case r := <-pm.heldReply:
			t.Fatalf("the destination released %q before the secondary was retired or the operator said so", r)
		case <-time.After(time.Second):
		}
		if err := postJSON(pm.dst.api, "/migrate/commit", nil); err == nil || !strings.Contains(err.Error(), "force") {
			t.Errorf("release without force: %v, want refused", err)
		}
		if err := postJSON(pm.dst.api, "/migrate/commit", map[string]bool{"force": true}); err != nil {
			t.Fatalf("forced release: %v", err)
		}
		select {
		case r := <-pm.heldReply:
			if r != "OK" {
				t.Errorf("held reply after the forced release: %q", r)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("no reply after the forced release")
		}
		checkAcked(t, pm.dst, pm.log)
	})
	t.Run("completed", func(t *testing.T) {
		t.Parallel()
		pm := startProtectedMove(t, kind, 2*time.Minute, kind == "synth")
		pm.noReplyYet(t)
		r, err := pm.wait(2 * time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		doneAt := time.Now()
		if r.code != 0 {
			t.Fatalf("migrate: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		select {
		case r := <-pm.heldReply:
			if r != "OK" {
				t.Errorf("the held write's reply: %q, want OK once the move completed", r)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the destination never released the held reply after the move completed")
		}
		t.Logf("held reply released %v after the command returned", time.Since(doneAt).Round(time.Millisecond))
		checkAcked(t, pm.dst, pm.log)
		// Retired: activation refused, even forced.
		for _, force := range [][]string{nil, {"--force"}} {
			ar := runCLI(t, 20*time.Second, append([]string{"activate", "--api", pm.sec.api}, force...)...)
			if ar.code == 0 || !strings.Contains(ar.stderr+ar.stdout, "moved") {
				t.Errorf("activate %v of the retired secondary: exit %d: %s%s", force, ar.code, ar.stdout, ar.stderr)
			}
		}
		ss, _ := apiStatus(pm.sec)
		ps, _ := apiStatus(pm.pri)
		if ss.Role != "secondary" || !strings.Contains(ss.StateReason, "retired") {
			t.Errorf("secondary after the move: role %q, state_reason %q: want a retired secondary", ss.Role, ss.StateReason)
		}
		if ps.State != "postmigrate" || ps.Epochs != nil || !ps.Paused {
			t.Errorf("source after the move: state %q, epoch loop %v, paused %v: want postmigrate, no loop, paused", ps.State, ps.Epochs != nil, ps.Paused)
		}
		c := dialConsole(t, pm.dst, "after")
		if got := c.do("SET after-move y"); got != "OK" {
			t.Errorf("destination SET after the move: %q", got)
		}
		t.Logf("secondary: %s; source: %s", ss.StateReason, ps.StateReason)
	})
}

// A protected guest's move fails before its commit (the destination's
// ready is cut on the way): the guest resumes on the primary under a new
// epoch loop, which joins the secondary again; the secondary forgets the
// move; the destination drops its copy. Writes acknowledged after the
// rollback are protected again: with the primary killed, the activated
// secondary has every acknowledged write, before and after.
func TestMigratePostcopyProtectedAborted(t *testing.T) {
	t.Parallel()
	pri, sec, _ := startPair(t, "synth", primaryOpts{memory: "64MiB"})
	dst := startReceiver(t)
	proxy := startProxy(t, dst.data, 0)
	proxy.CutOn(linkproxy.Down, []byte(`"ready":true`))
	log := newAckLog()
	c, err := dialConsoleErr(pri, "p")
	if err != nil {
		t.Fatal(err)
	}
	defer c.c.Close()
	stop := make(chan struct{})
	writerDone := make(chan error, 1)
	go func() { writerDone <- kvWriter(c, log, stop, 10*time.Second, rand.New(rand.NewPCG(16, 4))) }()
	waitAcksLog(t, log, 20, 20*time.Second)
	r := runCLI(t, time.Minute, "migrate", "--from", pri.api, "--to", proxy.Addr(), "--postcopy", "--postcopy-after-rounds", "0", "--json")
	if r.code == 0 || !strings.Contains(r.stdout+r.stderr, "aborted") {
		t.Fatalf("migrate with the ready cut: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	st := waitFT(t, pri, 20*time.Second, "protected again", func(s ftStatus) bool { return s.Protection == "protected" && s.State == "running" })
	log.mu.Lock()
	before := len(log.acked)
	log.mu.Unlock()
	waitAcksLog(t, log, before+20, 20*time.Second) // served and acknowledged again
	ss, _ := apiStatus(sec)
	if strings.Contains(ss.StateReason, "mov") || strings.Contains(ss.StateReason, "retired") {
		t.Errorf("secondary after the aborted move: state_reason %q: want the move forgotten", ss.StateReason)
	}
	waitAPI(t, dst, 15*time.Second, "waiting again", func(s api.Status) bool { return s.State == "waiting" })
	if !strings.Contains(sec.log(), "move aborted") || !strings.Contains(pri.log(), "moving a protected guest") {
		t.Errorf("the primary did not move from a final epoch, or the secondary did not hear the abort:\n%s\n%s", pri.log(), sec.log())
	}
	pri.kill()
	close(stop)
	<-writerDone
	activate(t, sec)
	checkAcked(t, sec, log)
	log.mu.Lock()
	t.Logf("protected again at epoch %d after the aborted move; %d writes acknowledged (%d before the rollback's check), all on the activated secondary", st.LastCommittedEpoch, len(log.acked), before)
	log.mu.Unlock()
}

// The protected move over mutual TLS: the move notice passes the
// secondary's --primary-name check like the epoch stream, and the
// destination asks the source's API, whose certificate must name the
// node that sent the migration, before it releases. The move completes,
// the held reply comes, the secondary is retired.
func TestTLSPostcopyProtected(t *testing.T) {
	t.Parallel()
	pki := newPKI(t, "a", "b", "dst", operator)
	pri, sec, _ := startPair(t, "synth", primaryOpts{memory: "64MiB", pki: pki})
	dst := startReceiverTLS(t, pki, "dst")
	c := dialConsole(t, pri, "p")
	if r := c.do("SET before-move yes"); r != "OK" {
		t.Fatal(r)
	}
	r, st := migrate(t, pri, dst.data, append([]string{"--postcopy", "--postcopy-after-rounds", "0"}, pki.nodeArgs(operator)...)...)
	if r.code != 0 || st.Status != "completed" || st.SwitchoverDigest != st.DestinationDigest {
		t.Fatalf("migrate over TLS: exit %d, status %q, digests %q vs %q\n%s", r.code, st.Status, st.SwitchoverDigest, st.DestinationDigest, r.stderr)
	}
	waitAPI(t, dst, 10*time.Second, "released", func(s api.Status) bool { return s.State == "running" && s.StateReason == "" })
	d := dialConsole(t, dst, "d")
	if r := d.do("GET before-move"); r != "OK yes" {
		t.Errorf("GET on the destination: %q", r)
	}
	ar := runCLI(t, 20*time.Second, append([]string{"activate", "--api", sec.api, "--force"}, pki.nodeArgs(operator)...)...)
	if ar.code == 0 || !strings.Contains(ar.stderr, "moved") {
		t.Errorf("activate --force of the retired secondary over TLS: exit %d: %s%s", ar.code, ar.stdout, ar.stderr)
	}
}

// A protected guest moved after one precopy round (the default): the
// epoch loop keeps protecting it during the round while it rewrites
// random pages, and the migration takes the pages dirtied meanwhile from
// the loop's syncs (it may not read the dirty log itself). The move
// completes with the destination's digest equal to the source's: a page
// the loop's syncs did not pass on would hold the round's stale copy.
//
// synth always; kvm only with TANDEM_LONG=1.
func TestMigratePostcopyProtectedAfterRound(t *testing.T) {
	t.Parallel()
	forEachKind(t, func(t *testing.T, kind string) {
		if kind == "kvm" && !longRun {
			t.Skip("kvm: TANDEM_LONG=1 only")
		}
		testProtectedAfterRound(t, kind)
	})
}

func testProtectedAfterRound(t *testing.T, kind string) {
	pri, sec, _ := startPair(t, kind, primaryOpts{memory: "64MiB", workload: "dirty", touch: "2MiB", dirtyRate: 500})
	dst := startReceiver(t)
	r, st := migrate(t, pri, dst.data, "--postcopy", "--max-bandwidth", "8Mbit", "--compression", "none")
	if r.code != 0 || st.Status != "completed" || st.SwitchoverDigest == "" || st.DestinationDigest != st.SwitchoverDigest {
		t.Fatalf("migrate after a round: exit %d, status %q, digests %q vs %q\n%s%s", r.code, st.Status, st.SwitchoverDigest, st.DestinationDigest, r.stdout, r.stderr)
	}
	// (A loaded host may leave nothing owed at the switch: the guest
	// dirtied nothing since the last round's take. The digests still
	// prove the tap passed every page on.)
	if st.DirtySyncCount == 0 || st.PostcopySwitchReason == "" {
		t.Errorf("%d dirty syncs, switch reason %q: want a round, then a switch", st.DirtySyncCount, st.PostcopySwitchReason)
	}
	waitAPI(t, dst, 10*time.Second, "released", func(s api.Status) bool { return s.State == "running" && s.StateReason == "" })
	if ar := runCLI(t, 20*time.Second, "activate", "--api", sec.api, "--force"); ar.code == 0 || !strings.Contains(ar.stderr, "moved") {
		t.Errorf("activate --force of the retired secondary: exit %d: %s%s", ar.code, ar.stdout, ar.stderr)
	}
	t.Logf("after %d round(s) (%d dirty syncs): %d pages owed at the switch, downtime %d ms, total %d ms, digests equal",
		st.Round, st.DirtySyncCount, st.PostcopyPages, st.DowntimeMs, st.TotalTimeMs)
}

// A protected guest that dirties nothing moved after its round: its
// switch owes no page, the destination takes the final epoch as a
// precopy completion (no post-copy run), and the source must complete
// too. It used to serve a run that never came, took the closed channels
// for a lost link, and stayed postcopy-paused.
func TestMigratePostcopyProtectedNothingOwed(t *testing.T) {
	t.Parallel()
	pri, _, _ := startPair(t, "synth", primaryOpts{memory: "64MiB", workload: "kv"})
	dst := startReceiver(t)
	r, st := migrate(t, pri, dst.data, "--postcopy", "--postcopy-after-rounds", "1", "--compression", "none")
	if r.code != 0 || st.Status != "completed" || st.SwitchoverDigest == "" || st.DestinationDigest != st.SwitchoverDigest {
		t.Fatalf("migrate an idle protected guest: exit %d, status %q, digests %q vs %q, %d pages owed\n%s%s",
			r.code, st.Status, st.SwitchoverDigest, st.DestinationDigest, st.PostcopyPages, r.stdout, r.stderr)
	}
	waitAPI(t, dst, 10*time.Second, "released", func(s api.Status) bool { return s.State == "running" && s.StateReason == "" })
	t.Logf("%d pages owed at the switch (%s), downtime %d ms", st.PostcopyPages, st.PostcopySwitchReason, st.DowntimeMs)
}
