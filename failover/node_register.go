package failover

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/raft"
)

// leader's registration RPC.
func (n *Node) register(info NodeInfo, leader bool) error {
	req := registerRequest{ClusterID: n.cfg.ClusterID, Info: info}
	if leader {
		if err := n.checkVoter(info); err != nil {
			return err
		}
		return n.apply(cmdRegister, &registerCmd{ClusterID: req.ClusterID, Info: info})
	}
	addr, _ := n.raft.LeaderWithID()
	if addr == "" {
		return errors.New("failover: register: no known leader")
	}
	reply, err := n.stream.registerRemote(string(addr), req, n.cfg.ApplyTimeout+time.Second)
	if err != nil {
		return err
	}
	if reply.Err != "" {
		switch {
		case strings.Contains(reply.Err, ErrWrongCluster.Error()):
			return fmt.Errorf("%w: %s", ErrWrongCluster, reply.Err)
		case strings.Contains(reply.Err, ErrInUse.Error()):
			return fmt.Errorf("%w: %s", ErrInUse, reply.Err)
		}
		return fmt.Errorf("failover: register with leader %s: %s", addr, reply.Err)
	}
	return nil
}

// checkVoter refuses info whose ID is not a voter, or is a voter at another
// address (the ID is in use by another node).
func (n *Node) checkVoter(info NodeInfo) error {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return fmt.Errorf("failover: read configuration: %w", err)
	}
	for _, s := range f.Configuration().Servers {
		if string(s.ID) != info.ID {
			continue
		}
		if string(s.Address) != info.RaftAddr {
			return fmt.Errorf("%w: node id %s is a voter at %s, not %s", ErrInUse, info.ID, s.Address, info.RaftAddr)
		}
		return nil
	}
	return fmt.Errorf("%w: node id %s is not a voter of this cluster", ErrMembership, info.ID)
}

// wrongClusterReply is a registrant's answer when its cluster ID differs:
// it names neither ID (the leader logs them), so a stranger cannot learn
// the cluster's ID from a refusal.
var wrongClusterReply = ErrWrongCluster.Error() + ": wrong cluster (this node's cluster ID is not the leader's; the leader's log has the details)"

// handleRegister serves a follower's registration on the leader. The
// transport has already checked that the registrant registers itself
// (muxStream.checkRegistrant).
func (n *Node) handleRegister(req registerRequest) registerReply {
	if n.closed.Load() || !n.started.Load() {
		return registerReply{Err: ErrClosed.Error()}
	}
	if n.raft.State() != raft.Leader {
		addr, _ := n.raft.LeaderWithID()
		return registerReply{Err: ErrNotLeader.Error(), LeaderAddr: string(addr)}
	}
	if req.ClusterID != n.cfg.ClusterID {
		n.log.Warn("registration refused: wrong cluster", "registrant", req.Info.ID, "their_cluster", req.ClusterID, "our_cluster", n.cfg.ClusterID)
		return registerReply{Err: wrongClusterReply}
	}
	if err := n.checkVoter(req.Info); err != nil {
		return registerReply{Err: err.Error()}
	}
	if err := n.apply(cmdRegister, &registerCmd{ClusterID: req.ClusterID, Info: req.Info}); err != nil {
		if errors.Is(err, ErrWrongCluster) {
			n.log.Warn("registration refused", "registrant", req.Info.ID, "err", err)
			return registerReply{Err: wrongClusterReply}
		}
		return registerReply{Err: err.Error()}
	}
	return registerReply{}
}

// transferVoteWindow is how long after starting a leadership transfer this
// node honours the target's vote request with the LeadershipTransfer flag.
func (n *Node) transferVoteWindow() time.Duration {
	return max(4*n.cfg.ElectionTimeout, 2*time.Second)
}

// transferLeadership hands raft leadership to target. It first records the
// grant, so that this node, and only it, honours target's vote request
// that bypasses the vote check (see muxStream.admit).
func (n *Node) transferLeadership(target NodeInfo) error {
	n.transferGrant.Store(&transferGrant{to: target.ID, until: n.clock.Now().Add(n.transferVoteWindow())})
	return n.raft.LeadershipTransferToServer(raft.ServerID(target.ID), raft.ServerAddress(target.RaftAddr)).Error()
}

// transferGrant: this node started a leadership transfer to "to".
type transferGrant struct {
	to    string
	until time.Time
}

// leaderID implements raftPolicy.
func (n *Node) leaderID() string {
	if !n.started.Load() {
		return ""
	}
	_, id := n.raft.LeaderWithID()
	return string(id)
}

// transferVote implements raftPolicy.
func (n *Node) transferVote(candidate string) bool {
	g := n.transferGrant.Load()
	return g != nil && g.to == candidate && n.clock.Now().Before(g.until)
}

// WaitSynced waits until this node knows a leader and has applied
// everything the leader had committed when it last heard from it, so
// State() reflects the cluster (use it after Open before deciding whether to
// boot a guest). It returns ctx's error when ctx ends first.
func (n *Node) WaitSynced(ctx context.Context) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		if n.closed.Load() {
			return ErrClosed
		}
		if addr, _ := n.raft.LeaderWithID(); addr != "" {
			ci := n.raft.CommitIndex()
			if ci > 0 && n.raft.AppliedIndex() >= ci {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("failover: wait for sync: %w", ctx.Err())
		case <-t.C:
		}
	}
}
