package ft

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/clock"
)

// handleSwitchover hands the guest to the secondary: one last epoch with
// the guest paused, acknowledged, then raft leadership moves.
func (m *Member) handleSwitchover(w http.ResponseWriter, r *http.Request) {
	loop := m.currentLoop()
	if loop == nil {
		WriteError(w, http.StatusConflict, api.CodeNotPrimary, notPrimaryError(m.coord.State(), "switchover"))
		return
	}
	if !loop.Status().Protected {
		WriteError(w, http.StatusConflict, api.CodeNotProtected, errors.New("not protected: the secondary has no current image to take over"))
		return
	}
	final, took, err := m.switchover(context.WithoutCancel(r.Context()), loop)
	if err != nil {
		code := api.CodeInternal
		if errors.Is(err, errSwitching) {
			code = api.CodeBusy
		}
		WriteError(w, http.StatusConflict, code, err)
		return
	}
	WriteJSON(w, http.StatusOK, map[string]any{"ok": true, "final_epoch": final, "took_ms": took.Milliseconds()})
}

// notPrimaryError says that what was asked is the primary's to do, and
// which node that is as raft records it (its API address when known).
func notPrimaryError(st failover.FSMState, what string) error {
	if st.Primary == "" {
		return fmt.Errorf("not the primary: %s is asked of the primary's API, and raft records no primary yet", what)
	}
	if mem, ok := st.Member(st.Primary); ok && mem.APIAddr != "" {
		return fmt.Errorf("not the primary: %s is asked of the primary's API; the primary is %s (generation %d), API %s", what, st.Primary, st.Generation, mem.APIAddr)
	}
	return fmt.Errorf("not the primary: %s is asked of the primary's API; the primary is %s (generation %d)", what, st.Primary, st.Generation)
}

var errSwitching = errors.New("a switchover is already under way")

// switchover ships a final epoch with the guest paused and hands raft
// over; on failure the guest resumes here under a new loop. It is not
// tied to its caller's cancellation beyond ctx: it finishes, or rolls
// back with the guest running here, within SwitchoverTimeout (a client
// that goes away must not leave the guest paused between the final epoch
// and the transfer).
func (m *Member) switchover(ctx context.Context, loop *failover.EpochLoop) (final uint64, took time.Duration, err error) {
	m.mu.Lock()
	busy := m.switching
	m.switching = true
	m.mu.Unlock()
	if busy {
		return 0, 0, errSwitching
	}
	defer func() {
		m.mu.Lock()
		m.switching = false
		m.mu.Unlock()
	}()
	t0 := m.clk.Now()
	ctx, cancel := context.WithTimeout(ctx, SwitchoverTimeout)
	defer cancel()
	// As for a migration's final pause: from here the address is the
	// new primary's to announce, and a repeat from this node (fenced only
	// once it sees the new generation) would point the bridge back here.
	m.n.net.stopAnnouncing()
	if err := loop.FinalEpoch(ctx); err != nil {
		return 0, 0, fmt.Errorf("final epoch: %w", err)
	}
	st := loop.Status()
	m.coord.ReportEpoch(st.LastCommittedEpoch)
	if err := m.coord.Switchover(ctx, ""); err != nil {
		// Still leader: raft claims a new generation and makes this node
		// primary again; the paused guest resumes with a new loop.
		m.restartAfterFailedHandover()
		return 0, 0, fmt.Errorf("switchover: %w", err)
	}
	return st.LastCommittedEpoch, clock.Since(m.clk, t0), nil
}

// HandOverOnStop, on a protected primary, hands the guest to the
// secondary before the process stops (SIGTERM: a planned stop, not a
// failure), within timeout or until force ends. It returns at once on
// any other node; a failed or cut-short handover leaves the guest here
// (the plain stop that follows makes the secondary take over as after
// a crash).
func (m *Member) HandOverOnStop(force context.Context, timeout time.Duration) {
	loop := m.currentLoop()
	if loop == nil || timeout <= 0 {
		return
	}
	if !loop.Status().Protected {
		m.log.Warn("stopping an unprotected primary: no handover (the secondary holds no current image); the guest stops with this process")
		return
	}
	ctx, cancel := context.WithTimeout(force, timeout)
	defer cancel()
	m.log.Info("stopping: handing the guest over to the secondary first (a second SIGTERM or SIGINT stops at once)", "timeout", timeout)
	final, took, err := m.switchover(ctx, loop)
	if err != nil {
		m.log.Warn("handover before stopping failed; stopping without it (the secondary takes over as after a crash)", "err", err)
		return
	}
	m.log.Info("handed over before stopping", "final_epoch", final, "took", took)
}

// SwitchoverTimeout bounds a switchover from the request to the transfer
// (or the rollback).
const SwitchoverTimeout = 20 * time.Second

// restartAfterFailedHandover resumes the guest the final epoch left
// paused, under a new loop numbered after the old one's epochs: the
// coordinator is still this node's (a failed transfer leaves the leader
// in place) and makes it primary again under a new generation.
func (m *Member) restartAfterFailedHandover() {
	m.mu.Lock()
	loop, cancel, done := m.loop, m.loopCancel, m.loopDone
	m.mu.Unlock()
	if loop == nil {
		return
	}
	cancel()
	if !m.waitLoop(done) {
		return
	}
	m.n.mu.Lock()
	g, cfg := m.n.g, m.n.cfg
	m.n.mu.Unlock()
	m.mu.Lock()
	m.loop = nil
	m.lastEpoch = max(m.lastEpoch, loop.Status().LastShippedEpoch)
	first := m.lastEpoch
	m.mu.Unlock()
	loop = m.startLoop(g, cfg, first)
	if _, err := g.Resume(); err != nil {
		m.log.Error("resume the guest after a failed handover", "err", err)
	}
	if sec, ok := m.coord.Secondary(); ok {
		loop.SetSecondary(sec.DataAddr)
	}
}
