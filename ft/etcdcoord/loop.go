package etcdcoord

import (
	"fmt"
	"time"

	"github.com/tandemvm/tandem/failover"
)

// poke wakes the decision loop without blocking.
func (c *Coordinator) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// loop runs the decision step every Tick and whenever something changed.
func (c *Coordinator) loop() {
	defer c.wg.Done()
	t := c.clk.NewTicker(c.cfg.Tick)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C():
		case <-c.wake:
		}
		c.step()
	}
}

// liveView is the part of failover.View that CanRelease needs, read
// without locks: leadership is holding the leader key with this node's
// lease, the term is the key's create revision, and the lease deadline is
// the local one less the margin.
func (c *Coordinator) liveView(now time.Time) failover.View {
	s := c.snap.Load()
	v := failover.View{Self: c.cfg.Self, State: s.fsmState(), Transferring: c.transferring.Load() > 0}
	if id, safe, ok := c.leaseValid(now); ok && s.leader == c.cfg.Self.ID && s.leaderLease == int64(id) {
		v.Leader, v.Term, v.LeaseDeadline = true, uint64(s.leaderRev), safe
	}
	if a := c.active.Load(); a != nil {
		v.Active = *a
	}
	return v
}

// viewLocked completes the live view with the loop's bookkeeping, as
// failover.Node does for the raft trio.
// Preconditions: c.mu held.
func (c *Coordinator) viewLocked(v failover.View) failover.View {
	c.claims.Fill(&v, c.cfg.Self.ID, c.image, c.reportedEpoch)
	v.Claimed, v.ClaimedTerm = c.claimed, c.claimedTerm
	v.Pending = c.pending
	v.LastRegister, v.LastEpochApply = c.lastRegister, c.lastEpochApply
	v.ReportedEpoch, v.PeerHeartbeat, v.AnnouncedPeer = c.reportedEpoch, c.peerHeartbeat, c.announced
	v.Tuning = failover.Tuning{DataTimeout: max(c.cfg.DataTimeout, 0), EpochInterval: c.cfg.EpochInterval, RetryInterval: c.cfg.RetryInterval}
	return v
}

// step runs failover.Decide once and carries its actions out, then takes
// or gives up the leader key. Everything that talks to etcd runs on a
// worker, so a fence is never delayed by a call.
func (c *Coordinator) step() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return
	}
	now := c.clk.Now()
	v := c.viewLocked(c.liveView(now))
	if v.Term != c.claimedTerm {
		c.claimed, c.claimedTerm = 0, 0 // a claim of an earlier term does not count
		v.Claimed, v.ClaimedTerm = 0, 0
	}
	acts := failover.Decide(v, now)
	if c.noteUnreadableLocked() != "" {
		acts = onlyFences(acts)
	}
	for _, a := range acts {
		c.execLocked(a, v, now)
	}
	c.leadershipLocked(v, acts, now)
	c.noteWaitingLocked(v, acts)
}

// execLocked carries out one action of Decide.
// Preconditions: c.mu held.
func (c *Coordinator) execLocked(a failover.Action, v failover.View, now time.Time) {
	switch a.Kind {
	case failover.ActFence:
		c.active.Store(nil)
		c.emit(failover.Event{Kind: failover.EventFenced, Generation: a.Generation, Reason: a.Reason, At: now})
	case failover.ActActivate:
		c.active.Store(&failover.Activation{Generation: a.Generation, Term: v.Term})
		c.image = &failover.Image{Generation: a.Generation, Epoch: max(v.RunnableEpoch, a.Epoch), Live: true}
		c.claims.Reset()
		peer, _ := v.State.Secondary()
		c.emit(failover.Event{Kind: failover.EventBecamePrimary, Generation: a.Generation, Epoch: a.Epoch, Peer: peer, At: now})
	case failover.ActAnnouncePeer:
		c.announced = a.Target
		c.emit(failover.Event{Kind: failover.EventPeerChanged, Peer: a.Target, At: now})
	case failover.ActClaim:
		c.claimLocked(a, v)
	case failover.ActMarkUnprotected:
		c.pending.Protect = true
		seq := c.protSeq.Add(1)
		c.worker(func() {
			err := c.writeProtected(v.State.Generation, false, seq)
			c.mu.Lock()
			c.pending.Protect = false
			c.mu.Unlock()
			if err == nil {
				c.emit(failover.Event{Kind: failover.EventUnprotected, Generation: a.Generation, Reason: a.Reason})
			}
		})
	case failover.ActApplyEpoch:
		c.pending.Epoch, c.lastEpochApply = true, now
		c.worker(func() {
			err := c.writeState(a.Generation, func(s *stateRecord) { s.Epoch = max(s.Epoch, a.Epoch) })
			c.mu.Lock()
			c.pending.Epoch = false
			c.mu.Unlock()
			if err != nil {
				c.log.Debug("epoch record failed", "epoch", a.Epoch, "err", err)
			}
		})
	case failover.ActRegister:
		c.registerLocked(now)
	}
	// ActTransfer hands raft leadership to a named voter: etcd has no
	// voters to name (members register no raft address, so Decide never
	// asks); leadershipLocked gives the leader key up instead.
}

