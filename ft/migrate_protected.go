package ft

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// A pair primary moves its protected guest by post-copy only, from a
// final epoch its secondary holds, to a destination that holds the
// guest's output until the move completes; the secondary hears of the
// move on a move notice and retires when it completes
// (docs/POSTCOPY.md, "A protected guest").

// pairMove is a pair primary's move of its protected guest.
type pairMove struct {
	member  *Member
	loop    *failover.EpochLoop // the loop that shipped the final epoch
	secAddr string
	id, to  string
	// epoch is the final epoch, which the secondary holds and the
	// destination starts from.
	epoch  uint64
	notice *replica.MoveNotice
}

// moveCommitTimeout bounds the secondary's answer to the move's commit.
const moveCommitTimeout = 10 * time.Second

// protectedRefusal says why a protected guest's migration request is
// refused ("": it is not). pairPrimary: the node is a pair primary, the
// only protected node that may move its guest.
func protectedRefusal(pairPrimary, clustered bool, req migrateRequest, pcRounds int, disk string) error {
	switch {
	case clustered:
		return errors.New("this guest is protected in a raft or etcd cluster: moving it to a third host is a membership change, which is not built; use switchover")
	case !pairPrimary:
		return errors.New("this node is a protected guest's secondary, not its primary: migrate the primary")
	case !req.Postcopy:
		return errors.New("this guest is protected by a secondary: migrate it with --postcopy --postcopy-after-rounds 0 (the destination holds its output until the move completes, so the secondary stays a safe fallback)")
	case pcRounds != 0:
		return fmt.Errorf("this guest is protected by a secondary: --postcopy-after-rounds must be 0, not %d (its epoch loop owns the dirty log, so no precopy rounds run beside it)", pcRounds)
	case disk != "":
		// The epoch loop hands every disk write to the secondary, so a
		// move would carry none of them to the destination's disk.
		return fmt.Errorf("this guest is protected by a secondary and has a disk (%s): a protected guest with a disk cannot move (its epoch loop takes the disk writes the destination would need)", disk)
	}
	return nil
}

// startPairMove, for a protected guest, checks that the destination
// holds the guest's output (link, granted post-copy: pcGranted), then
// begins the move and arms m; it answers a refusal and returns ok false
// (the caller closes the link). An unprotected guest: nil, ok.
func (n *Node) startPairMove(w http.ResponseWriter, protected bool, to, id, pcRefused string, link precopy.Link, pcGranted bool,
	g guest.Guest, cfg guest.Config, m *precopy.Migration) (*pairMove, bool) {
	if !protected {
		return nil, true
	}
	if rl, _ := link.(*replica.Link); !pcGranted || rl == nil || !rl.HoldsOutput() {
		WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("%s does not hold the guest's output until the move completes (post-copy refused: %s; or an older build), so a protected guest cannot move there; it stays here, protected",
			to, cmp.Or(pcRefused, "no")))
		return nil, false
	}
	pm, err := n.beginPairMove(id, to, g, cfg)
	if err != nil {
		WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("the guest stays here, protected: %w", err))
		return nil, false
	}
	pm.arm(m)
	return pm, true
}

// beginPairMove pauses the guest in a final epoch the secondary
// acknowledges, then tells the secondary of the move (migration id to
// to). On error the guest runs on here, protected again.
func (n *Node) beginPairMove(id, to string, g guest.Guest, cfg guest.Config) (*pairMove, error) {
	n.mu.Lock()
	member, loop, pair := n.pairMember, n.epochs, n.pair
	n.mu.Unlock()
	if member == nil || loop == nil || pair == nil {
		return nil, errors.New("not a pair primary")
	}
	st := loop.Status()
	if !st.Protected {
		return nil, fmt.Errorf("this guest is not protected now (%s: %s): migrate once it is", st.Protection, st.ProtectionReason)
	}
	secAddr := st.Secondary
	ctx, cancel := context.WithTimeout(context.Background(), SwitchoverTimeout)
	defer cancel()
	n.net.stopAnnouncing()
	if err := loop.FinalEpoch(ctx); err != nil {
		return nil, fmt.Errorf("final epoch to the secondary: %w", err)
	}
	pm := &pairMove{member: member, loop: loop, secAddr: secAddr, id: id, to: to, epoch: loop.Status().LastCommittedEpoch}
	hello := replica.Hello{Kind: g.Kind(), Config: cfg, MigrationID: id, Destination: to, FinalEpoch: pm.epoch}
	notice, err := replica.OpenMoveNotice(ctx, secAddr, hello, replica.DialOptions{TLS: n.trust.ID, Insecure: n.trust.Insecure, Expect: pair.SecondaryName(secAddr)})
	if err != nil {
		member.restartAfterFailedHandover()
		return nil, err
	}
	pm.notice = notice
	n.log.Info("moving a protected guest: the secondary holds the final epoch and knows of the move", "migration", id, "to", to, "secondary", secAddr, "epoch", pm.epoch)
	return pm, nil
}

