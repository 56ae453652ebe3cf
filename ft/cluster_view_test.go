package ft

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/failover"
)

func trioState(protected bool) failover.FSMState {
	return failover.FSMState{Generation: 3, Primary: "a", Protected: protected, Members: []failover.NodeInfo{
		{ID: "a", Role: failover.RolePrimary}, {ID: "b", Role: failover.RoleSecondary}, {ID: "w", Role: failover.RoleWitness}}}
}

// The cluster view names each member's part from raft's record (not the
// first-boot role), and says what one more failure would do.
func TestClusterNodes(t *testing.T) {
	lag := 2
	st := trioState(true)
	st.Primary = "b" // after a switchover: b is primary although it booted as secondary
	heard := contacts{raft: map[string]time.Duration{"a": 40 * time.Millisecond, "w": 10 * time.Millisecond},
		data: map[string]time.Duration{"a": 7 * time.Millisecond}}
	nodes, q := clusterNodes(st, nil, "b", "w", map[string]bool{"a": true, "b": true, "w": true}, &lag, heard)
	roles := map[string]string{}
	for _, n := range nodes {
		roles[n.ID] = n.Role
		if n.Reachable == nil || !*n.Reachable || n.Generation != 3 {
			t.Errorf("%s: reachable %v generation %d", n.ID, n.Reachable, n.Generation)
		}
	}
	if roles["a"] != "secondary" || roles["b"] != "primary" || roles["w"] != "witness" {
		t.Errorf("roles %v", roles)
	}
	if nodes[0].EpochLag == nil || *nodes[0].EpochLag != 2 || nodes[1].Protected == nil || !*nodes[1].Protected {
		t.Errorf("a's lag %v, b's protection %v", nodes[0].EpochLag, nodes[1].Protected)
	}
	if !q.HasQuorum || q.Reachable != 3 || q.Needed != 2 || !strings.HasPrefix(q.OneMoreFailure, "survived") {
		t.Errorf("quorum %+v", q)
	}
	// Last contact: the other members' as heard, never the node's own.
	if p := nodes[0].RaftLastContactMs; p == nil || *p != 40 {
		t.Errorf("a's raft last contact %v, want 40", p)
	}
	if p := nodes[0].DataLastContactMs; p == nil || *p != 7 {
		t.Errorf("a's data last contact %v, want 7", p)
	}
	if nodes[1].RaftLastContactMs != nil || nodes[1].DataLastContactMs != nil || nodes[2].DataLastContactMs != nil {
		t.Errorf("b (self) %v %v, w's data %v: want null", nodes[1].RaftLastContactMs, nodes[1].DataLastContactMs, nodes[2].DataLastContactMs)
	}

	// The witness down: protected, but one more failure stops the guest.
	_, q = clusterNodes(trioState(true), nil, "a", "a", map[string]bool{"a": true, "b": true, "w": false}, nil, contacts{})
	if !q.HasQuorum || !strings.HasPrefix(q.OneMoreFailure, "the guest stops") {
		t.Errorf("witness down: %+v", q)
	}
	// Cut off: no majority.
	nodes, q = clusterNodes(trioState(true), nil, "a", "", map[string]bool{"a": true}, nil, contacts{})
	if q.HasQuorum || !strings.Contains(q.OneMoreFailure, "no majority") || nodes[1].Reachable != nil {
		t.Errorf("cut off: %+v, b reachable %v", q, nodes[1].Reachable)
	}
	// Unprotected: losing the primary stops the guest.
	_, q = clusterNodes(trioState(false), nil, "a", "a", map[string]bool{"a": true, "b": true, "w": true}, nil, contacts{})
	if !strings.HasPrefix(q.OneMoreFailure, "losing the primary stops") {
		t.Errorf("unprotected: %+v", q)
	}
}

// Every role of a trio answers GET /status with the nodes and the quorum.
func TestStatusNodesOnEveryRole(t *testing.T) {
	wit, _, na, _, mb, nb, _ := startTrioWitness(t)
	for _, n := range []*Node{na, nb} {
		st := n.status(false)
		if len(st.Nodes) != 3 || st.Quorum == nil || st.Quorum.Voters != 3 {
			t.Errorf("%s: nodes %+v quorum %+v", st.Role, st.Nodes, st.Quorum)
		}
	}
	nodes, q := raftNodes(wit, nil, nil)
	if len(nodes) != 3 || q.Voters != 3 {
		t.Errorf("witness: nodes %+v quorum %+v", nodes, q)
	}
	// A switchover asked of the secondary names the primary and its API.
	if rec := postSwitchover(mb); rec.Code != 409 || !strings.Contains(rec.Body.String(), "the primary is a") || !strings.Contains(rec.Body.String(), na.APIAddr()) {
		t.Errorf("switchover asked of b: %d %s", rec.Code, rec.Body)
	}
}

// A stop's handover cut short (a second signal: force already ended)
// leaves the guest running here, protected again, for the plain stop that
// follows; HandOverOnStop returns within its bound.
func TestHandOverOnStopForced(t *testing.T) {
	ma, na, ca, _, _, _ := startTrio(t)
	force, cancel := context.WithCancel(context.Background())
	cancel()
	t0 := time.Now()
	ma.HandOverOnStop(force, 5*time.Second)
	if d := time.Since(t0); d > 5*time.Second {
		t.Fatalf("HandOverOnStop took %v", d)
	}
	if st := ca.State(); st.Primary != "a" {
		t.Fatalf("a forced stop handed over anyway: primary %q", st.Primary)
	}
	eventually(t, "a runs the guest again", func() bool {
		v := viewOf(na)
		return v.state == "running" && v.g != nil && !v.g.Paused()
	})
}
