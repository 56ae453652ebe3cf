package ft

import (
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
)

// clusterNodes is the cluster-first part of a status (issue 20): every
// member of raft's record as self sees it, and the quorum. reach is
// failover.Node.Reachability (absent: unknown); lag, if not nil, is the
// epochs the primary (self) has in flight to its secondary; heard is how
// long ago self last heard from each (absent: never). A pure function of
// what it is given.
func clusterNodes(st failover.FSMState, voterList []failover.NodeInfo, self, leader string, reach map[string]bool, lag *int, heard contacts) ([]api.NodeView, *api.QuorumView) {
	nodes := make([]api.NodeView, 0, len(voterList))
	voters, reachable := 0, 0
	for _, m := range withMembers(voterList, st.Members) {
		nv := api.NodeView{ID: m.ID, Self: m.ID == self, Generation: st.Generation,
			RaftAddr: m.RaftAddr, APIAddr: m.APIAddr, DataAddr: m.DataAddr, ConsoleAddr: m.ConsoleAddr}
		if !nv.Self {
			nv.RaftLastContactMs, nv.DataLastContactMs = msOf(heard.raft, m.ID), msOf(heard.data, m.ID)
		}
		switch {
		case m.Role == failover.RoleWitness:
			nv.Role = "witness"
		case m.Role == "":
			nv.Role = "unregistered" // configured, never heard from
		case st.Primary == "":
			nv.Role = ""
		case m.ID == st.Primary:
			nv.Role = "primary"
			p := st.Protected
			nv.Protected = &p
		default:
			nv.Role = "secondary"
			if lag != nil && self == st.Primary {
				l := *lag
				nv.EpochLag = &l
			}
		}
		if ok, known := reach[m.ID]; known {
			r := ok
			nv.Reachable = &r
			if ok {
				reachable++
			}
		}
		voters++
		nodes = append(nodes, nv)
	}
	needed := voters/2 + 1
	q := &api.QuorumView{Voters: voters, Reachable: reachable, Needed: needed, Leader: leader,
		HasQuorum: reachable >= needed || (leader != "" && reach[leader])}
	q.OneMoreFailure = oneMoreFailure(st, q, reach)
	return nodes, q
}

// withMembers is the configured voters with each registered member's
// info in place of its bare entry (the members alone if none are
// configured).
func withMembers(voters, members []failover.NodeInfo) []failover.NodeInfo {
	if len(voters) == 0 {
		return members
	}
	out := make([]failover.NodeInfo, 0, len(voters))
	for _, v := range voters {
		for _, m := range members {
			if m.ID == v.ID {
				v = m
			}
		}
		out = append(out, v)
	}
	return out
}

// oneMoreFailure says what losing one more node would do to the guest.
func oneMoreFailure(st failover.FSMState, q *api.QuorumView, reach map[string]bool) string {
	down := 0
	for _, ok := range reach {
		if !ok {
			down++
		}
	}
	switch {
	case !q.HasQuorum:
		return "nothing more to lose: this node reaches no majority, so no node may run the guest until one is back"
	case st.Primary == "":
		return "no primary yet: losing a voter before the first primary leaves the cluster unable to choose one"
	case down > 0:
		return "the guest stops: the cluster is down to a bare majority, so one more loss leaves no majority and the primary fences itself within its lease"
	case !st.Protected:
		return "losing the primary stops the guest (the secondary holds no consistent image yet); losing the secondary or the witness is survived"
	default:
		return "survived: the secondary takes over if the primary is lost; losing the secondary or the witness ends protection but the guest keeps running"
	}
}

// clusterView is the "cluster" part of a raft node's status (the
// witness's too): raft's record as rn has applied it.
func clusterView(rn *failover.Node, canRelease bool) *api.ClusterView {
	st := rn.State()
	leader, _ := rn.Leader()
	return &api.ClusterView{ID: rn.ID(), Generation: st.Generation, Primary: st.Primary, Leader: leader,
		Protected: st.Protected, Epoch: st.Epoch, CanRelease: canRelease, Image: rn.ImageStatus(), Waiting: rn.Waiting()}
}

// raftNodes is clusterNodes for a raft node now; data is the data link's
// last word from each member this node streams with (see
// api.NodeView.DataLastContactMs).
func raftNodes(rn *failover.Node, lag *int, data map[string]time.Duration) ([]api.NodeView, *api.QuorumView) {
	leader, _ := rn.Leader()
	return clusterNodes(rn.State(), rn.Voters(), rn.ID(), leader, rn.Reachability(), lag, contacts{raft: rn.LastContact(), data: data})
}

// contacts is how long ago this node last heard from each member: over
// raft, and over the data link.
type contacts struct {
	raft, data map[string]time.Duration
}

func msOf(m map[string]time.Duration, id string) *int64 {
	d, ok := m[id]
	if !ok {
		return nil
	}
	ms := d.Milliseconds()
	return &ms
}

// soloNodes is the "nodes" of a node without raft: itself.
func soloNodes(role string) []api.NodeView {
	yes := true
	return []api.NodeView{{ID: "self", Role: role, Self: true, Reachable: &yes}}
}
