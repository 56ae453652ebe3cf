package failover

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/raft"
)

// poke wakes the decision loop without blocking.
func (n *Node) poke() {
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

// tick is the decision loop's period: a fifth of the lease, so the Fenced
// event trails lease expiry by at most that.
func (n *Node) tick() time.Duration {
	return max(n.cfg.LeaderLeaseTimeout/5, 2*time.Millisecond)
}

func (n *Node) loop() {
	defer n.wg.Done()
	t := n.clock.NewTicker(n.tick())
	defer t.Stop()
	leaderCh := n.raft.LeaderCh()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C():
		case <-n.wake:
		case <-leaderCh:
		case o := <-n.observed:
			n.mu.Lock()
			switch d := o.Data.(type) {
			case raft.FailedHeartbeatObservation:
				n.unreachable[string(d.PeerID)] = true
			case raft.ResumedHeartbeatObservation:
				delete(n.unreachable, string(d.PeerID))
			}
			n.mu.Unlock()
		}
		n.step()
	}
}

// leaseLoop renews the leader lease by asking raft to confirm leadership
// with a majority every quarter lease.
func (n *Node) leaseLoop() {
	defer n.wg.Done()
	t := n.clock.NewTicker(max(n.cfg.LeaderLeaseTimeout/4, time.Millisecond))
	defer t.Stop()
	// pending holds the answer of a verification still outstanding: raft
	// answers one when it steps down, but one queued as raft shuts down
	// is never answered (its future has no shutdown channel), and a
	// Close waiting for this loop hung on it for minutes. So the wait is
	// bounded, Close ends it, and no second verification starts while
	// one is outstanding.
	var pending chan error
	for {
		select {
		case <-n.stop:
			return
		case <-t.C():
		case <-n.kickLease:
		}
		if pending != nil {
			select {
			case <-pending:
				pending = nil
			default:
				continue
			}
		}
		if n.raft.State() != raft.Leader {
			continue
		}
		term := n.raft.CurrentTerm()
		start := n.clock.Now()
		f := n.raft.VerifyLeader()
		pending = make(chan error, 1)
		go func(p chan<- error) { p <- f.Error() }(pending)
		var err error
		bound := time.NewTimer(max(n.cfg.LeaderLeaseTimeout, 10*time.Millisecond))
		select {
		case err = <-pending:
			pending = nil
		case <-n.stop:
			bound.Stop()
			return
		case <-bound.C:
			continue // no lease from a verification slower than the lease itself
		}
		bound.Stop()
		if err != nil || n.raft.CurrentTerm() != term {
			continue
		}
		prev := n.lease.Load()
		n.lease.Store(&lease{term: term, deadline: start.Add(n.cfg.LeaderLeaseTimeout)})
		if prev == nil || prev.term != term || !start.Before(prev.deadline) {
			n.poke() // a fresh lease may unblock a claim or activation
		}
	}
}

// UnansweredVerifyFunc names the goroutine leaseLoop leaves waiting on a
// leadership verification raft never answers (queued as raft shut down):
// it cannot be stopped, only abandoned. Test mains pass it to goleak
// (goleak.IgnoreAnyFunction) so that raft limitation is not taken for a
// leak of ours.
const UnansweredVerifyFunc = "github.com/tandemvm/tandem/failover.(*Node).leaseLoop.func1"

// step runs Decide once and carries out its actions.
func (n *Node) step() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed.Load() {
		return
	}
	now := n.clock.Now()
	v := n.liveView()
	if v.Leader && v.Term != n.leaderTerm {
		// A new leadership term: earlier claims and transfer rotation no
		// longer count, and the lease must be earned again.
		n.leaderTerm = v.Term
		n.claimed, n.claimedTerm, n.transfers = 0, 0, 0
		n.unreachable = map[string]bool{}
		select {
		case n.kickLease <- struct{}{}:
		default:
		}
	}
	v = n.viewLocked(v)
	acts := Decide(v, now)
	for _, a := range acts {
		n.execLocked(a, v, now)
	}
	n.noteWaitingLocked(v, acts, now)
}

