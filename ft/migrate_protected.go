package ft

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// A pair primary moves its protected guest by post-copy only: its epoch
// loop goes on protecting it through the precopy rounds (the migration
// takes its dirty pages from the loop's syncs, precopy.DirtyTap); at the
// switch the loop ships a final epoch the secondary acknowledges, the
// secondary hears of the move on a move notice, and the destination
// holds the guest's output until the move completes, when the secondary
// retires (docs/POSTCOPY.md, "A protected guest").

// pairMove is a pair primary's move of its protected guest.
type pairMove struct {
	n       *Node
	member  *Member
	loop    *failover.EpochLoop // the guest's loop: the tap's source, the final epoch's shipper
	pair    *PairCoordinator
	secAddr string
	id, to  string
	g       guest.Guest
	cfg     guest.Config

	// mu guards the fields below (set at the switch, on the migration's
	// goroutine; read by Close).
	mu sync.Mutex
	// final: the final epoch was shipped (the guest paused for the
	// switch); epoch is its number, which the secondary holds and the
	// destination starts from.
	final  bool
	epoch  uint64
	notice *replica.MoveNotice
	// retired: the secondary answered the commit (POST /migrate/moved
	// says so); released is closed (once) when the destination says it
	// released the output (migrate_released.go).
	retired      bool
	released     chan struct{}
	releasedOnce sync.Once
}

// moveCommitTimeout bounds the secondary's answer to the move's commit.
const moveCommitTimeout = 10 * time.Second

// protectedRefusal says why a protected guest's migration request is
// refused ("": it is not). pairPrimary: the node is a pair primary, the
// only protected node that may move its guest.
func protectedRefusal(pairPrimary, clustered bool, req migrateRequest, disk string) error {
	switch {
	case clustered:
		return errors.New("this guest is protected in a raft or etcd cluster: moving it to a third host is a membership change, which is not built; use switchover")
	case !pairPrimary:
		return errors.New("this node is a protected guest's secondary, not its primary: migrate the primary")
	case !req.Postcopy:
		return errors.New("this guest is protected by a secondary: migrate it with --postcopy (the destination holds its output until the move completes, so the secondary stays a safe fallback)")
	case disk != "":
		// The epoch loop hands every disk write to the secondary, so a
		// move would carry none of them to the destination's disk.
		return fmt.Errorf("this guest is protected by a secondary and has a disk (%s): a protected guest with a disk cannot move (its epoch loop takes the disk writes the destination would need)", disk)
	}
	return nil
}

// startPairMove, for a protected guest, checks that the destination
// holds the guest's output (link, granted post-copy: pcGranted) and that
// the guest is protected now, then points core (the migration's) at the
// loop's dirty syncs and arms m; it answers a refusal and returns ok
// false (the caller closes the link). An unprotected guest: nil, ok.
func (n *Node) startPairMove(w http.ResponseWriter, protected bool, to, id, pcRefused string, link precopy.Link, pcGranted bool,
	core *precopy.Core, m *precopy.Migration) (*pairMove, bool) {
	if !protected {
		return nil, true
	}
	if rl, _ := link.(*replica.Link); !pcGranted || rl == nil || !rl.HoldsOutput() {
		WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("%s does not hold the guest's output until the move completes (post-copy refused: %s; or an older build), so a protected guest cannot move there; it stays here, protected",
			to, cmp.Or(pcRefused, "no")))
		return nil, false
	}
	n.mu.Lock()
	pm := &pairMove{n: n, member: n.pairMember, loop: n.epochs, pair: n.pair, id: id, to: to, g: n.g, cfg: n.cfg, released: make(chan struct{})}
	n.mu.Unlock()
	if pm.member == nil || pm.loop == nil || pm.pair == nil {
		WriteError(w, http.StatusConflict, api.CodeNotPrimary, errors.New("not a pair primary"))
		return nil, false
	}
	if st := pm.loop.Status(); !st.Protected {
		WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("this guest is not protected now (%s: %s): migrate once it is", st.Protection, st.ProtectionReason))
		return nil, false
	}
	tap := precopy.NewDirtyTap(core.Dirty.Len())
	pm.loop.SetDirtyTap(tap) // before the migration's first sync
	core.From = tap
	pm.arm(m)
	return pm, true
}

