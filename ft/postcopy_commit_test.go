package ft

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/tandemvm/tandem/precopy"
)

// From a post-copy's commit on, the source says its guest is the
// destination's (state postmigrate, the reason naming the migration and
// the resume), and POST /migrate/cancel is refused in one line instead
// of answering ok and doing nothing (the serving outlives the cancel).
func TestPostcopyCommitEndsSourceRunningAndCancel(t *testing.T) {
	m := new(precopy.Migration)
	cancelled := false
	n := &Node{log: quietLog(), state: "running", mig: m, migCancel: func() { cancelled = true }}
	n.committedPostcopy(new(precopy.Migration), "10.0.0.2:7001") // another migration: no change
	if n.state != "running" {
		t.Fatalf("another migration's commit changed the state to %s", n.state)
	}
	m.SetID("0123456789abcdef")
	n.committedPostcopy(m, "10.0.0.2:7001")
	if n.state != "postmigrate" || !strings.Contains(n.stateReason, "0123456789abcdef") || !strings.Contains(n.stateReason, "--resume") {
		t.Errorf("after the commit: state %s, reason %q", n.state, n.stateReason)
	}
	w := httptest.NewRecorder()
	n.handleMigrateCancel(w, httptest.NewRequest(http.MethodPost, "/migrate/cancel", nil))
	if w.Code != http.StatusConflict || !strings.Contains(w.Body.String(), "committed") || cancelled {
		t.Errorf("cancel after the commit: %d %s (cancelled %v), want a one-line refusal and nothing cancelled", w.Code, w.Body.String(), cancelled)
	}
}
