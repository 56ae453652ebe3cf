package failover

import (
	"context"
	"errors"
	"fmt"
	"strconv"
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

// leading implements raftPolicy.
func (n *Node) leading() bool {
	return n.started.Load() && !n.closed.Load() && n.raft.State() == raft.Leader
}

// transferVote implements raftPolicy.
func (n *Node) transferVote(candidate string) bool {
	g := n.transferGrant.Load()
	return g != nil && g.to == candidate && n.clock.Now().Before(g.until)
}

// fsmHas says whether the FSM has applied every command up to index ci:
// raft counts an entry applied once it has handed it to its FSM goroutine,
// which may not have applied it yet (State would still be the one before).
// It looks back from ci for the last command; one no longer in the log
// store, or at or below the last snapshot's index, is in the state the
// FSM restored (raft keeps TrailingLogs entries behind a snapshot and
// never applies them again, so applied says nothing about them).
func (n *Node) fsmHas(ci uint64) bool {
	snap, _ := strconv.ParseUint(n.raft.Stats()["last_snapshot_index"], 10, 64)
	for i := ci; i > 0; i-- {
		if i <= snap {
			return true
		}
		var l raft.Log
		if err := n.store.GetLog(i, &l); err != nil {
			return true
		}
		if l.Type == raft.LogCommand {
			return n.fsm.applied.Load() >= i
		}
	}
	return true
}

// SyncState says what WaitSynced is waiting for now, in a sentence: a
// raft leader to hear from (with the voters this node has heard from and
// when), or its log to be applied.
func (n *Node) SyncState() string {
	if n.closed.Load() {
		return "closed"
	}
	addr, id := n.raft.LeaderWithID()
	if addr == "" {
		var heard []string
		last := n.LastContact()
		for _, v := range n.voters {
			if v.ID == n.cfg.ID {
				continue
			}
			if d, ok := last[v.ID]; ok {
				heard = append(heard, fmt.Sprintf("%s %v ago", v.ID, d.Round(time.Millisecond)))
			} else {
				heard = append(heard, fmt.Sprintf("%s never (at %s)", v.ID, v.RaftAddr))
			}
		}
		return fmt.Sprintf("no raft leader heard yet (this node is a raft %s; heard from: %s): a leader needs %d of the %d voters up and reaching each other at their --raft addresses",
			strings.ToLower(n.raft.State().String()), strings.Join(heard, ", "), len(n.voters)/2+1, len(n.voters))
	}
	if n.raft.State() != raft.Leader && n.stream.leaderCommit.Load() == 0 {
		return fmt.Sprintf("raft leader %s known; waiting for its log (it sends it once it hears from this node again)", id)
	}
	return fmt.Sprintf("raft leader %s known; applying its record: %d of %d entries applied", id, n.raft.AppliedIndex(), max(n.raft.CommitIndex(), n.stream.leaderCommit.Load()))
}

// WaitSynced waits until this node knows a leader and has applied
// everything the leader had committed when it last sent its log (a
// follower's own commit index is not enough: after a restart it is its
// snapshot's, and a heartbeat carries none), so
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
			// A follower's own commit index may be its snapshot's or
			// come from a heartbeat (which carries none): what the
			// leader had committed is in its AppendEntries.
			ci := n.raft.CommitIndex()
			if n.raft.State() != raft.Leader {
				ci = max(ci, n.stream.leaderCommit.Load())
				if n.stream.leaderCommit.Load() == 0 {
					ci = 0 // not heard from the leader's log yet
				}
			}
			if ci > 0 && n.raft.AppliedIndex() >= ci && n.fsmHas(ci) {
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