// arm sets m's hooks: a failure before the commit resumes the guest here
// under a new loop (the secondary forgets the move); a completion first
// retires the secondary.
func (pm *pairMove) arm(m *precopy.Migration) {
	m.ResumeOnFailure = func() {
		pm.notice.Abort("the migration failed before its commit; the guest runs on the primary again")
		if fenced, why := pm.loop.Fenced(); fenced {
			// The secondary was activated meanwhile (forced): it runs
			// the guest, so this copy stays paused for good.
			pm.member.log.Error("the move failed and the secondary was activated meanwhile: the guest stays paused here", "why", why)
			return
		}
		pm.member.restartAfterFailedHandover()
	}
	m.BeforeComplete = func() error {
		if err := pm.notice.Commit(moveCommitTimeout); err != nil {
			return fmt.Errorf("the secondary %s was not retired (%w): it may still take over from epoch %d, so the destination keeps its output held", pm.secAddr, err, pm.epoch)
		}
		return nil
	}
}

// finished is told how the move's migration ended (its final status).
// Completed: the guest runs at the destination and the secondary has
// retired, so the epoch loop stops here for good. Otherwise the notice
// stays open while this process lives (after a commit this guest never
// runs here again, and the secondary must not take over while this node
// may still serve the destination's pages); a failure has already
// resumed the guest here.
func (n *Node) pairMoveFinished(pm *pairMove, st precopy.MigrationStatus) {
	if st.Status != precopy.StatusCompleted {
		return
	}
	pm.member.stopLoopMoved()
	n.setStateWhy("postmigrate", fmt.Sprintf("the guest moved to %s by migration %s; its secondary %s retired (its epoch %d is stale)", pm.to, pm.id, pm.secAddr, pm.epoch))
}

// stopLoopMoved ends the epoch loop of a guest that moved away: the
// guest stays paused here, nothing more is shipped or released.
func (m *Member) stopLoopMoved() {
	m.mu.Lock()
	loop, cancel, done := m.loop, m.loopCancel, m.loopDone
	m.loop, m.loopCancel, m.loopDone = nil, nil, nil
	m.mu.Unlock()
	if loop == nil {
		return
	}
	loop.Gate().Discard()
	cancel()
	m.waitLoop(done)
	m.n.mu.Lock()
	m.n.epochs = nil
	m.n.mu.Unlock()
}

// closeMove closes a move notice left open (the node stops).
func (n *Node) closeMove() {
	n.mu.Lock()
	pm := n.pairMove
	n.pairMove = nil
	n.mu.Unlock()
	if pm != nil && pm.notice != nil {
		pm.notice.Close()
	}
}

// moveReason is a secondary's state_reason once it heard a move notice.
func moveReason(mv replica.Move) string {
	switch {
	case mv.Done:
		return fmt.Sprintf("retired: the guest moved to %s by migration %s after epoch %d (held here, stale now); activation is refused", mv.Destination, mv.MigrationID, mv.Epoch)
	case mv.Open:
		return fmt.Sprintf("the primary is moving the guest to %s by post-copy migration %s from epoch %d, held here: the fallback if the primary dies before the move completes; activation is refused while the primary is heard", mv.Destination, mv.MigrationID, mv.Epoch)
	}
	return fmt.Sprintf("the primary's notice of migration %s to %s ended without an outcome: if the primary is dead, activation falls back to epoch %d held here, and the half guest on %s is to be discarded", mv.MigrationID, mv.Destination, mv.Epoch, mv.Destination)
}
