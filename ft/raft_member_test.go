package ft

import (
	"net"
	"testing"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/e2e"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

// freeRaftAddrs reserves n loopback addresses for raft ports.
func freeRaftAddrs(t *testing.T, n int) []string {
	t.Helper()
	// e2e.FreeAddr never hands out an address twice in this process.
	var out []string
	for i := 0; i < n; i++ {
		a, err := e2e.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

// raftMember starts a trio member in process: a guest node, its data
// port, a failover.Node and the driver with a RaftCoordinator.
func raftMember(t *testing.T, id string, role failover.Role, peers map[string]string, boot *bootCounter) (*Member, *Node, *RaftCoordinator) {
	t.Helper()
	n := testNode(t, string(role))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	node, err := failover.Open(failover.Config{ID: id, ClusterID: "ft-test", Role: role, Peers: peers, DataDir: t.TempDir(),
		DataAddr: ln.Addr().String(), APIAddr: n.APIAddr(), ConsoleAddr: n.ConsoleAddr()})
	if err != nil {
		ln.Close()
		t.Fatal(err)
	}
	coord := &RaftCoordinator{Node: node}
	cfg := MemberConfig{Node: n, Coordinator: coord, Epochs: testEpochs(), Data: ln, Fresh: true, BootConfig: testGuestConfig, Log: quietLog(),
		Receiver: &replica.Receiver{NewGuest: EmptyGuest, Build: version.Build(), Log: quietLog(), Timeout: 5 * time.Second}}
	if boot != nil {
		cfg.Boot = boot.boot
	}
	m := NewMember(cfg)
	t.Cleanup(m.Stop)
	m.Start()
	return m, n, coord
}

// startTrio starts a witness and members a (the configured primary) and
// b in one process, and waits until a runs the guest, protected.
func startTrio(t *testing.T) (ma *Member, na *Node, ca *RaftCoordinator, mb *Member, nb *Node, cb *RaftCoordinator) {
	t.Helper()
	_, ma, na, ca, mb, nb, cb = startTrioWitness(t)
	return ma, na, ca, mb, nb, cb
}

// startTrioWitness is startTrio that also returns the witness's raft node.
func startTrioWitness(t *testing.T) (wit *failover.Node, ma *Member, na *Node, ca *RaftCoordinator, mb *Member, nb *Node, cb *RaftCoordinator) {
	t.Helper()
	addrs := freeRaftAddrs(t, 3)
	peers := map[string]string{"a": addrs[0], "b": addrs[1], "w": addrs[2]}
	var err error
	wit, err = failover.Open(failover.Config{ID: "w", ClusterID: "ft-test", Role: failover.RoleWitness, Peers: peers, DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { wit.Close() })
	ma, na, ca = raftMember(t, "a", failover.RolePrimary, peers, &bootCounter{})
	mb, nb, cb = raftMember(t, "b", failover.RoleSecondary, peers, nil)
	eventually(t, "a runs the guest", func() bool { return viewOf(na).state == "running" })
	eventually(t, "the trio records protection", func() bool {
		st := ca.State()
		return st.Protected && st.Primary == "a" && st.Epoch > 0
	})
	return wit, ma, na, ca, mb, nb, cb
}

// A switchover through real raft: the final epoch is handed over, b runs
// the guest under a newer generation, and a, fenced by a newer primary,
// drops its guest and serves b as its secondary; b is then protected by
// a.
func TestRaftMembersSwitchover(t *testing.T) {
	ma, na, ca, mb, nb, cb := startTrio(t)
	gen := ca.State().Generation
	old := viewOf(na).g
	if rec := postSwitchover(ma); rec.Code != 200 {
		t.Fatalf("switchover: %d %s", rec.Code, rec.Body)
	}
	eventually(t, "b runs the guest", func() bool { return viewOf(nb).state == "running" })
	eventually(t, "a serves b", func() bool { return viewOf(na).role == "secondary" })
	if st := cb.State(); st.Primary != "b" || st.Generation <= gen {
		t.Fatalf("after the switchover: primary %q generation %d (was %d)", st.Primary, st.Generation, gen)
	}
	if k, _ := ma.kept(); k != nil || old.Regions() != nil {
		t.Errorf("a kept %v; its old guest closed %v", k, old.Regions() == nil)
	}
	eventually(t, "b protected by a", func() bool {
		loop := mb.currentLoop()
		return loop != nil && loop.Status().Protected
	})
}

// A raft trio in one process, with real raft, real epochs and synth
// guests: the configured primary boots and runs under generation 1, its
// secondary is recorded protected, and when the primary's process goes
// (its member stops and its raft node closes) the secondary is promoted
// and runs the guest from its committed image under a newer generation.
func TestRaftMembersFailover(t *testing.T) {
	ma, _, ca, mb, nb, cb := startTrio(t)
	if v := viewOf(nb); v.role != "secondary" || v.sec == nil {
		t.Fatalf("b: role %q", v.role)
	}
	gen := ca.State().Generation
	committed := ca.State().Epoch
	ma.Stop() // a's process ends: its raft node closes with it
	eventually(t, "b promoted", func() bool { return viewOf(nb).state == "running" })
	st := cb.State()
	if st.Primary != "b" || st.Generation <= gen {
		t.Fatalf("after a's loss: primary %q generation %d (was %d)", st.Primary, st.Generation, gen)
	}
	v := viewOf(nb)
	if v.role != "primary" || v.g == nil || v.g.Paused() || v.loop == nil {
		t.Fatalf("b after promotion: role %q guest %v", v.role, v.g)
	}
	mb.mu.Lock()
	first := mb.lastEpoch
	mb.mu.Unlock()
	if first < committed {
		t.Errorf("b numbers its epochs after %d, below the committed %d", first, committed)
	}
}
