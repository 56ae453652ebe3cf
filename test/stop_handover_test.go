package test

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
)

// TestStopHandover: SIGTERM to a protected primary under load hands the
// guest to the secondary (a switchover) before the process exits, exit
// status 0 well within the harness's stop bound; the secondary serves
// every acknowledged write, and no failover by timeout was needed.
func TestStopHandover(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		tr := newTestTrio(t, kind)
		tr.startAll()
		st := tr.waitProtected("a", "b", 30*time.Second)
		gen := e2e.Cluster(st).Generation
		lg, stop, done := tr.startLoad("a", "term")
		waitAcks(t, lg, 20, 30*time.Second)
		a := tr.m["a"].n
		t0 := time.Now()
		if err := a.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-a.Exited():
		case <-time.After(e2e.KillWait):
			t.Fatalf("a still running %v after SIGTERM", e2e.KillWait)
		}
		took := time.Since(t0)
		close(stop)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("writer still running")
		}
		if ps := a.ProcessState(); ps == nil || ps.ExitCode() != 0 {
			t.Errorf("a's exit after SIGTERM: %v", ps)
		}
		if !strings.Contains(a.log(), "handed over before stopping") {
			t.Errorf("a's log does not say it handed over:\n%s", a.Tail(30))
		}
		tr.serveWithin("b", 10*time.Second)
		sb := tr.waitMember("b", 10*time.Second, "primary", func(s trioStatus) bool {
			return s.Role == "primary" && e2e.Cluster(s).Primary == "b"
		})
		t.Logf("%s: a exited %v after SIGTERM; b primary at generation %d (was %d); %d acknowledged writes",
			kind, took.Round(time.Millisecond), e2e.Cluster(sb).Generation, gen, len(lg.acked))
		checkAcked(t, tr.m["b"].n, lg)
	})
}