// viewLocked completes the live view with the decision loop's bookkeeping.
// Preconditions: n.mu held.
func (n *Node) viewLocked(v View) View {
	n.claims.Fill(&v, n.cfg.ID, n.image, n.reportedEpoch)
	v.Claimed, v.ClaimedTerm = n.claimed, n.claimedTerm
	v.Pending = n.pending
	v.LastTransfer, v.TransferAttempts = n.lastTransfer, n.transfers
	v.LastRegister, v.LastEpochApply = n.lastRegister, n.lastEpochApply
	v.ReportedEpoch, v.PeerHeartbeat, v.AnnouncedPeer = n.reportedEpoch, n.peerHeartbeat, n.announced
	v.Voters = n.voters
	v.Unreachable = n.unreachable
	v.Tuning = Tuning{DataTimeout: max(n.cfg.DataTimeout, 0), EpochInterval: n.cfg.EpochInterval, RetryInterval: n.cfg.RetryInterval}
	return v
}

// waitingLogAfter is how long a reason for nobody serving must hold before
// it is logged: elections and hand-overs pass through such states briefly.
const waitingLogAfter = time.Second

// noteWaitingLocked records why nobody serves (see Waiting) and logs it
// once it has held for waitingLogAfter, and again when it changes or ends.
// Preconditions: n.mu held.
func (n *Node) noteWaitingLocked(v View, acts []Action, now time.Time) {
	active := v.Active.Generation != 0
	for _, a := range acts {
		switch a.Kind {
		case ActFence:
			active = false
		case ActActivate:
			active = true
		}
	}
	w := ""
	switch {
	case active:
	case v.Leader:
		// Only the leader can run the guest: not active, nobody is. (A
		// leader that cannot resume keeps handing leadership on, so it is
		// often Transferring; a switchover's leader is still Eligible.)
		claimed := v.Claimed != 0 && v.ClaimedTerm == v.Term
		if r := IneligibleReason(v); r != "" && !v.Pending.Claim && !claimed {
			w = fmt.Sprintf("no primary: raft leader %s cannot resume the guest: %s; needed: %s", v.Self.ID, r, Needed(v.State))
			var down []string
			for _, p := range v.Voters {
				if v.Unreachable[p.ID] {
					down = append(down, p.ID)
				}
			}
			if len(down) > 0 {
				w += "; unreachable: " + strings.Join(down, ", ")
			}
		}
	default:
		st := v.State
		_, leader := n.raft.LeaderWithID()
		self := "this node can resume the guest if it becomes leader"
		if r := IneligibleReason(v); r != "" {
			self = "this node cannot: " + r
		}
		switch {
		case leader == "":
			w = fmt.Sprintf("no raft leader: a majority of the %d voters must be up and reachable", len(n.voters))
			if st.Generation > 0 {
				w += fmt.Sprintf(" (cluster at generation %d, committed epoch %d; needed to resume: %s; %s)", st.Generation, st.Epoch, Needed(st), self)
			}
		case st.Generation > 0 && string(leader) != st.Primary:
			// The primary runs the guest only while it leads raft.
			w = fmt.Sprintf("no primary: raft leader %s is not the cluster's primary %s (generation %d, committed epoch %d); needed to resume: %s; %s",
				leader, st.Primary, st.Generation, st.Epoch, Needed(st), self)
		}
	}
	if w != n.waiting {
		n.waiting, n.waitingSince = w, now
	}
	switch {
	case w != "" && w != n.waitingLogged && now.Sub(n.waitingSince) >= waitingLogAfter:
		n.waitingLogged = w
		n.log.Warn("the guest is not served", "why", w)
	case w == "" && n.waitingLogged != "":
		n.waitingLogged = ""
		n.log.Info("no longer waiting", "was", "the guest was not served")
	}
}

