package progress

import (
	"cmp"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/tandemvm/tandem/precopy"
)

// Line is a migration's progress as one plain line (stdout not a
// terminal: a log reader or a test reads it).
func Line(s precopy.MigrationStatus) string {
	remaining := HumanBytes(s.RemainingBytes)
	if s.Round == 0 && s.RemainingBytes == 0 && s.Status != precopy.StatusCompleted {
		remaining = "?" // round 0 has not measured it yet
	}
	return fmt.Sprintf("status=%s round=%d sent=%s remaining=%s dirty_rate=%d pages/s mbps=%.1f expected_downtime=%dms throttle=%d%% aborted=%d",
		s.Status, s.Round, HumanBytes(s.TransferredBytes), remaining, s.DirtyPagesRate, s.Mbps,
		s.ExpectedDowntimeMs, s.ThrottlePercent, s.AbortedCompletions)
}

// Bar is a migration's progress as a terminal bar, percent of 100 filled.
func Bar(s precopy.MigrationStatus, percent float64) string {
	frac := percent / 100
	const width = 30
	filled := int(frac * width)
	filled = max(0, min(width, filled))
	return fmt.Sprintf("[%s%s] %-9s round %d  sent %s  left %s  dirty %d p/s  %.0f Mbit/s  exp. downtime %d ms",
		strings.Repeat("#", filled), strings.Repeat(".", width-filled), s.Status, s.Round,
		HumanBytes(s.TransferredBytes), HumanBytes(s.RemainingBytes), s.DirtyPagesRate, s.Mbps, s.ExpectedDowntimeMs)
}

// WriteSummary writes what an ended migration did: one line of figures,
// then the outcome, the downtime breakdown, the switchover digests and
// the error, each when there is one, and last the downtime verdict
// against limit when it was over.
func WriteSummary(w io.Writer, s precopy.MigrationStatus, limit time.Duration) {
	fmt.Fprintf(w, "migration %s in %d ms: downtime %d ms (limit %v), %s on the wire, %d completion attempts (%d aborted)\n",
		s.Status, s.TotalTimeMs, s.DowntimeMs, limit, HumanBytes(s.TransferredBytes), s.CompletionAttempts, s.AbortedCompletions)
	downtime := time.Duration(max(float64(s.DowntimeMs), s.DowntimeBreakdown.TotalMs) * float64(time.Millisecond))
	if v := DowntimeVerdict(downtime, limit); v != "" && s.Status == precopy.StatusCompleted {
		defer fmt.Fprintf(w, "  %s\n", v) // the final line
	}
	if s.Outcome != "" {
		fmt.Fprintf(w, "  outcome: %s\n", s.Outcome)
	}
	b := s.DowntimeBreakdown
	if b.Completed {
		fmt.Fprintf(w, "  downtime breakdown: pause %.2f, flush %.2f, dirty sync %.2f, state save %.2f, final send %.2f, destination load %.2f, resume %.2f = %.2f ms\n",
			b.PauseVCPUsMs, b.FlushMs, b.DirtySyncMs, b.StateSaveMs, b.FinalSendMs, b.DestinationLoadMs, b.ResumeMs, b.TotalMs)
	}
	if s.PostcopyPages > 0 && s.Status == precopy.StatusCompleted {
		// The destination's digest is taken as the last owed page
		// arrives; a completed post-copy means it matched.
		fmt.Fprintf(w, "  post-copy: %d pages owed at the switch, %d requested by faults; the destination's digest matched once every page arrived\n",
			s.PostcopyPages, s.PostcopyRequests)
		if s.PostcopyResumes > 0 {
			fmt.Fprintf(w, "  post-copy link lost and resumed %d times (tandem migrate --resume)\n", s.PostcopyResumes)
		}
	}
	if s.PostcopySwitchReason != "" {
		fmt.Fprintf(w, "  switched to post-copy (%s): %s\n", s.PostcopySwitchReason, s.PostcopySwitchWhy)
		for _, a := range s.Attempts {
			if strings.HasPrefix(a.Outcome, "post-copy switch") {
				fmt.Fprintf(w, "  switch pause: expected %.1f ms (%.1f ms after the final sync), actual %.1f ms: %s\n",
					a.ExpectedDowntimeMs, a.FinalExpectedMs, a.ActualDowntimeMs, a.Outcome)
			}
		}
	}
	if s.PostcopyRefused != "" {
		fmt.Fprintf(w, "  post-copy refused by the destination: %s\n", s.PostcopyRefused)
	}
	if s.SwitchoverDigest != "" {
		fmt.Fprintf(w, "  switchover digest: source %s, destination %s\n", s.SwitchoverDigest, cmp.Or(s.DestinationDigest, "(file)"))
	}
	if s.Error != "" {
		fmt.Fprintf(w, "  error: %s\n", s.Error)
	}
}

// HumanBytes is n in B, KiB, MiB or GiB.
func HumanBytes(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2fGiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fKiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}
