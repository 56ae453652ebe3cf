package failover

import (
	"time"

	"github.com/hashicorp/raft"
)

// ReachableVoters is how many voters (this node included) this node
// knows it reaches now: the leader counts itself and every voter whose
// heartbeats raft has not reported failing; a follower counts itself and
// the leader if it heard from it within twice the heartbeat timeout (it
// cannot see the third voter, so its figure is a lower bound); a node
// with no leader counts only itself. 0 once closed.
func (n *Node) ReachableVoters() int {
	if n.closed.Load() || !n.started.Load() {
		return 0
	}
	if n.raft.State() == raft.Leader {
		n.mu.Lock()
		defer n.mu.Unlock()
		reach := 0
		for _, v := range n.voters {
			if v.ID == n.cfg.ID || !n.unreachable[v.ID] {
				reach++
			}
		}
		return reach
	}
	if _, leader := n.raft.LeaderWithID(); leader != "" && time.Since(n.raft.LastContact()) < 2*n.cfg.HeartbeatTimeout {
		return 2
	}
	return 1
}
