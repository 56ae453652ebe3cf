package ft

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// outputHold is a destination's hold on the output of a guest moved from
// a protected source (Hello.HoldOutput): everything the guest says, on
// its console and its network card, waits in an output gate until the
// source reports the migration completed. Until then the source's
// secondary may still take over from the epoch the move started at, and
// nothing said here may have left (docs/POSTCOPY.md, "A protected
// guest").
type outputHold struct {
	gate *failover.OutputGate
	id   string // the migration

	// discarded (set once, never cleared) stops every release: the
	// operator dropped this copy (its source's secondary took over).
	discarded atomic.Bool

	mu       sync.Mutex
	why      string      // status' state_reason while held
	src      *api.Client // the source's API, once releaseWhenMoved asks it
	released bool
	// discarding: an operator's discard is asking the source for its
	// verdict; no release happens meanwhile (resolveHold).
	discarding bool
	// announce, if set, is the guest card's announcement, deferred to
	// the release: a gratuitous ARP is output too, and one sent while
	// the source's secondary may still take over would pull the guest's
	// traffic here from it.
	announce func()
}

// holdOutput routes g's output into a holding gate, for migration h
// (BeforeResume: the guest has not run here yet).
func (n *Node) holdOutput(g guest.Guest, h replica.Hello) {
	hold := &outputHold{id: h.MigrationID,
		why: "output held: the source is protected by a secondary, so nothing this guest says leaves until every page has arrived and the source reports migration " + h.MigrationID + " completed"}
	// Holds until Hold(false); nothing at all once discarded.
	gate := failover.NewOutputGate(1, n.console.release, func() bool { return !hold.discarded.Load() })
	hold.gate = gate
	gate.SetFrameSink(n.net.send)
	g.Console().SetOutput(gate.Write)
	if nic := guest.NICOf(g); nic != nil {
		nic.SetTransmit(gate.WriteFrame)
	}
	n.mu.Lock()
	n.hold = hold
	n.mu.Unlock()
	n.log.Info("post-copy from a protected source: the guest's output is held until the source reports the migration completed", "migration", h.MigrationID)
}

// reason is the hold's state_reason ("" once released), with the
// output the gate's bounds dropped meanwhile.
func (o *outputHold) reason() string {
	if o == nil {
		return ""
	}
	o.mu.Lock()
	released, why := o.released, o.why
	o.mu.Unlock()
	if released {
		return ""
	}
	if c, f := o.gate.ConsoleDropped(), o.gate.FramesDropped(); c > 0 || f > 0 {
		why += fmt.Sprintf("; dropped over the hold's bounds: %d console bytes, %d network frames", c, f)
	}
	return why
}

func (o *outputHold) setWhy(why string) {
	o.mu.Lock()
	o.why = why
	o.mu.Unlock()
}

// release lets everything held out, in order, and passes what follows;
// then the card announces itself. It returns false, releasing nothing,
// while a discard is being decided or once one was.
func (o *outputHold) release() bool {
	o.mu.Lock()
	if o.discarding || o.discarded.Load() {
		o.mu.Unlock()
		return false
	}
	first := !o.released
	o.released = true
	announce := o.announce
	o.mu.Unlock()
	o.gate.Hold(false)
	if first && announce != nil {
		announce()
	}
	return true
}

// announceOrDefer announces nic now, unless a hold is in force: then at
// its release (never if it is discarded).
func (n *Node) announceOrDefer(nic guest.NIC) {
	n.mu.Lock()
	hold := n.hold
	n.mu.Unlock()
	if hold != nil {
		hold.mu.Lock()
		if !hold.released {
			hold.announce = func() { n.net.announce(nic) }
			hold.mu.Unlock()
			return
		}
		hold.mu.Unlock()
	}
	n.net.announce(nic)
}

// dropHold discards a hold's output (the guest here is dropped).
func (n *Node) dropHold() {
	n.mu.Lock()
	hold := n.hold
	n.hold = nil
	n.mu.Unlock()
	if hold != nil {
		hold.gate.Discard()
	}
}

// moveCheck is how often a held destination asks its source, once its
// pages are in (or stopped coming): often, since a source that dies
// between its secondary's retirement and this question leaves the
// destination holding for good.
const moveCheck = 100 * time.Millisecond

