package replica

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/test/linkproxy"
)

// The two-phase switch-over (Hello.Commit): whichever message is lost,
// the guest never runs on both ends.

type twoPhaseRun struct {
	src    guest.Guest
	st     precopy.MigrationStatus
	runErr error
	res    MigrationResult
	recErr error
	// commits counts Migration.OnCommit's calls: one once the commit
	// is decided, none if the switch-over aborts before it.
	commits int
}

// migrateTwoPhase migrates a small kv guest through a link proxy on
// which cut (if set) is armed once the stream is under way.
func migrateTwoPhase(t *testing.T, cut func(p *linkproxy.Proxy)) twoPhaseRun {
	t.Helper()
	cfg := guest.Config{Memory: 32 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	src, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	if _, err := src.Resume(); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	proxy, err := linkproxy.Start("127.0.0.1:0", ln.Addr().String(), linkproxy.Shape{})
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	if cut != nil {
		cut(proxy)
	}
	type recv struct {
		res MigrationResult
		err error
	}
	got := make(chan recv, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			got <- recv{err: err}
			return
		}
		defer conn.Close()
		r := &Receiver{NewGuest: synthFactory, Build: "test"}
		res, err := r.ReceiveMigrationWith(context.Background(), conn, MigrationOptions{CommitTimeout: 3 * time.Second})
		got <- recv{res, err}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	link, err := Dial(ctx, proxy.Addr(), Hello{Purpose: PurposeMigrate, Kind: src.Kind(), Config: cfg, Build: "test", Commit: true},
		src.Regions(), DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer link.Close()
	p := precopy.DefaultPolicy()
	p.DowntimeLimit = 2 * time.Second
	m, err := precopy.NewMigration(precopy.NewCore(src, nil), link, p)
	if err != nil {
		t.Fatal(err)
	}
	m.ConfirmTimeout = 2 * time.Second
	out := twoPhaseRun{src: src}
	m.OnCommit = func() { out.commits++ }
	out.runErr = m.Run(ctx)
	out.st = m.Status()
	select {
	case rr := <-got:
		out.res, out.recErr = rr.res, rr.err
	case <-time.After(20 * time.Second):
		t.Fatal("receiver did not finish")
	}
	if out.res.Guest != nil {
		t.Cleanup(func() { out.res.Guest.Close() })
	}
	runners := 0
	if !src.Paused() {
		runners++
	}
	if out.res.Guest != nil && !out.res.Guest.Paused() {
		runners++
	}
	if runners > 1 {
		t.Fatalf("both ends run the guest: source status %+v; destination %+v, %v", out.st, out.res, out.recErr)
	}
	return out
}

func TestTwoPhaseCommitted(t *testing.T) {
	r := migrateTwoPhase(t, nil)
	if r.runErr != nil || r.st.Status != precopy.StatusCompleted || r.st.Outcome != precopy.OutcomeCommitted {
		t.Fatalf("source: %v, status %q outcome %q", r.runErr, r.st.Status, r.st.Outcome)
	}
	if r.recErr != nil || r.res.Guest == nil || r.res.Guest.Paused() || r.res.AwaitingCommit {
		t.Fatalf("destination: %v, %+v", r.recErr, r.res)
	}
	if !r.src.Paused() {
		t.Fatal("source runs after the commit")
	}
	if r.st.SwitchoverDigest != r.res.Digest {
		t.Errorf("digests differ: source %s destination %s", r.st.SwitchoverDigest, r.res.Digest)
	}
	if r.commits != 1 {
		t.Errorf("OnCommit ran %d times, want once", r.commits)
	}
	t.Logf("downtime %d ms, breakdown %+v", r.st.DowntimeMs, r.st.DowntimeBreakdown)
}

// The commit is lost: the source stays stopped and says the outcome is
// unknown; the destination holds the guest paused, awaiting the commit.
func TestTwoPhaseCommitLost(t *testing.T) {
	r := migrateTwoPhase(t, func(p *linkproxy.Proxy) { p.CutOn(linkproxy.Up, []byte(`"migrate":"commit"`)) })
	if !errors.Is(r.runErr, precopy.ErrCommitUnconfirmed) || r.st.Status != precopy.StatusUnknown || r.st.Outcome != precopy.OutcomeUnknown || !r.st.CommitSent {
		t.Fatalf("source: %v, status %q outcome %q commit_sent %v", r.runErr, r.st.Status, r.st.Outcome, r.st.CommitSent)
	}
	if !r.src.Paused() {
		t.Fatal("source resumed after sending its commit")
	}
	if r.commits != 1 {
		t.Errorf("OnCommit ran %d times for a commit decided (then lost), want once", r.commits)
	}
	if r.recErr != nil || !r.res.AwaitingCommit || r.res.Guest == nil || !r.res.Guest.Paused() {
		t.Fatalf("destination: %v, %+v", r.recErr, r.res)
	}
	t.Logf("destination: %s", r.res.Why)
}

// Ready is lost: the source resumes; the destination, which never got a
// commit, does not run.
func TestTwoPhaseReadyLost(t *testing.T) {
	r := migrateTwoPhase(t, func(p *linkproxy.Proxy) { p.CutOn(linkproxy.Down, []byte(`"ready":true`)) })
	if r.runErr == nil || r.st.Status != precopy.StatusFailed || r.st.Outcome != precopy.OutcomeAborted {
		t.Fatalf("source: %v, status %q outcome %q", r.runErr, r.st.Status, r.st.Outcome)
	}
	if r.src.Paused() {
		t.Fatal("source paused after an aborted switch-over")
	}
	if r.commits != 0 {
		t.Errorf("OnCommit ran %d times without a commit", r.commits)
	}
	if r.res.Guest != nil && !r.res.Guest.Paused() {
		t.Fatal("destination runs without a commit")
	}
	t.Logf("source: %v; destination: awaiting %v (%s), err %v", r.runErr, r.res.AwaitingCommit, r.res.Why, r.recErr)
}