// execLocked carries out one action. Fence and activate are immediate;
// everything that talks to raft or the network runs on a worker, bounded by
// a timeout, so the loop never waits and a fence is never delayed.
// Preconditions: n.mu held.
func (n *Node) execLocked(a Action, v View, now time.Time) {
	switch a.Kind {
	case ActFence:
		n.active.Store(nil)
		n.emit(Event{Kind: EventFenced, Generation: a.Generation, Reason: a.Reason, At: now})
	case ActActivate:
		n.active.Store(&Activation{Generation: a.Generation, Term: v.Term})
		// From here the guest this node runs is the image that counts.
		n.image = &Image{Generation: a.Generation, Epoch: max(v.RunnableEpoch, a.Epoch), Live: true}
		n.claims.Reset()
		peer, _ := v.State.Secondary()
		n.emit(Event{Kind: EventBecamePrimary, Generation: a.Generation, Epoch: a.Epoch, Peer: peer, At: now})
	case ActAnnouncePeer:
		n.announced = a.Target
		n.emit(Event{Kind: EventPeerChanged, Peer: a.Target, At: now})
	case ActClaim:
		n.claimLocked(a, v)
	case ActTransfer:
		n.transferLocked(a, now)
	case ActMarkUnprotected:
		n.pending.Protect = true
		n.worker(func() {
			err := n.apply(cmdSetProtected, &protectedCmd{Generation: a.Generation})
			n.mu.Lock()
			n.pending.Protect = false
			n.mu.Unlock()
			if err == nil {
				n.emit(Event{Kind: EventUnprotected, Generation: a.Generation, Reason: a.Reason})
			}
		})
	case ActApplyEpoch:
		n.pending.Epoch = true
		n.lastEpochApply = now
		n.worker(func() {
			err := n.apply(cmdEpoch, &epochCmd{Generation: a.Generation, Epoch: a.Epoch})
			n.mu.Lock()
			n.pending.Epoch = false
			n.mu.Unlock()
			if err != nil {
				n.log.Debug("epoch report failed", "epoch", a.Epoch, "err", err)
			}
		})
	case ActRegister:
		n.pending.Register = true
		n.lastRegister = now
		leader := v.Leader
		n.worker(func() {
			err := n.register(a.Target, leader)
			n.mu.Lock()
			n.pending.Register = false
			n.mu.Unlock()
			if err != nil {
				if errors.Is(err, ErrWrongCluster) || errors.Is(err, ErrInUse) {
					n.log.Error("registration refused", "err", err)
					n.emit(Event{Kind: EventRefused, Reason: err.Error()})
				} else {
					n.log.Debug("registration failed", "err", err)
				}
			}
		})
	}
}

// claimLocked starts a worker that proposes this node's claim to
// generation a.Generation in raft and records it when it commits.
// Preconditions: n.mu held.
func (n *Node) claimLocked(a Action, v View) {
	n.pending.Claim = true
	term := v.Term
	img := n.image // the image this claim is made with
	n.worker(func() {
		err := n.apply(cmdPromote, &promoteCmd{ID: n.cfg.ID, Generation: a.Generation})
		n.mu.Lock()
		n.pending.Claim = false
		if err == nil && n.raft.CurrentTerm() == term {
			n.claimed, n.claimedTerm = a.Generation, term
		}
		covers := img != nil && n.image != nil && n.image.Generation == img.Generation && v.RunnableGen == a.Generation-1
		switch {
		case err == nil && covers:
			// Nothing is released under the new generation before this
			// node activates it: the image it claimed with holds all
			// of it, should it lose leadership before activating.
			n.claims.Committed(img.Generation, a.Generation)
		case errors.Is(err, raft.ErrLeadershipLost) && covers:
			// The entry may commit after all (a new leader keeps it):
			// without this record the cluster would then be at a
			// generation no image covers, and nobody could serve.
			n.claims.Tentative(img.Generation, a.Generation)
		}
		n.mu.Unlock()
		if err != nil {
			n.log.Debug("claim failed", "gen", a.Generation, "err", err)
			return // retried on the next tick
		}
		n.poke()
	})
}

// transferLocked starts a worker that hands raft leadership to a.Target.
// Preconditions: n.mu held.
func (n *Node) transferLocked(a Action, now time.Time) {
	n.pending.Transfer = true
	n.lastTransfer = now
	n.transfers++
	n.transferring.Add(1)
	n.worker(func() {
		err := n.transferLeadership(a.Target)
		n.transferring.Add(-1)
		n.mu.Lock()
		n.pending.Transfer = false
		n.mu.Unlock()
		if err != nil {
			n.log.Debug("leadership transfer failed", "to", a.Target.ID, "err", err)
		} else {
			n.log.Info("leadership transferred", "to", a.Target.ID, "reason", a.Reason)
		}
		n.poke()
	})
}

// worker runs f on a goroutine Close waits for.
func (n *Node) worker(f func()) {
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		f()
	}()
}

// register puts info into the FSM: directly when leader, else through the
