package etcdcoord

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/clock"
)

// ID names this node.
func (c *Coordinator) ID() string { return c.cfg.Self.ID }

// WaitSynced returns at once: Open returned only once this node had read
// the prefix, and the watch keeps it current.
func (c *Coordinator) WaitSynced(context.Context) error { return nil }

// State is the record as this node last read it.
func (c *Coordinator) State() failover.FSMState { return c.snap.Load().fsmState() }

// Events delivers the decisions in order; Close closes it.
func (c *Coordinator) Events() <-chan failover.Event { return c.events }

// CanRelease reports whether output of generation gen may leave now: this
// node activated gen while holding the leader key with its lease, still
// does, the lease is valid here by more than the margin, no switchover is
// under way, and the record names it primary at gen (failover.MayRelease,
// the rule the raft trio uses). No lock, no I/O.
func (c *Coordinator) CanRelease(gen uint64) bool {
	if c.closed.Load() {
		return false
	}
	now := c.clk.Now()
	return failover.MayRelease(c.liveView(now), now, gen)
}

// SetProtected records whether the secondary holds every acknowledged
// epoch, at the active generation, and returns once etcd committed it.
func (c *Coordinator) SetProtected(ctx context.Context, protected bool) error {
	a := c.active.Load()
	if a == nil {
		return fmt.Errorf("%w: set protected", ErrNotPrimary)
	}
	done := make(chan error, 1)
	seq := c.protSeq.Add(1)
	if !c.worker(func() { done <- c.writeProtected(a.Generation, protected, seq) }) {
		return ErrClosed
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("etcd coordinator: set protected: %w", ctx.Err())
	}
}

// ReportEpoch records the newest epoch the secondary acknowledged; the
// loop writes it to the record at most every EpochInterval.
func (c *Coordinator) ReportEpoch(epoch uint64) {
	c.mu.Lock()
	c.reportedEpoch = max(c.reportedEpoch, epoch)
	c.mu.Unlock()
}

// DataHeartbeat records that the data channel heard from the secondary.
func (c *Coordinator) DataHeartbeat() {
	c.mu.Lock()
	c.peerHeartbeat = c.clk.Now()
	c.mu.Unlock()
}

// SetImage is this node's claim: the image it could resume.
func (c *Coordinator) SetImage(img failover.Image) {
	c.mu.Lock()
	c.image = &img
	c.mu.Unlock()
	c.poke()
}

// ClearImage: this node holds no image it could resume.
func (c *Coordinator) ClearImage() {
	c.mu.Lock()
	c.image = nil
	c.mu.Unlock()
	c.poke()
}

// Secondary is the registered node that is not the primary.
func (c *Coordinator) Secondary() (failover.NodeInfo, bool) { return c.State().Secondary() }

// switchoverWait bounds how long Switchover waits for the target to take
// the lease and claim the next generation.
func (c *Coordinator) switchoverWait() time.Duration { return 2*c.cfg.LeaseTTL + time.Second }

// Switchover fences this node, records the last reported epoch, gives up
// the leader key and stays away from it while the target (the secondary
// if to is "") takes it and claims the next generation. It returns once
// the record names the target primary, or with an error when the target
// did not take over in time (this node then campaigns again and, its
// guest kept, becomes primary again under a new generation).
func (c *Coordinator) Switchover(ctx context.Context, to string) error {
	now := c.clk.Now()
	v := c.liveView(now)
	st := v.State
	target, ok := st.Secondary()
	if to != "" {
		target, ok = st.Member(to)
	}
	switch {
	case c.closed.Load():
		return ErrClosed
	case !v.Leader || v.Active.Generation == 0:
		return fmt.Errorf("%w: switchover must be started on the primary", ErrNotPrimary)
	case !ok || target.ID == c.cfg.Self.ID:
		return fmt.Errorf("%w: switchover target %q is not a registered peer", ErrConfig, to)
	}
	c.transferring.Add(1)
	defer c.transferring.Add(-1)
	c.step() // fence now
	c.mu.Lock()
	epoch := c.reportedEpoch
	c.standDownUntil = now.Add(c.switchoverWait())
	c.mu.Unlock()
	err := c.writeState(st.Generation, func(s *stateRecord) { s.Epoch = max(s.Epoch, epoch) })
	if err == nil {
		err = c.resign(v.Term)
	}
	if err == nil {
		err = c.waitPrimary(ctx, target.ID, st.Generation)
	}
	c.mu.Lock()
	c.claimed = 0
	if err != nil {
		c.standDownUntil = time.Time{}
	}
	c.mu.Unlock()
	if err != nil {
		return fmt.Errorf("etcd coordinator: switchover to %s: %w", target.ID, err)
	}
	return nil
}

// waitPrimary waits until the record names id primary past generation
// gen, or switchoverWait or ctx ends.
func (c *Coordinator) waitPrimary(ctx context.Context, id string, gen uint64) error {
	deadline := c.clk.Now().Add(c.switchoverWait())
	for {
		if s := c.snap.Load().state; s.Primary == id && s.Gen > gen {
			return nil
		}
		if c.clk.Now().After(deadline) {
			return fmt.Errorf("%s did not take the lease and claim a generation within %v", id, c.switchoverWait())
		}
		if err := clock.Sleep(ctx, c.clk, 20*time.Millisecond); err != nil {
			return err
		}
	}
}

// AdmitPrimary admits a primary's data connection by failover's rule
// (failover.AdmitPrimary), with the other registered node given
// failover.PrimaryWait to become primary.
func (c *Coordinator) AdmitPrimary(ctx context.Context, conn net.Conn) error {
	return failover.AdmitPrimary(ctx, c.clk, conn, c.ID(), c.State, nil)
}

// SecondaryName is the node registered at data address addr (else the
// record's secondary): its certificate must name it.
func (c *Coordinator) SecondaryName(addr string) string {
	return failover.SecondaryName(c.State(), c.ID(), addr)
}

// ClusterView is the record as this node's status shows it; gen is the
// generation the node releases output under. raft_leader is the holder
// of the etcd leader key.
func (c *Coordinator) ClusterView(gen uint64) *api.ClusterView {
	s := c.snap.Load()
	st := s.fsmState()
	c.mu.Lock()
	v := c.viewLocked(c.liveView(c.clk.Now()))
	waiting := c.waiting
	c.mu.Unlock()
	img := "none"
	if v.Runnable {
		img = failover.Image{Generation: v.RunnableGen, Epoch: v.RunnableEpoch, Live: v.RunnableLive}.String()
		if r := failover.IneligibleReason(v); r != "" {
			img += "; cannot resume: " + r
		} else {
			img += "; can resume"
		}
	}
	return &api.ClusterView{ID: c.ID(), Generation: st.Generation, Primary: st.Primary, Leader: s.leader,
		Protected: st.Protected, Epoch: st.Epoch, CanRelease: c.CanRelease(gen), Image: img, Waiting: waiting}
}