// leadershipLocked takes the leader key when nobody holds it and this
// node could resume the guest (failover.Eligible on the view it would
// lead with), and gives it up when it leads but cannot resume and has
// nothing to activate: the raft trio's leadership transfer, for a lock.
// Preconditions: c.mu held.
func (c *Coordinator) leadershipLocked(v failover.View, acts []failover.Action, now time.Time) {
	if c.campaigning || c.resigning || v.Transferring {
		return
	}
	s := c.snap.Load()
	if v.Leader {
		active := v.Active.Generation != 0
		for _, a := range acts {
			active = active || a.Kind == failover.ActActivate || a.Kind == failover.ActClaim
		}
		if !active && !c.pending.Claim && !failover.Eligible(v) {
			c.resignLocked(uint64(s.leaderRev), "leader cannot resume the guest: "+failover.IneligibleReason(v))
		}
		return
	}
	lid, _, ok := c.leaseValid(now)
	if !ok || s.leader != "" || now.Before(c.standDownUntil) || !failover.Eligible(v) || s.stateUnreadable(c.keys) != "" {
		return
	}
	c.campaignLocked(lid)
}

// noteWaitingLocked records why nobody serves the guest, as this node
// sees it ("" when it serves, or cannot tell).
// Preconditions: c.mu held.
func (c *Coordinator) noteWaitingLocked(v failover.View, acts []failover.Action) {
	active := v.Active.Generation != 0
	for _, a := range acts {
		active = (active || a.Kind == failover.ActActivate) && a.Kind != failover.ActFence
	}
	s := c.snap.Load()
	w := ""
	switch {
	case active:
	case s.stateUnreadable(c.keys) != "":
		w = fmt.Sprintf("no primary: the record %s cannot be read (%s); no node claims the guest until it can: restore a valid record in etcd",
			c.keys.state(), s.stateUnreadable(c.keys))
	case s.leader == "" && v.State.Generation > 0:
		self := "this node can resume the guest"
		if r := failover.IneligibleReason(v); r != "" {
			self = "this node cannot: " + r
		}
		w = fmt.Sprintf("no primary: nobody holds the etcd lease of %s (generation %d, committed epoch %d); needed: %s; %s",
			c.cfg.Cluster, v.State.Generation, v.State.Epoch, failover.Needed(v.State), self)
	case v.Leader && !failover.Eligible(v):
		w = fmt.Sprintf("no primary: %s holds the etcd lease but cannot resume the guest: %s; needed: %s", c.cfg.Self.ID, failover.IneligibleReason(v), failover.Needed(v.State))
	}
	now := c.clk.Now()
	if w != c.waiting {
		c.waiting, c.waitingSince = w, now
	}
	// Claims and activations pass through such states for a moment: log
	// one that held for waitingLogAfter, once.
	switch {
	case w != "" && w != c.waitingLogged && now.Sub(c.waitingSince) >= waitingLogAfter:
		c.waitingLogged = w
		c.log.Warn("the guest is not served", "why", w)
	case w == "" && c.waitingLogged != "":
		c.waitingLogged = ""
		c.log.Info("no longer waiting", "was", "the guest was not served")
	}
}

// noteUnreadableLocked logs the records this node cannot read, once per
// change, and returns why the state record cannot be read ("" if it
// can).
// Preconditions: c.mu held.
func (c *Coordinator) noteUnreadableLocked() string {
	s := c.snap.Load()
	switch bad := s.unreadable(); {
	case bad == c.unreadableLogged:
	case bad != "":
		c.log.Error("etcd holds records this node cannot read; it decides without them", "records", bad)
	default:
		c.log.Info("every etcd record is readable again")
	}
	c.unreadableLogged = s.unreadable()
	return s.stateUnreadable(c.keys)
}

// onlyFences is acts without anything that claims, activates or writes
// the record: what a node may still do while the record is unreadable.
func onlyFences(acts []failover.Action) []failover.Action {
	var out []failover.Action
	for _, a := range acts {
		if a.Kind == failover.ActFence || a.Kind == failover.ActRegister || a.Kind == failover.ActAnnouncePeer {
			out = append(out, a)
		}
	}
	return out
}

// waitingLogAfter is how long a reason for nobody serving must hold
// before it is logged.
const waitingLogAfter = time.Second

// worker runs f on a goroutine Close waits for; once Close has begun
// it runs nothing and returns false (a caller outside the loops, such as
// SetProtected, may get here while Close waits).
func (c *Coordinator) worker(f func()) bool {
	c.goMu.Lock()
	defer c.goMu.Unlock()
	if c.stopping {
		return false
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		f()
	}()
	return true
}
