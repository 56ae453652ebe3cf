package ft

import (
	"context"
	"fmt"

	"github.com/tandemvm/tandem/failover"
)

// claimProtection records with the coordinator that loop's secondary
// holds every acknowledged epoch, if loop is still this node's loop and
// protected when the record's turn comes. Records are ordered (protSem)
// and this one waits for the coordinator's answer however long it takes
// (until the member stops): a "protected" whose apply was given up while
// still on its way to raft's log could land after the "unprotected" that
// let held output out, and the secondary would then take over from an
// epoch older than output already released. That lost writes in tandem
// drill (a lease-fenced primary, primary again in the same term, took its
// Unprotect fast path while the "protected" of its previous link was
// still uncommitted).
func (m *Member) claimProtection(loop *failover.EpochLoop) {
	select {
	case m.protSem <- struct{}{}:
	case <-m.ctx.Done():
		return
	}
	defer func() { <-m.protSem }()
	if m.currentLoop() != loop || !loop.Status().Protected {
		return
	}
	m.claimed = true
	if err := m.coord.SetProtected(m.ctx, true); err != nil {
		m.log.Warn("cannot record protection", "err", err)
	}
}

// unprotect records with the coordinator that the secondary may miss
// output about to be released. It is skipped only when the coordinator's
// state says unprotected and no "protected" of this node may still be on
// its way there.
func (m *Member) unprotect(ctx context.Context) error {
	select {
	case m.protSem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("waiting for an earlier record of protection: %w", ctx.Err())
	}
	defer func() { <-m.protSem }()
	if !m.claimed && !m.coord.State().Protected {
		return nil
	}
	if err := m.coord.SetProtected(ctx, false); err != nil {
		return err
	}
	m.claimed = false
	return nil
}