// releaseWhenMoved, on a destination holding output (holdOutput), asks
// the source's API every moveCheck until it reports the migration
// completed, then releases; it returns then, or when ctx ends. While it
// waits, the hold's reason says what the source answers: a source that
// cannot be reached may be dead, and its secondary may have taken the
// guest over from before anything here was said, so this copy never
// releases on a guess.
func (n *Node) releaseWhenMoved(ctx context.Context, res *replica.MigrationResult) {
	n.mu.Lock()
	hold := n.hold
	n.mu.Unlock()
	if hold == nil {
		return
	}
	src := n.sourceClient(res)
	hold.mu.Lock()
	hold.src = src
	hold.mu.Unlock()
	tick := time.NewTicker(moveCheck)
	defer tick.Stop()
	for {
		if hold.discarded.Load() || hold.reason() == "" {
			return // discarded, or released by hand
		}
		done, why := n.moveVerdict(ctx, src, hold.id)
		if done && hold.release() {
			n.log.Info("the source reports its secondary retired: the held output is released", "migration", hold.id)
			// The source reports completed once it hears this (or after
			// destReleaseTimeout): best effort.
			if err := src.Post(ctx, "/migrate/moved", movedQuery{MigrationID: hold.id, Released: true}, nil); err != nil {
				n.log.Warn("could not tell the source the output is released; it reports completed after its wait", "err", err)
			}
			return
		}
		if !done {
			hold.setWhy(why)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// moveVerdict asks the source (src) whether migration id completed, and
// says why the output stays held if not.
func (n *Node) moveVerdict(ctx context.Context, src *api.Client, id string) (bool, string) {
	var remaining uint64
	if n.pcIn != nil {
		var ns nodeStatus
		n.pcIn.fill(&ns)
		remaining = ns.PostcopyRemainingPages
	}
	held := fmt.Sprintf("output held (migration %s from a protected source, %d pages still missing): nothing this guest said has left this node; ", id, remaining)
	if src == nil {
		return false, held + "the source gave no API to ask, so it is never released"
	}
	var moved movedAnswer
	if err := src.Post(ctx, "/migrate/moved", movedQuery{MigrationID: id}, &moved); err == nil && moved.Retired {
		return true, ""
	}
	st, err := src.Status(ctx, false)
	switch {
	case err != nil:
		return false, held + "the source is unreachable (" + err.Error() + "); if it died, its secondary is the fallback: once that secondary is activated this copy is to be discarded"
	case st.MigrationID != id:
		return false, held + fmt.Sprintf("the source reports migration %q, not %q (restarted?)", st.MigrationID, id)
	case st.Status == precopy.StatusCompleted:
		return true, ""
	case st.PostcopyActive:
		// The source's status is "device" from its switch on; what it
		// does meanwhile is serve the pages.
		return false, held + "the source has not finished the move: it serves the pages until every one is here, then retires its secondary, and then the output is released"
	}
	return false, held + "the source says status " + st.Status + " (" + st.Outcome + "), not completed"
}

// resolveHold is POST /migrate/commit (release) or /migrate/abort
// (discard) on a destination holding a protected source's guest's output
// by hand, for when the source cannot say completed: it died (its
// secondary took over: abort) or its secondary cannot be told (it is
// known stopped: commit). Both need {"force": true} unless the source
// reports completed, after which an abort is refused (this is the only
// copy: the secondary retired). It answers and returns true if a hold
// is in force; false leaves the request to the caller.
func (n *Node) resolveHold(w http.ResponseWriter, r *http.Request, commit, force bool) bool {
	n.mu.Lock()
	hold := n.hold
	n.mu.Unlock()
	if hold == nil || hold.discarded.Load() || hold.reason() == "" {
		return false
	}
	hold.mu.Lock()
	src := hold.src
	if !commit {
		// No release while the source is asked: a verdict of not moved
		// followed by a release before the discard would let out the
		// output of a copy that is then discarded (or the other way).
		if hold.released || hold.discarding {
			hold.mu.Unlock()
			WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("refusing to discard: the output was released meanwhile, or another discard is being decided"))
			return true
		}
		hold.discarding = true
		defer func() {
			hold.mu.Lock()
			hold.discarding = false
			hold.mu.Unlock()
		}()
	}
	hold.mu.Unlock()
	done, why := n.moveVerdict(r.Context(), src, hold.id)
	switch {
	case done && !commit:
		WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("refusing to discard: the source reports the move completed and its secondary retired, so this is the only copy"))
		return true
	case !done && !force:
		WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("the source has not reported the move completed: %s; repeat with {\"force\": true} only once its secondary is known to be stopped (to release here) or activated (to discard here)", why))
		return true
	case commit:
		if !done {
			n.log.Error("FORCED release of a protected guest's held output without the source's word", "migration", hold.id, "detail", why)
		}
		if !hold.release() {
			WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("refusing to release: this copy is being discarded"))
			return true
		}
		WriteJSON(w, http.StatusOK, map[string]any{"ok": true, "released": true})
		return true
	}
	hold.discarded.Store(true)
	hold.gate.Discard()
	n.console.dropAll()
	reason := "discarded by the operator: the source's secondary took the guest over (or it was given up); this half guest released no output and never will; stop this process to free it"
	n.setStateWhy("discarded", reason)
	n.log.Error("DISCARDED: the held half guest of migration "+hold.id+" never releases anything", "detail", why)
	WriteJSON(w, http.StatusOK, map[string]any{"ok": true, "discarded": true})
	return true
}