// switchNow is the migration's BeforeSwitch: the loop ships a final
// epoch (the guest stays paused) the secondary acknowledges, then the
// secondary is told of the move. An error before the final epoch leaves
// the guest running under its loop; after it, ResumeOnFailure resumes it.
func (pm *pairMove) switchNow() (time.Time, error) {
	ctx, cancel := context.WithTimeout(context.Background(), SwitchoverTimeout)
	defer cancel()
	pausedAt, err := pm.loop.FinalEpochPaused(ctx)
	if err != nil {
		return time.Time{}, fmt.Errorf("final epoch to the secondary: %w", err)
	}
	st := pm.loop.Status()
	pm.mu.Lock()
	pm.final, pm.epoch, pm.secAddr = true, st.LastCommittedEpoch, st.Secondary
	pm.mu.Unlock()
	hello := replica.Hello{Kind: pm.g.Kind(), Config: pm.cfg, MigrationID: pm.id, Destination: pm.to, FinalEpoch: st.LastCommittedEpoch}
	o := replica.DialOptions{TLS: pm.n.trust.ID, Insecure: pm.n.trust.Insecure, Expect: pm.pair.SecondaryName(st.Secondary)}
	notice, err := replica.OpenMoveNotice(ctx, st.Secondary, hello, o)
	if err != nil {
		return pausedAt, err
	}
	pm.mu.Lock()
	pm.notice = notice
	pm.mu.Unlock()
	pm.n.log.Info("moving a protected guest: the secondary holds the final epoch and knows of the move", "migration", pm.id, "to", pm.to, "secondary", st.Secondary, "epoch", st.LastCommittedEpoch)
	return pausedAt, nil
}

// arm sets m's hooks: the switch goes through switchNow; a failure
// before the commit resumes the guest here under a new loop if the
// final epoch paused it (the secondary forgets the move); a completion
// first retires the secondary.
func (pm *pairMove) arm(m *precopy.Migration) {
	m.BeforeSwitch = pm.switchNow
	m.ResumeOnFailure = pm.resume
	m.BeforeComplete = func() error {
		pm.mu.Lock()
		notice, epoch := pm.notice, pm.epoch
		pm.mu.Unlock()
		if err := notice.Commit(moveCommitTimeout); err != nil {
			return fmt.Errorf("the secondary %s was not retired (%w): it may still take over from epoch %d, so the destination keeps its output held", pm.secAddr, err, epoch)
		}
		pm.retiredAwaitRelease()
		return nil
	}
}

// resume is the migration's ResumeOnFailure (before its commit).
func (pm *pairMove) resume() {
	pm.loop.SetDirtyTap(nil)
	pm.mu.Lock()
	final, notice := pm.final, pm.notice
	pm.mu.Unlock()
	if !final {
		return // the guest never paused for the switch: it runs on under its loop
	}
	if notice != nil {
		notice.Abort("the migration failed before its commit; the guest runs on the primary again")
	}
	if fenced, why := pm.loop.Fenced(); fenced {
		// The secondary was activated meanwhile (forced): it runs the
		// guest, so this copy stays paused for good.
		pm.member.log.Error("the move failed and the secondary was activated meanwhile: the guest stays paused here", "why", why)
		return
	}
	pm.member.restartAfterFailedHandover()
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
	pm.mu.Lock()
	epoch := pm.epoch
	pm.mu.Unlock()
	n.setStateWhy("postmigrate", fmt.Sprintf("the guest moved to %s by migration %s; its secondary %s retired (its epoch %d is stale)", pm.to, pm.id, pm.secAddr, epoch))
}

// stopLoopMoved ends the epoch loop of a guest that moved away: the
// guest stays paused here, nothing more is shipped or released.
func (m *Member) stopLoopMoved() {
	loop, cancel, done := m.takeLoop()
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
	if pm == nil {
		return
	}
	pm.mu.Lock()
	notice := pm.notice
	pm.mu.Unlock()
	if notice != nil {
		notice.Close()
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
