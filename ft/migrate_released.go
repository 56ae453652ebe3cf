package ft

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/tandemvm/tandem/api"
)

// A protected move's source reports completed only once the destination
// has released the guest's output (or a bound passed): the destination
// asks POST /migrate/moved whether the secondary retired, releases when
// it has, and says so on the same request. Before, the source reported
// completed as soon as the secondary retired, and a source stopped right
// after `tandem migrate` exited 0 could leave the destination, which
// learned of the completion only from the source's status, holding for
// good (rev2's finding 3). The destination's status polling stays as the
// fallback.

// movedQuery is POST /migrate/moved's body: the destination's migration,
// and whether it has released the held output.
type movedQuery struct {
	MigrationID string `json:"migration_id"`
	Released    bool   `json:"released,omitempty"`
}

// movedAnswer is its answer: the secondary retired (the output may go).
type movedAnswer struct {
	Retired bool `json:"retired"`
}

// destReleaseTimeout bounds the source's wait for the destination's
// release once the secondary retired. The destination asks every
// moveCheck; past this, the source reports completed anyway (and the
// destination releases on its status).
const destReleaseTimeout = 5 * time.Second

// handleMigrateMoved is POST /migrate/moved on a source moving a
// protected guest. A false released claim costs only an earlier
// completion report, never a release: the destination releases on the
// answer, which says only what this source knows.
func (n *Node) handleMigrateMoved(w http.ResponseWriter, r *http.Request) {
	var q movedQuery
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<12)).Decode(&q); err != nil {
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("want {\"migration_id\": ID, \"released\": BOOL}: %v", err))
		return
	}
	n.mu.Lock()
	pm := n.pairMove
	n.mu.Unlock()
	if pm == nil || pm.id != q.MigrationID {
		WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("no protected move of migration %q here", q.MigrationID))
		return
	}
	pm.mu.Lock()
	retired := pm.retired
	pm.mu.Unlock()
	if retired && q.Released {
		pm.releasedOnce.Do(func() { close(pm.released) })
	}
	WriteJSON(w, http.StatusOK, movedAnswer{Retired: retired})
}

// retiredAwaitRelease marks the secondary retired (the destination may
// release now) and waits, up to destReleaseTimeout, for the
// destination to say it released.
func (pm *pairMove) retiredAwaitRelease() {
	pm.mu.Lock()
	pm.retired = true
	pm.mu.Unlock()
	t := time.NewTimer(destReleaseTimeout)
	defer t.Stop()
	select {
	case <-pm.released:
		pm.n.log.Info("the destination released the moved guest's output", "migration", pm.id)
	case <-t.C:
		pm.n.log.Warn("the destination has not said it released the moved guest's output; reporting completed anyway (it releases once it reads that)",
			"migration", pm.id, "waited", destReleaseTimeout)
	}
}

// noticeLost is a moving source's state_reason while its move notice to
// the secondary is down ("" while it is up, or no move): the secondary
// does not hear this primary then and may be activated without --force,
// after which the move cannot complete.
func (pm *pairMove) noticeLost() string {
	if pm == nil {
		return ""
	}
	pm.mu.Lock()
	notice := pm.notice
	pm.mu.Unlock()
	if notice == nil {
		return ""
	}
	why, since := notice.Lost()
	if why == "" {
		return ""
	}
	return fmt.Sprintf("moving the guest to %s by migration %s, but the move notice to the secondary %s is down (%s, since %s): the secondary does not hear this primary and may be activated",
		pm.to, pm.id, pm.secAddr, why, since.UTC().Format(time.RFC3339))
}

// pausedProtectedAdvice ends a protected move's post-copy-paused outcome:
// resuming is right only if the destination still runs its half guest.
// One that restarted or is gone released nothing (it held all output),
// and the guest's fallback is the secondary, which does not take over
// while this source heartbeats its move notice.
const pausedProtectedAdvice = "; this guest is protected: if the destination restarted or is gone for good (its copy released nothing), fall back to the secondary instead: stop this primary (its move notice ends) and activate the secondary"
