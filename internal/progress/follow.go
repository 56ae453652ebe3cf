package progress

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/precopy"
)

// Watch is how Follow shows one migration.
type Watch struct {
	Out io.Writer
	// TTY redraws one bar in place; otherwise a Line is written at most
	// once a second, and once at the end.
	TTY bool
	// Patience: give up following (the migration goes on) after this long.
	Patience time.Duration
	// Limit is the downtime limit the summary judges against.
	Limit time.Duration
	// JSON writes the final status as JSON instead of the summary.
	JSON bool
}

// pollInterval is how often Follow asks the node.
const pollInterval = 200 * time.Millisecond

// Follow polls a node's status and shows its migration's progress until
// the migration ends, then the summary (or the status as JSON). A failed
// migration, or one whose outcome is unknown, is an error saying where the
// guest runs.
func Follow(ctx context.Context, c *api.Client, w Watch) error {
	deadline := time.Now().Add(w.Patience)
	var last time.Time
	var tr Tracker
	for {
		st, err := c.Status(ctx, false)
		if err != nil {
			return fmt.Errorf("follow migration: %w", err)
		}
		done := st.Status == precopy.StatusCompleted || st.Status == precopy.StatusFailed || st.Status == precopy.StatusUnknown ||
			st.Status == precopy.StatusPostcopyPaused
		ms := st.MigrationStatus
		pct, eta, etaOK := tr.Observe(Sample{At: time.Now(), Transferred: ms.TransferredBytes, Remaining: ms.RemainingBytes,
			Total: ms.TotalBytes, Mbps: ms.Mbps, Done: ms.Status == precopy.StatusCompleted})
		where := fmt.Sprintf("%5.1f%% %s", pct, FormatETA(eta, etaOK))
		if w.TTY {
			fmt.Fprintf(w.Out, "\r\033[K%s %s", where, Bar(ms, pct))
			if done {
				fmt.Fprintln(w.Out)
			}
		} else if done || time.Since(last) >= time.Second {
			fmt.Fprintln(w.Out, where+" "+Line(ms))
			last = time.Now()
		}
		if done {
			return w.end(st)
		}
		if ms.PostcopyActive {
			// The guest runs on the destination; the pages follow
			// for as long as the link needs (--max-time bounded
			// precopy only), and a lost link ends the run.
			deadline = time.Now().Add(w.Patience)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("migration still %s after %v; gave up following it", st.Status, w.Patience)
		}
		time.Sleep(pollInterval)
	}
}

// end writes an ended migration's summary and says how it ended.
func (w Watch) end(st api.Status) error {
	if w.JSON {
		enc := json.NewEncoder(w.Out)
		enc.SetIndent("", "  ")
		enc.Encode(st)
	} else {
		WriteSummary(w.Out, st.MigrationStatus, w.Limit)
	}
	switch st.Status {
	case precopy.StatusFailed:
		return fmt.Errorf("migration %s (the guest keeps running on the source): %s", cmp.Or(st.Outcome, "failed"), st.Error)
	case precopy.StatusUnknown:
		return fmt.Errorf("migration outcome %s: the destination resumes once it learns of the commit (it asks the source's API), or by POST /migrate/commit on it: %s", st.Outcome, st.Error)
	case precopy.StatusPostcopyPaused:
		return fmt.Errorf("post-copy of migration %s paused: the link to the destination was lost at %s (%s) with %d pages owed; the guest runs on the destination, waiting for them; `tandem migrate --resume --from API` continues it",
			st.MigrationID, st.PostcopyLinkDownSince, st.PostcopyLinkError, st.PostcopyRemainingPages)
	}
	return nil
}
