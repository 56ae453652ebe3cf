package ft

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/clock"
)

// handleSwitchover hands the guest to the secondary: one last epoch with
// the guest paused, acknowledged, then raft leadership moves.
func (m *Member) handleSwitchover(w http.ResponseWriter, r *http.Request) {
	loop := m.currentLoop()
	if loop == nil {
		WriteError(w, http.StatusConflict, api.CodeNotPrimary, errors.New("not the primary: switchover is asked of the primary's API"))
		return
	}
	if !loop.Status().Protected {
		WriteError(w, http.StatusConflict, api.CodeNotProtected, errors.New("not protected: the secondary has no current image to take over"))
		return
	}
	m.mu.Lock()
	busy := m.switching
	m.switching = true
	m.mu.Unlock()
	if busy {
		WriteError(w, http.StatusConflict, api.CodeBusy, errors.New("a switchover is already under way"))
		return
	}
	defer func() {
		m.mu.Lock()
		m.switching = false
		m.mu.Unlock()
	}()
	t0 := m.clk.Now()
	// The handover is not tied to the request: a client that goes away
	// (its HTTP timeout, a closed connection) must not leave the guest
	// paused between the final epoch and the transfer. It finishes, or
	// rolls back with the guest running here, within its own deadline.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), SwitchoverTimeout)
	defer cancel()
	if err := loop.FinalEpoch(ctx); err != nil {
		WriteError(w, http.StatusConflict, api.CodeInternal, fmt.Errorf("final epoch: %w", err))
		return
	}
	st := loop.Status()
	m.coord.ReportEpoch(st.LastCommittedEpoch)
	if err := m.coord.Switchover(ctx, ""); err != nil {
		// Still leader: raft claims a new generation and makes this node
		// primary again; the paused guest resumes with a new loop.
		m.restartAfterFailedHandover()
		WriteError(w, http.StatusConflict, api.CodeInternal, fmt.Errorf("switchover: %w", err))
		return
	}
	WriteJSON(w, http.StatusOK, map[string]any{"ok": true, "final_epoch": st.LastCommittedEpoch, "took_ms": clock.Since(m.clk, t0).Milliseconds()})
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
