package ft

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

// protectedTrio starts a secondary member b on a data port and a primary
// member a (booted, promoted at generation 1) that ships to it, and waits
// until a's loop is protected. The two talk over loopback with real
// epochs; only the coordinators are fakes.
func protectedTrio(t *testing.T) (a *Member, na *Node, fa *fakeCoord, b *Member, fb *fakeCoord) {
	t.Helper()
	fb = newFakeCoord("b")
	b, _ = startMember(t, "secondary", memberOpts{coord: fb, data: true})
	fa = newFakeCoord("a")
	fa.sec = failover.NodeInfo{ID: "b", DataAddr: b.cfg.Data.Addr().String()}
	a, na = promoted(t, fa, 1, nil)
	eventually(t, "protected", func() bool {
		loop := a.currentLoop()
		return loop != nil && loop.Status().Protected
	})
	return a, na, fa, b, fb
}

// Protection is recorded with the coordinator once the loop is
// protected; acknowledged epochs are reported to the primary's
// coordinator, and the secondary claims each committed epoch (not a live
// guest) with its own.
func TestMemberProtectionIsRecorded(t *testing.T) {
	a, _, fa, _, fb := protectedTrio(t)
	eventually(t, "protection recorded", func() bool { return equalRecords(fa.protectionRecords(), true) })
	eventually(t, "epochs reported", func() bool {
		fa.mu.Lock()
		defer fa.mu.Unlock()
		return fa.reported > 0
	})
	eventually(t, "secondary claims a committed epoch", func() bool {
		img, _, ok := fb.lastImage()
		return ok && !img.Live && img.Epoch > 0
	})
	if st := a.currentLoop().Status(); st.LastCommittedEpoch == 0 {
		t.Errorf("protected with no committed epoch: %+v", st)
	}
}

// postSwitchover asks m for a switchover through its HTTP handler.
func postSwitchover(m *Member) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	m.handleSwitchover(rec, httptest.NewRequest("POST", "/switchover", nil))
	return rec
}

// A switchover ships a final epoch with the guest paused, reports it,
// and only then asks the coordinator to hand over; the guest stays
// paused for the new primary.
func TestMemberSwitchover(t *testing.T) {
	a, na, fa, _, _ := protectedTrio(t)
	g := viewOf(na).g
	rec := postSwitchover(a)
	if rec.Code != http.StatusOK {
		t.Fatalf("switchover: %d %s", rec.Code, rec.Body)
	}
	var out struct {
		FinalEpoch uint64 `json:"final_epoch"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil || out.FinalEpoch == 0 {
		t.Fatalf("switchover answer %s: %v", rec.Body, err)
	}
	fa.mu.Lock()
	at, calls := fa.reportedAtSwitch, fa.switchovers
	fa.mu.Unlock()
	if calls != 1 || at != out.FinalEpoch {
		t.Errorf("coordinator asked %d times, with epoch %d reported; want once, after the final epoch %d", calls, at, out.FinalEpoch)
	}
	if !g.Paused() {
		t.Error("the guest runs on after the handover")
	}
	if st := a.currentLoop().Status(); st.LastCommittedEpoch != out.FinalEpoch {
		t.Errorf("final epoch %d, loop committed %d", out.FinalEpoch, st.LastCommittedEpoch)
	}
}

// A handover the coordinator fails resumes the paused guest here under
// a new loop whose epochs are numbered after the old one's, and the
// request says it failed. A switchover is refused on an unprotected
// primary and on a node that runs nothing.
func TestMemberFailedHandoverRestarts(t *testing.T) {
	a, na, fa, _, _ := protectedTrio(t)
	g := viewOf(na).g
	old := a.currentLoop()
	fa.switchover = func(context.Context) error { return errors.New("transfer refused") }
	rec := postSwitchover(a)
	if rec.Code != http.StatusConflict || !strings.Contains(rec.Body.String(), "transfer refused") {
		t.Fatalf("failed switchover answered %d %s", rec.Code, rec.Body)
	}
	shipped := old.Status().LastShippedEpoch
	loop := a.currentLoop()
	if loop == nil || loop == old {
		t.Fatal("no new loop after the failed handover")
	}
	if g.Paused() || viewOf(na).g != g {
		t.Fatalf("guest paused %v after the failed handover", g.Paused())
	}
	a.mu.Lock()
	first := a.lastEpoch
	a.mu.Unlock()
	if first < shipped {
		t.Errorf("new loop numbers after %d, below the %d already shipped", first, shipped)
	}
	eventually(t, "protected again", func() bool { return loop.Status().Protected })

	idle := NewMember(MemberConfig{Coordinator: newFakeCoord("c"), Log: quietLog()})
	defer idle.cancel()
	if rec := postSwitchover(idle); rec.Code != http.StatusConflict || !strings.Contains(rec.Body.String(), "not the primary") {
		t.Errorf("switchover of a non-primary: %d %s", rec.Code, rec.Body)
	}
}

// A secondary restarted on its data directory claims its stored image as
// the committed generation and epoch it holds, never as a live guest: the
// coordinator decides from that claim whether it may ever be resumed (a
// double failure must not promote an image older than released output).
func TestMemberSecondaryClaimsStoredImage(t *testing.T) {
	dir := t.TempDir()
	fb := newFakeCoord("b")
	nb := testNode(t, "secondary")
	newB := func(fc *fakeCoord) *Member {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return NewMember(MemberConfig{Node: nb, Coordinator: fc, Epochs: testEpochs(), DataDir: dir, Data: ln, Log: quietLog(),
			Receiver: &replica.Receiver{NewGuest: EmptyGuest, Build: version.Build(), Log: quietLog(), Timeout: 5 * time.Second}})
	}
	b := newB(fb)
	b.Start()
	fa := newFakeCoord("a")
	fa.sec = failover.NodeInfo{ID: "b", DataAddr: b.cfg.Data.Addr().String()}
	a, _ := promoted(t, fa, 1, nil)
	eventually(t, "protected", func() bool { return a.currentLoop().Status().Protected })
	eventually(t, "an epoch committed on b", func() bool {
		img, _, ok := fb.lastImage()
		return ok && img.Epoch > 0
	})
	b.Stop()

	fb2 := newFakeCoord("b")
	b2 := newB(fb2)
	t.Cleanup(b2.Stop)
	b2.Start()
	img, _, ok := fb2.lastImage()
	if !ok || img.Live || img.Generation != 1 || img.Epoch == 0 {
		t.Fatalf("restarted secondary claims %+v (%v); want a committed epoch of generation 1, not live", img, ok)
	}
	if v := viewOf(nb); v.role != "secondary" || v.sec == nil {
		t.Errorf("restarted: role %q", v.role)
	}
}
