package failover

import (
	"slices"
	"time"

	"github.com/hashicorp/raft"
)

// Reachability says, for each voter this node can tell about, whether
// it reaches it now: the leader knows every voter (those whose heartbeats
// raft has not reported failing are reachable); a follower knows itself
// and the leader (heard within twice the heartbeat timeout), and nothing
// of the third voter (absent from the map). Nil once closed.
func (n *Node) Reachability() map[string]bool {
	if n.closed.Load() || !n.started.Load() {
		return nil
	}
	out := map[string]bool{n.cfg.ID: true}
	if n.raft.State() == raft.Leader {
		n.mu.Lock()
		defer n.mu.Unlock()
		for _, v := range n.voters {
			if v.ID != n.cfg.ID {
				out[v.ID] = !n.unreachable[v.ID]
			}
		}
		return out
	}
	if _, leader := n.raft.LeaderWithID(); leader != "" && string(leader) != n.cfg.ID {
		out[string(leader)] = time.Since(n.raft.LastContact()) < 2*n.cfg.HeartbeatTimeout
	}
	return out
}

// LastContact is, for each other voter this node has heard from since it
// started, how long ago that was: a raft request from it, or an answer
// to one this node sent (the leader hears every follower at each
// heartbeat; a follower hears the leader, and the other follower only
// during elections). Nil once closed.
func (n *Node) LastContact() map[string]time.Duration {
	if n.closed.Load() || n.stream == nil {
		return nil
	}
	out := map[string]time.Duration{}
	now := time.Now()
	for _, v := range n.voters {
		if v.ID == n.cfg.ID {
			continue
		}
		if at := n.stream.lastHeard(v.ID); !at.IsZero() {
			out[v.ID] = max(now.Sub(at), 0)
		}
	}
	return out
}

// ReachableVoters is how many voters (this node included) this node
// knows it reaches now (see Reachability: a follower's figure is a lower
// bound, at most 2). 0 once closed.
func (n *Node) ReachableVoters() int {
	reach := 0
	for _, ok := range n.Reachability() {
		if ok {
			reach++
		}
	}
	return reach
}

// Voters is the configured voters (Config.Peers: ID and raft address),
// sorted by ID; whether each has registered is in State().Members.
func (n *Node) Voters() []NodeInfo { return slices.Clone(n.voters) }
