package ft

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
)

func postMoved(t *testing.T, n *Node, q movedQuery) (int, movedAnswer) {
	t.Helper()
	b, _ := json.Marshal(q)
	rec := httptest.NewRecorder()
	n.handleMigrateMoved(rec, httptest.NewRequest(http.MethodPost, "/migrate/moved", bytes.NewReader(b)))
	var a movedAnswer
	json.Unmarshal(rec.Body.Bytes(), &a)
	return rec.Code, a
}

// A protected move's source says the secondary retired only once it has,
// and after that waits for the destination's word that it released the
// output before it goes on to report completed (rev2's finding 3: it
// reported completed at once, and a source stopped at the command's exit
// could leave the destination holding for good).
func TestPairMoveCompletesOnceTheDestinationReleased(t *testing.T) {
	n := &Node{log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	pm := &pairMove{n: n, id: "m1", released: make(chan struct{})}
	n.pairMove = pm
	if code, _ := postMoved(t, n, movedQuery{MigrationID: "other"}); code != http.StatusConflict {
		t.Errorf("a question about another migration: %d, want 409", code)
	}
	if code, a := postMoved(t, n, movedQuery{MigrationID: "m1", Released: true}); code != http.StatusOK || a.Retired {
		t.Errorf("before the secondary retired: %d %+v, want 200, not retired", code, a)
	}
	done := make(chan struct{})
	go func() { defer close(done); pm.retiredAwaitRelease() }()
	select {
	case <-done:
		t.Fatal("the source went on to complete before the destination said it released (a released claim made before the retirement counted)")
	case <-time.After(300 * time.Millisecond):
	}
	if code, a := postMoved(t, n, movedQuery{MigrationID: "m1"}); code != http.StatusOK || !a.Retired {
		t.Errorf("once retired: %d %+v, want retired", code, a)
	}
	select {
	case <-done:
		t.Fatal("the source went on to complete on a question, not the destination's release")
	case <-time.After(100 * time.Millisecond):
	}
	postMoved(t, n, movedQuery{MigrationID: "m1", Released: true})
	postMoved(t, n, movedQuery{MigrationID: "m1", Released: true}) // a repeat is harmless
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("the source still waits after the destination said it released")
	}
}

// A destination's hold says in its state_reason what its bounds dropped
// (rev2's finding 4: a hold lasting until an operator acts must not grow
// without limit, and the loss must be visible).
func TestHoldReasonCountsDroppedOutput(t *testing.T) {
	hold := &outputHold{id: "m1", why: "output held"}
	hold.gate = failover.NewOutputGate(1, nil, nil)
	if r := hold.reason(); r != "output held" {
		t.Fatalf("reason before any drop: %q", r)
	}
	chunk := make([]byte, 1<<20)
	for range 20 {
		hold.gate.Write(chunk)
	}
	if r := hold.reason(); !strings.Contains(r, "dropped over the hold's bounds") || !strings.Contains(r, " console bytes") {
		t.Fatalf("reason after 20 MiB of console output held: %q, want the drop counted", r)
	}
}

// No release while an operator's discard asks the source for its verdict
// (rev2: resolveHold's abort checked, then acted, and a release could
// slip in between): release refuses and leaves everything held.
func TestHoldReleaseWaitsForADiscardBeingDecided(t *testing.T) {
	var out []byte
	hold := &outputHold{id: "m1", why: "output held"}
	hold.gate = failover.NewOutputGate(1, func(p []byte) { out = append(out, p...) }, func() bool { return !hold.discarded.Load() })
	announced := 0
	hold.announce = func() { announced++ }
	hold.gate.Write([]byte("reply"))
	hold.discarding = true
	if hold.release() || len(out) != 0 || announced != 0 || hold.reason() == "" {
		t.Fatalf("a release during a discard's question: out %q, announced %d, reason %q", out, announced, hold.reason())
	}
	hold.discarding = false
	if !hold.release() || string(out) != "reply" || announced != 1 {
		t.Fatalf("the release after: out %q, announced %d (want the held reply, then one announcement)", out, announced)
	}
	hold.release()
	if announced != 1 {
		t.Fatalf("announced %d times, want once", announced)
	}
}

// A held destination asks the source's POST /migrate/moved first and
// releases on retired; a source that does not know the request (an older
// build) is asked its status; while its post-copy is active the reason
// says the move is not finished, not the raw status "device" (rev2's
// minor item).
func TestMoveVerdictAsksMovedThenStatus(t *testing.T) {
	var retired bool
	var st api.Status
	mux := http.NewServeMux()
	mux.HandleFunc("POST /migrate/moved", func(w http.ResponseWriter, r *http.Request) {
		if !retired {
			http.NotFound(w, r)
			return
		}
		WriteJSON(w, http.StatusOK, movedAnswer{Retired: true})
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) { WriteJSON(w, http.StatusOK, st) })
	srv := httptest.NewServer(mux)
	defer srv.Close()
	n := &Node{log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	src := api.NewClientHTTP(srv.URL, srv.Client())
	ctx := context.Background()
	st.MigrationID, st.Status, st.PostcopyActive = "m1", "device", true
	if done, why := n.moveVerdict(ctx, src, "m1"); done || strings.Contains(why, "device") || !strings.Contains(why, "not finished") {
		t.Errorf("during the post-copy: %v %q", done, why)
	}
	st.Status, st.PostcopyActive = "completed", false
	if done, _ := n.moveVerdict(ctx, src, "m1"); !done {
		t.Error("a source reporting completed: not released")
	}
	st.Status = "unknown"
	retired = true
	if done, _ := n.moveVerdict(ctx, src, "m1"); !done {
		t.Error("a source answering retired: not released")
	}
}
