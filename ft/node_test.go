package ft

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/replica"
)

// TestMigrateGuards: POST /migrate/cancel without a migration is refused
// (it once cancelled the epoch loop's context; the loop now belongs to
// the Member, out of the node's reach), and a protected guest or one
// already being migrated is refused before anything is dialled.
func TestMigrateGuards(t *testing.T) {
	g, err := synth.New(guest.Config{Memory: 1 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	n := &Node{log: slog.New(slog.NewTextHandler(io.Discard, nil)), g: g, state: "running"}

	post := func(h http.HandlerFunc, body string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h(rec, httptest.NewRequest("POST", "/", strings.NewReader(body)))
		return rec
	}
	if rec := post(n.handleMigrateCancel, ""); rec.Code != http.StatusConflict {
		t.Errorf("cancel without a migration: status %d, want 409", rec.Code)
	}

	n.migBusy = true
	if rec := post(n.handleMigrate, `{"to":"127.0.0.1:1"}`); rec.Code != http.StatusConflict || !strings.Contains(rec.Body.String(), "already running") {
		t.Errorf("second migration: %d %s", rec.Code, rec.Body)
	}
	n.migBusy = false

	n.sec = replica.NewSecondary(&replica.Receiver{}, nil)
	if rec := post(n.handleMigrate, `{"to":"127.0.0.1:1"}`); rec.Code != http.StatusConflict || !strings.Contains(rec.Body.String(), "protected") {
		t.Errorf("migrating a protected guest: %d %s", rec.Code, rec.Body)
	}
	if n.migBusy {
		t.Error("a refused request left the guest reserved")
	}
	// A cluster member stays refused even with post-copy: moving it is a
	// membership change to a third host.
	n.sec, n.cluster = nil, func() *api.ClusterView { return nil }
	if rec := post(n.handleMigrate, `{"to":"127.0.0.1:1","postcopy":true,"postcopy_after_rounds":0}`); rec.Code != http.StatusConflict || !strings.Contains(rec.Body.String(), "raft or etcd cluster") {
		t.Errorf("migrating a cluster member: %d %s", rec.Code, rec.Body)
	}
	if n.migBusy {
		t.Error("a refused request left the guest reserved")
	}
}

// TestQuitTwiceConcurrently: concurrent POST /quit requests close the
// quit channel once (a plain bool flag raced into a double close).
func TestQuitTwiceConcurrently(t *testing.T) {
	a, err := NewAPIServer("127.0.0.1:0", slog.New(slog.NewTextHandler(io.Discard, nil)), Trust{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.ln.Close()
	done := make(chan struct{})
	for i := 0; i < 8; i++ {
		go func() {
			defer func() { done <- struct{}{} }()
			rec := httptest.NewRecorder()
			a.mux.ServeHTTP(rec, httptest.NewRequest("POST", "/quit", nil))
		}()
	}
	for i := 0; i < 8; i++ {
		<-done
	}
	<-a.quit
}

// pauseBlockedGuest is a guest whose Pause waits until released.
type pauseBlockedGuest struct {
	guest.Guest
	entered chan struct{}
	release chan struct{}
}

func (g *pauseBlockedGuest) Pause(ctx context.Context) (time.Duration, error) {
	g.entered <- struct{}{}
	<-g.release
	return g.Guest.Pause(ctx)
}

// TestStatusDigestHoldsNoLock: a status digest pauses and scans the guest
// outside the node's lock, so another status answers meanwhile; whoever
// takes the guest away (detach, then close it) waits for the digest.
func TestStatusDigestHoldsNoLock(t *testing.T) {
	sg, err := synth.New(guest.Config{Memory: 1 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer sg.Close()
	if _, err := sg.Resume(); err != nil {
		t.Fatal(err)
	}
	g := &pauseBlockedGuest{Guest: sg, entered: make(chan struct{}, 1), release: make(chan struct{})}
	n := &Node{log: slog.New(slog.NewTextHandler(io.Discard, nil)), g: g, state: "running"}

	digested := make(chan nodeStatus, 1)
	go func() { digested <- n.status(true) }()
	select {
	case <-g.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the digest never paused the guest")
	}
	answered := make(chan nodeStatus, 1)
	go func() { answered <- n.status(false) }()
	select {
	case st := <-answered:
		if st.State != "running" {
			t.Errorf("status during a digest: state %q", st.State)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a plain status waited for another request's digest")
	}
	detached := make(chan struct{})
	go func() { n.detach(); close(detached) }()
	select {
	case <-detached:
		t.Fatal("detach returned while a digest was reading the guest")
	case <-time.After(100 * time.Millisecond):
	}
	close(g.release)
	select {
	case st := <-digested:
		if st.MemoryDigest == "" {
			t.Error("no memory digest")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the digest never ended")
	}
	select {
	case <-detached:
	case <-time.After(5 * time.Second):
		t.Fatal("detach never returned after the digest")
	}
	if sg.Paused() {
		t.Error("the digest left the guest paused")
	}
}

// TestStatusDigestsDoNotQueue: while one status digest pauses and scans
// the guest, another is answered at once without a digest, saying why,
// instead of queueing behind it (each would pause the guest again).
func TestStatusDigestsDoNotQueue(t *testing.T) {
	g, err := synth.New(guest.Config{Memory: 1 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	n := &Node{log: slog.New(slog.NewTextHandler(io.Discard, nil)), g: g, state: "running"}
	n.digesting = make(chan struct{}) // a digest in progress
	done := make(chan nodeStatus, 1)
	go func() { done <- n.status(true) }()
	select {
	case st := <-done:
		if st.MemoryDigest != "" || !strings.Contains(st.MemoryDigestError, "another digest") {
			t.Fatalf("digest %q, error %q; want none and a reason", st.MemoryDigest, st.MemoryDigestError)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a status digest queued behind the running one")
	}
	n.digesting = nil
	if st := n.status(true); st.MemoryDigest == "" || st.MemoryDigestError != "" {
		t.Fatalf("with no digest running: digest %q, error %q", st.MemoryDigest, st.MemoryDigestError)
	}
}

// TestMigrateResolveOnce: a forced resolution is taken once; a second
// one, or one after the migration was decided otherwise, is refused
// (409) instead of being answered "ok" and dropped.
func TestMigrateResolveOnce(t *testing.T) {
	n := &Node{log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	p := &pendingCommit{res: &replica.MigrationResult{}, decide: make(chan bool, 1)}
	n.pending = p
	post := func(commit bool) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		n.handleMigrateResolve(commit)(rec, httptest.NewRequest("POST", "/", strings.NewReader(`{"force":true}`)))
		return rec
	}
	if rec := post(false); rec.Code != http.StatusOK {
		t.Fatalf("first forced abort: %d %s", rec.Code, rec.Body)
	}
	if rec := post(true); rec.Code != http.StatusConflict || !strings.Contains(rec.Body.String(), "resolved meanwhile") {
		t.Fatalf("second resolution: %d %s, want 409", rec.Code, rec.Body)
	}
	if got := <-p.decide; got != false {
		t.Fatal("the first decision was not the one handed over")
	}
}
