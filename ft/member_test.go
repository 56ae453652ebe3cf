package ft

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/clock"
)

// A fresh cluster's configured primary boots its guest, claims it (a
// live image) and runs nothing until the coordinator makes it primary;
// then it resumes that guest under the coordinator's generation and
// numbers its epochs after the coordinator's last committed one.
func TestMemberBootsThenPromotes(t *testing.T) {
	fc := newFakeCoord("a")
	boots := &bootCounter{}
	m, n := startMember(t, "primary", memberOpts{coord: fc, boot: boots, fresh: true})
	if boots.count() != 1 {
		t.Fatalf("%d boots, want 1", boots.count())
	}
	img, _, ok := fc.lastImage()
	if !ok || !img.Live {
		t.Fatalf("claim after boot: %+v (%v), want a live image", img, ok)
	}
	g, _ := m.kept()
	if g == nil || !g.Paused() || viewOf(n).g != nil {
		t.Fatalf("before promotion the booted guest must be kept, paused and not the node's: kept %v", g)
	}
	fc.events <- failover.Event{Kind: failover.EventBecamePrimary, Generation: 3, Epoch: 7}
	eventually(t, "running after promotion", func() bool { return viewOf(n).state == "running" })
	v := viewOf(n)
	if v.g != g || g.Paused() || v.role != "primary" || v.loop == nil {
		t.Fatalf("after promotion: guest %v (booted %v) paused %v role %q loop %v", v.g, g, g.Paused(), v.role, v.loop)
	}
	if m.gen.Load() != 3 {
		t.Errorf("releases under generation %d, want 3", m.gen.Load())
	}
	m.mu.Lock()
	first := m.lastEpoch
	m.mu.Unlock()
	if first != 7 {
		t.Errorf("epochs numbered after %d, want after the committed 7", first)
	}
	// A promotion of a node that already runs the guest (a new term)
	// changes the generation and nothing else.
	fc.events <- failover.Event{Kind: failover.EventBecamePrimary, Generation: 4}
	eventually(t, "generation 4", func() bool { return m.gen.Load() == 4 })
	if viewOf(n).loop != v.loop {
		t.Error("a second promotion replaced the running loop")
	}
}

// Only a first start boots: a restarted node (its data directory exists)
// or one that finds the cluster already running (generation above 0)
// waits as secondary, even with a guest configured. A restarted node's
// view can lag the leader's, and a guest booted then is a second, empty
// one (c4abe96).
func TestMemberBootsOnlyOnFirstStart(t *testing.T) {
	for _, c := range []struct {
		name  string
		fresh bool
		st    failover.FSMState
	}{
		{"restarted", false, failover.FSMState{}},
		{"cluster running", true, failover.FSMState{Generation: 2, Primary: "b"}},
		{"restarted, named primary", false, failover.FSMState{Generation: 2, Primary: "a"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			fc := newFakeCoord("a")
			fc.setState(c.st)
			boots := &bootCounter{}
			_, n := startMember(t, "primary", memberOpts{coord: fc, boot: boots, fresh: c.fresh})
			if boots.count() != 0 {
				t.Fatalf("booted %d guests", boots.count())
			}
			if v := viewOf(n); v.role != "secondary" || v.state != "standby" || v.sec == nil {
				t.Fatalf("role %q state %q secondary %v, want a standby secondary", v.role, v.state, v.sec)
			}
			if img, _, ok := fc.lastImage(); ok && img.Live {
				t.Errorf("claimed a live image %+v without a guest", img)
			}
		})
	}
}

// A booted guest that never ran yields once the coordinator names
// another node primary in a newer generation: it is closed, the claim
// withdrawn, and the node serves that primary as its secondary.
func TestMemberBootedGuestYieldsToExistingPrimary(t *testing.T) {
	clk := clock.NewFake(time.Time{})
	fc := newFakeCoord("a")
	boots := &bootCounter{}
	m, n := startMember(t, "primary", memberOpts{coord: fc, boot: boots, fresh: true, clock: clk})
	g, _ := m.kept()
	clk.Advance(watchBootInterval)
	if g2, _ := m.kept(); g2 != g || g.Regions() == nil {
		t.Fatal("the booted guest was dropped with no other primary")
	}
	fc.setState(failover.FSMState{Generation: 1, Primary: "b"})
	eventually(t, "secondary of b", func() bool {
		clk.Advance(watchBootInterval)
		return viewOf(n).role == "secondary"
	})
	if k, _ := m.kept(); k != nil || g.Regions() != nil {
		t.Errorf("kept %v; booted guest closed %v", k, g.Regions() == nil)
	}
	if _, cleared, _ := fc.lastImage(); cleared == 0 {
		t.Error("the claim on the dropped guest was never withdrawn")
	}
}

// promoted starts a member that boots (the coordinator's record empty)
// and is made primary at gen.
func promoted(t *testing.T, fc *fakeCoord, gen uint64, clk clock.Clock) (*Member, *Node) {
	t.Helper()
	m, n := startMember(t, "primary", memberOpts{coord: fc, boot: &bootCounter{}, fresh: true, clock: clk})
	fc.events <- failover.Event{Kind: failover.EventBecamePrimary, Generation: gen}
	eventually(t, "running", func() bool { return viewOf(n).state == "running" })
	return m, n
}

