package ft

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// protectedPair starts a pair without raft, in process: a secondary
// member with a PairCoordinator on a data port (its activated replica
// kept answering), and a primary member whose PairCoordinator makes it
// primary as soon as its guest is booted; it waits until protected.
func protectedPair(t *testing.T) (pri *Member, np *Node, sec *Member, ns *Node) {
	t.Helper()
	sec, ns = startMember(t, "secondary", memberOpts{coord: NewPairSecondary(""), data: true, keepAct: true})
	pc := NewPairPrimary(sec.cfg.Data.Addr().String(), "")
	pri, np = startMember(t, "primary", memberOpts{coord: pc, boot: &bootCounter{}, fresh: true})
	np.mu.Lock()
	np.pair = pc
	np.mu.Unlock()
	eventually(t, "pair protected", func() bool {
		loop := pri.currentLoop()
		return loop != nil && loop.Status().Protected
	})
	return pri, np, sec, ns
}

func postActivate(m *Member, body string) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	m.handleActivate(DefaultFailureTimeout)(rec, httptest.NewRequest("POST", "/activate", strings.NewReader(body)))
	return rec
}

// A pair secondary refuses to activate while its primary streams to it;
// forced, it runs the guest from its committed epoch, and the old
// primary, told "activated" by the replica that keeps answering, fences
// itself: status fenced with the reason, guest paused, nothing released.
func TestPairActivationFencesOldPrimary(t *testing.T) {
	pri, np, sec, ns := protectedPair(t)
	old := viewOf(np).g
	if rec := postActivate(sec, ""); rec.Code != http.StatusConflict || !strings.Contains(rec.Body.String(), "refusing to activate") {
		t.Fatalf("activate while the primary streams: %d %s", rec.Code, rec.Body)
	}
	if viewOf(ns).state != "standby" {
		t.Fatalf("a refused activation changed the secondary: %q", viewOf(ns).state)
	}
	rec := postActivate(sec, `{"force": true}`)
	if rec.Code != http.StatusOK {
		t.Fatalf("forced activation: %d %s", rec.Code, rec.Body)
	}
	var out struct {
		Role  string `json:"role"`
		Epoch uint64 `json:"activated_epoch"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil || out.Role != "primary" || out.Epoch == 0 {
		t.Fatalf("activation answer %s: %v", rec.Body, err)
	}
	if v := viewOf(ns); v.state != "running" || v.role != "primary" || v.g == nil || v.g.Paused() {
		t.Fatalf("activated secondary: state %q role %q", v.state, v.role)
	}
	eventually(t, "old primary fenced", func() bool { return viewOf(np).state == "fenced" })
	v := viewOf(np)
	if !strings.Contains(v.reason, "activated") || v.g != old || !old.Paused() {
		t.Errorf("old primary: reason %q, guest kept %v, paused %v", v.reason, v.g == old, old.Paused())
	}
	if fenced, _ := pri.currentLoop().Fenced(); !fenced {
		t.Error("the old primary's loop is not fenced")
	}
	if rec := postActivate(sec, `{"force": true}`); rec.Code != http.StatusConflict {
		t.Errorf("second activation: %d %s", rec.Code, rec.Body)
	}
	// POST /protect on the fenced primary is refused as not primary.
	prot := httptest.NewRecorder()
	np.handleProtect(prot, httptest.NewRequest("POST", "/protect", strings.NewReader(`{"secondary":"127.0.0.1:1"}`)))
	if prot.Code != http.StatusConflict || !strings.Contains(prot.Body.String(), "fenced") {
		t.Errorf("protect on the fenced primary: %d %s", prot.Code, prot.Body)
	}
}

// POST /protect points a pair primary at another secondary and keeps the
// certificate name given before when none is given.
func TestPairProtectKeepsName(t *testing.T) {
	pc := NewPairPrimary("", "node-b")
	pri, np := startMember(t, "primary", memberOpts{coord: pc, boot: &bootCounter{}, fresh: true})
	np.mu.Lock()
	np.pair = pc
	np.mu.Unlock()
	eventually(t, "running", func() bool { return viewOf(np).state == "running" })
	rec := httptest.NewRecorder()
	np.handleProtect(rec, httptest.NewRequest("POST", "/protect", strings.NewReader(`{"secondary":"127.0.0.1:1"}`)))
	if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), `"node-b"`) {
		t.Fatalf("protect: %d %s", rec.Code, rec.Body)
	}
	if info, ok := pc.Secondary(); !ok || info.DataAddr != "127.0.0.1:1" || pc.SecondaryName("127.0.0.1:1") != "node-b" {
		t.Errorf("coordinator after protect: %+v %v", info, ok)
	}
	eventually(t, "loop follows the new secondary", func() bool {
		return strings.Contains(pri.currentLoop().Status().Secondary, "127.0.0.1:1")
	})
}

// An activated pair secondary keeps answering on its data port (5b59b69):
// a primary that was cut off while it was activated, joining again, is
// refused ("activated") and fences itself, the pair's only fence.
func TestPairOldPrimaryFencesOnRejoin(t *testing.T) {
	pri, np, sec, ns := protectedPair(t)
	addr := sec.cfg.Data.Addr().String()
	protect := func(to string) {
		t.Helper()
		rec := httptest.NewRecorder()
		np.handleProtect(rec, httptest.NewRequest("POST", "/protect", strings.NewReader(`{"secondary":"`+to+`"}`)))
		if rec.Code != http.StatusOK {
			t.Fatalf("protect %q: %d %s", to, rec.Code, rec.Body)
		}
	}
	protect("") // the link is cut: the primary runs on, unprotected
	eventually(t, "primary gone from the secondary", func() bool {
		_, connected, _ := viewOf(ns).sec.PrimaryContact()
		return !connected
	})
	if rec := postActivate(sec, ""); rec.Code != http.StatusOK {
		t.Fatalf("activation of a secondary whose primary is gone: %d %s", rec.Code, rec.Body)
	}
	if viewOf(np).state != "running" {
		t.Fatalf("the cut-off primary stopped before rejoining: %q", viewOf(np).state)
	}
	protect(addr) // the link heals
	eventually(t, "old primary fenced on rejoin", func() bool { return viewOf(np).state == "fenced" })
	if v := viewOf(np); !strings.Contains(v.reason, "activated") || !v.g.Paused() {
		t.Errorf("old primary: reason %q, paused %v", v.reason, v.g.Paused())
	}
	if fenced, _ := pri.currentLoop().Fenced(); !fenced {
		t.Error("the old primary's loop is not fenced")
	}
}