// A fenced primary stops at once and keeps its guest, paused, while no
// other node is primary in a newer generation (it may hold the newest
// copy: b3f1cc9, 8bdd7a9); it claims that live guest, loads no stored
// image, and resumes the same guest when made primary again.
func TestMemberFencedPrimaryKeepsGuest(t *testing.T) {
	fc := newFakeCoord("a")
	m, n := promoted(t, fc, 1, nil)
	fc.setState(failover.FSMState{Generation: 1, Primary: "a"})
	g := viewOf(n).g
	fc.events <- failover.Event{Kind: failover.EventFenced, Generation: 1, Reason: "lease lost"}
	eventually(t, "fenced", func() bool { return viewOf(n).state == "fenced" })
	v := viewOf(n)
	if v.reason != "lease lost" || v.g != nil || v.loop != nil || v.sec != nil {
		t.Fatalf("fenced node: reason %q guest %v loop %v secondary %v", v.reason, v.g, v.loop, v.sec)
	}
	eventually(t, "guest kept", func() bool { k, _ := m.kept(); return k == g })
	if !g.Paused() || g.Regions() == nil {
		t.Fatalf("kept guest paused %v, open %v", g.Paused(), g.Regions() != nil)
	}
	if _, gen := m.kept(); gen != 1 {
		t.Errorf("kept guest's generation %d, want 1", gen)
	}
	if img, _, _ := fc.lastImage(); !img.Live || img.Generation != 1 {
		t.Errorf("claim after the fence: %+v, want the live guest of generation 1", img)
	}
	m.mu.Lock()
	sec := m.sec
	m.mu.Unlock()
	if sec != nil {
		t.Error("a fenced primary keeping its guest opened a secondary")
	}
	fc.events <- failover.Event{Kind: failover.EventBecamePrimary, Generation: 2}
	eventually(t, "running again", func() bool { return viewOf(n).state == "running" })
	if v := viewOf(n); v.g != g || g.Paused() {
		t.Fatalf("primary again with guest %v (kept %v), paused %v", v.g, g, g.Paused())
	}
	if k, _ := m.kept(); k != nil {
		t.Error("still keeps the guest it runs")
	}
}

// Once another node is primary in a newer generation the kept guest is
// history: dropped (closed, claim withdrawn), and the node becomes that
// primary's secondary, whether the newer primary is known at the fence
// or only later.
func TestMemberFencedPrimaryYieldsToNewerPrimary(t *testing.T) {
	for _, known := range []bool{true, false} {
		name := map[bool]string{true: "known at the fence", false: "known later"}[known]
		t.Run(name, func(t *testing.T) {
			clk := clock.NewFake(time.Time{})
			fc := newFakeCoord("a")
			m, n := promoted(t, fc, 1, clk)
			fc.setState(failover.FSMState{Generation: 1, Primary: "a"})
			g := viewOf(n).g
			if known {
				fc.setState(failover.FSMState{Generation: 2, Primary: "b"})
			}
			fc.events <- failover.Event{Kind: failover.EventFenced, Generation: 1, Reason: "b promoted"}
			if !known {
				eventually(t, "guest kept", func() bool { k, _ := m.kept(); return k == g })
				fc.setState(failover.FSMState{Generation: 2, Primary: "b"})
			}
			eventually(t, "secondary", func() bool {
				clk.Advance(watchBootInterval)
				return viewOf(n).role == "secondary"
			})
			if k, _ := m.kept(); k != nil || g.Regions() != nil {
				t.Errorf("kept %v; old guest closed %v", k, g.Regions() == nil)
			}
			if _, cleared, _ := fc.lastImage(); cleared == 0 {
				t.Error("the claim on the dropped guest was never withdrawn")
			}
			if v := viewOf(n); v.sec == nil || v.state != "standby" {
				t.Errorf("state %q secondary %v", v.state, v.sec)
			}
		})
	}
}

// unprotect records the loss of protection unless the coordinator says
// unprotected and no "protected" of this node may still be on its way
// (e2762ab): a claim made earlier is withdrawn even though the
// coordinator's state does not show it yet, and a claim still being
// recorded is waited for, so the records land in order.
func TestMemberUnprotectBookkeeping(t *testing.T) {
	fc := newFakeCoord("a")
	m := NewMember(MemberConfig{Coordinator: fc, Log: quietLog()})
	defer m.cancel()
	ctx := context.Background()

	if err := m.unprotect(ctx); err != nil || len(fc.protectionRecords()) != 0 {
		t.Fatalf("nothing claimed, state unprotected: err %v, records %v; want no record", err, fc.protectionRecords())
	}
	fc.setState(failover.FSMState{Protected: true})
	if err := m.unprotect(ctx); err != nil || !equalRecords(fc.protectionRecords(), false) {
		t.Fatalf("state protected: err %v, records %v", err, fc.protectionRecords())
	}
	fc.setState(failover.FSMState{})
	m.claimed = true // a "protected" this node recorded, not yet in its view
	if err := m.unprotect(ctx); err != nil || !equalRecords(fc.protectionRecords(), false, false) {
		t.Fatalf("claimed, state behind: err %v, records %v; want the loss recorded", err, fc.protectionRecords())
	}
	if m.claimed {
		t.Error("claim still marked after its withdrawal")
	}

	// A claim on its way holds protSem: unprotect waits for it, and gives
	// up (recording nothing) if its own deadline comes first.
	m.protSem <- struct{}{}
	m.claimed = true
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	err := m.unprotect(short)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || len(fc.protectionRecords()) != 2 {
		t.Fatalf("while a claim is recorded: err %v records %v; want to wait, then give up", err, fc.protectionRecords())
	}
	done := make(chan error, 1)
	go func() { done <- m.unprotect(ctx) }()
	select {
	case err := <-done:
		t.Fatalf("unprotect overtook a claim on its way: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	<-m.protSem // the claim is recorded
	if err := <-done; err != nil || !equalRecords(fc.protectionRecords(), false, false, false) {
		t.Fatalf("after the claim: err %v records %v", err, fc.protectionRecords())
	}
}

func equalRecords(got []bool, want ...bool) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if got[i] != want[i] {
			return false
		}
	}
	return true
}
