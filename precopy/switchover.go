package precopy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/clock"
)

// complete tries the stop-and-copy. It returns done=true when the
// destination has resumed the guest; done=false, err=nil when the attempt
// was aborted (the flush missed its budget, or the final sync left more
// than fits the limit) and the guest runs again on the source; err when
// the migration failed (the guest runs on the source).
func (m *Migration) complete(ctx context.Context, ctrl *Controller, start time.Time, expected time.Duration) (bool, error) {
	m.update(func(s *MigrationStatus) { s.Status = StatusDevice })
	if m.OnFinalPause != nil {
		m.OnFinalPause()
	}
	pauseStart := m.clk().Now()
	att := api.CompletionAttempt{ExpectedDowntimeMs: ms(expected)}
	budget := max(ctrl.FlushBudget(pauseStart, pauseStart), time.Millisecond)
	cp, err := m.core.Capture(ctx, CaptureOptions{FlushBudget: budget, KeepPaused: true, InPlace: true})
	if err != nil {
		if errors.Is(err, ErrFlushAborted) {
			att.ActualDowntimeMs, att.Outcome = ms(m.clk().Now().Sub(pauseStart)), "aborted: flush"
			m.addAttempt(att)
			m.completionAborted(ctrl, cp, err)
			return false, nil
		}
		return false, m.failed(start, err)
	}
	ctrl.ObserveStateSave(cp.Breakdown.StateSave)
	// The last point where the source can still take the guest back
	// without the destination: if what the final sync left cannot be sent
	// within the limit at the learned rate, resume here and go on with
	// rounds (the limit is a ceiling, not a target).
	att.FinalPages = uint64(len(cp.Pages))
	ctrl.ObserveFinalSync(att.FinalPages)
	paused := m.clk().Now().Sub(pauseStart)
	if send, ok := ctrl.PredictSend(att.FinalPages); ok {
		att.FinalExpectedMs = ms(paused + send)
		if paused+send > m.policy.DowntimeLimit {
			m.abortFinal(ctrl, cp, pauseStart, att, paused, send)
			return false, nil
		}
	}
	sendStart := m.clk().Now()
	if m.Postcopy != nil {
		// The destination reads a missing set before it resumes: none.
		if err := m.Postcopy.SendMissing(NewBitmap(m.core.Dirty.Len())); err != nil {
			return false, m.failed(start, fmt.Errorf("post-copy: send the (empty) missing set: %w", err))
		}
	}
	final, err := m.sendFinal(cp)
	if err != nil {
		return false, m.failed(start, err)
	}
	ack, acked, err := m.switchOver(ctx, final, start)
	if err != nil {
		return false, err
	}
	m.completed(ctrl, cp, ack, ack.Digest, start, pauseStart, sendStart, acked)
	st := m.Status()
	att.ActualDowntimeMs, att.FinalSendMs, att.Outcome = float64(st.DowntimeMs), st.DowntimeBreakdown.FinalSendMs, "completed"
	m.addAttempt(att)
	ctrl.ObserveFinalSend(att.FinalPages, time.Duration(st.DowntimeBreakdown.FinalSendMs*float64(time.Millisecond)))
	if !ack.Ready && !m.committed {
		// One-phase (a file, an older receiver): the stream ends here.
		// A two-phase stream ended with the commit line.
		m.link.Writer().EndStream()
		m.link.Flush()
	}
	return true, nil
}

// addAttempt appends an attempt to the status.
func (m *Migration) addAttempt(a api.CompletionAttempt) {
	m.update(func(s *MigrationStatus) { s.Attempts = append(s.Attempts, a) })
}

// abortFinal gives up an attempt after its final sync, before anything of
// it was sent: the pages it took go back to the bitmap, its disk writes
// wait for the next attempt's final send, and the guest resumes here.
func (m *Migration) abortFinal(ctrl *Controller, cp *Capture, pauseStart time.Time, att api.CompletionAttempt, paused, send time.Duration) {
	for _, p := range cp.Pages {
		m.core.Dirty.Set(p.Index)
	}
	m.pendingDisk = append(m.pendingDisk, cp.Disk...)
	cp.Pages, cp.Disk = nil, nil
	t0 := time.Now()
	d, err := m.core.G.Resume()
	cp.Breakdown.Resume = d
	m.core.observe(PhaseResume, t0, time.Since(t0))
	why := fmt.Errorf("final sync left %d pages: %v to send at the measured rate after %v paused, over the %v limit",
		att.FinalPages, send.Round(time.Millisecond), paused.Round(time.Millisecond), m.policy.DowntimeLimit)
	if err != nil {
		why = fmt.Errorf("%w; resume: %w", why, err)
	}
	att.ActualDowntimeMs, att.Outcome = ms(m.clk().Now().Sub(pauseStart)), "aborted: prediction"
	m.addAttempt(att)
	m.completionAborted(ctrl, cp, why)
}

// completionAborted records a stop-and-copy given up because the flush
// missed its budget; the guest runs again on the source.
func (m *Migration) completionAborted(ctrl *Controller, cp *Capture, err error) {
	ctrl.CompletionAborted(m.clk().Now(), err)
	m.update(func(s *MigrationStatus) {
		s.Status = StatusActive
		s.AbortedCompletions = ctrl.AbortedCompletions()
		b := cp.Breakdown
		s.DowntimeBreakdown = DowntimeBreakdown{
			PauseVCPUsMs: ms(b.Pause), FlushMs: ms(b.Flush), ResumeMs: ms(b.Resume), TotalMs: ms(b.Total()),
		}
	})
}

// sendFinal writes the paused guest's last pages, disk writes and device
// state (the pages beyond one epoch's worth in epochs of their own, the
// rest with the state in the final one) and returns the final epoch's
// number.
func (m *Migration) sendFinal(cp *Capture) (uint64, error) {
	w := m.link.Writer()
	pages := cp.Pages
	// Pages beyond one epoch's worth go as plain epochs first: the
	// destination stages an epoch and applies it when the epoch ends, so
	// one big final epoch is received, then applied, then acknowledged,
	// one after the other, while the live rounds the prediction was
	// measured on overlapped sending one epoch with applying the last.
	// (Measured: a 14,000-page final epoch took 2-3x its prediction.)
	// The guest stays paused, so the pages hold still; if the attempt
	// fails after these, the destination drops them with the rest.
	if chunk := max(m.EpochPages, 1); len(pages) > chunk {
		for len(pages) > chunk {
			if err := w.WritePages(pages[:chunk]); err != nil {
				return 0, fmt.Errorf("final send: %w", err)
			}
			if _, err := m.send.EndEpoch(); err != nil {
				return 0, fmt.Errorf("final send: %w", err)
			}
			pages = pages[chunk:]
		}
	}
	if len(pages) > 0 {
		if err := w.WritePages(pages); err != nil {
			return 0, fmt.Errorf("final send: %w", err)
		}
	}
	disk := cp.Disk
	if len(m.pendingDisk) > 0 {
		// Writes taken by an attempt that was given up go first.
		disk = append(m.pendingDisk, cp.Disk...)
	}
	if len(disk) > 0 {
		if err := w.WriteDisk(disk); err != nil {
			return 0, fmt.Errorf("final send: %w", err)
		}
	}
	if err := w.WriteDevices(cp.State); err != nil {
		return 0, fmt.Errorf("final send: %w", err)
	}
	return m.send.EndEpoch()
}

// switchOver waits for the destination's answer to the final epoch and,
// on a two-phase link, commits. It returns the acknowledgement that ends
// the downtime and when it arrived. On error the migration has been
// reported failed (guest resumed here) or unconfirmed (commit decided).
func (m *Migration) switchOver(ctx context.Context, final uint64, start time.Time) (Ack, time.Time, error) {
	actx, cancel := context.WithTimeout(ctx, max(30*time.Second, 10*m.policy.DowntimeLimit))
	ack, err := m.link.WaitAck(actx, final, true)
	cancel()
	acked := m.clk().Now()
	if err == nil && ack.Error != "" {
		err = errors.New(ack.Error)
	}
	cm, twoPhase := m.link.(Committer)
	if err == nil && ack.Ready && !twoPhase {
		err = fmt.Errorf("destination waits for a commit this link cannot send")
	}
	if err == nil && !ack.Final && !ack.Ready {
		err = fmt.Errorf("destination acknowledged epoch %d without resuming the guest", ack.Epoch)
	}
	if err != nil {
		// The destination never said it holds the guest ready (or
		// runs it): it must run here. Tell the destination to drop
		// what it may have loaded (best effort: if this is lost too,
		// it stays paused awaiting a commit that never comes).
		// Resume first: the abort goes over the link that just failed
		// us and may block for its write timeout.
		ferr := m.failed(start, fmt.Errorf("destination failed before acknowledging the switch-over: %w", err))
		if twoPhase {
			cm.Abort(final, err.Error())
		}
		return ack, acked, ferr
	}
	if !ack.Ready {
		return ack, acked, nil
	}
	// Two-phase: the destination has loaded the final epoch and waits,
	// paused. From here the source's guest never runs again: the commit
	// may arrive even if its sending fails.
	if m.beforeCommit != nil {
		m.beforeCommit()
	}
	m.committed = true
	m.update(func(s *MigrationStatus) { s.CommitSent = true })
	if m.OnCommit != nil {
		m.OnCommit()
	}
	if err := cm.Commit(final); err != nil {
		return ack, acked, m.unconfirmed(start, fmt.Errorf("send the commit: %w", err))
	}
	ready := ack
	ctimeout := m.ConfirmTimeout
	if ctimeout <= 0 {
		ctimeout = DefaultConfirmTimeout
	}
	cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), ctimeout)
	ack, err = m.waitResumed(cctx, final)
	ccancel()
	if err != nil {
		return ack, acked, m.unconfirmed(start, fmt.Errorf("no confirmation that the destination resumed (waited up to %v): %w", ctimeout, err))
	}
	if ack.LoadTime == 0 {
		ack.LoadTime = ready.LoadTime
	}
	if ack.Digest == "" {
		ack.Digest = ready.Digest
	}
	return ack, m.clk().Now(), nil
}

// completed reports a finished switch-over: downtime on one clock, from
// the source's pause to the destination's resume when it reported one
// (same host), else to the ack's arrival, and the switch-over digest
// beside the destination's (dstDigest; "" when it is known to be the
// source's: a post-copy phase that served every page).
// Preconditions: the guest is still paused here.
func (m *Migration) completed(ctrl *Controller, cp *Capture, ack Ack, dstDigest string, start, pauseStart, sendStart, acked time.Time) {
	end := resumeEnd(ack, pauseStart, acked)
	downtime := end.Sub(pauseStart)
	b := cp.Breakdown
	srcPart := b.Pause + b.Flush + b.DirtySync + b.StateSave + b.DiskResync + b.Copy
	send := end.Sub(sendStart) - ack.LoadTime
	// The guest stays stopped here, so this scan sees the switch-over image.
	srcDigest := guest.CombineDigest(guest.MemorySum(m.core.G.Regions()), cp.State).String()
	m.update(func(s *MigrationStatus) {
		s.Status = StatusCompleted
		s.Outcome = OutcomeCommitted
		// Rounded up: a pause under a millisecond is reported as 1 ms,
		// never as none (DowntimeBreakdown.TotalMs has the fraction).
		s.DowntimeMs = (downtime + time.Millisecond - 1).Milliseconds()
		// The migration ends when the destination resumes; the
		// switch-over digest above is a check that runs after it
		// (tens of milliseconds for a guest's touched memory).
		s.TotalTimeMs = end.Sub(start).Milliseconds()
		s.TransferredBytes = m.link.BytesSent()
		s.RemainingBytes = 0
		s.CompletionAttempts = ctrl.CompletionAttempts()
		s.SwitchoverDigest = srcDigest
		s.DestinationDigest = cmp.Or(dstDigest, srcDigest)
		s.DowntimeBreakdown = DowntimeBreakdown{
			PauseVCPUsMs: ms(b.Pause), FlushMs: ms(b.Flush), DirtySyncMs: ms(b.DirtySync),
			StateSaveMs: ms(b.StateSave + b.Copy), FinalSendMs: ms(send), DestinationLoadMs: ms(ack.LoadTime),
			ResumeMs: ms(downtime - srcPart - send - ack.LoadTime), TotalMs: ms(downtime), Completed: true,
		}
	})
	if m.core.Timings != nil {
		m.core.Timings.Observe(PhaseSend, sendStart, send)
		m.core.Timings.Observe("downtime", pauseStart, downtime)
	}
}

// resumeEnd is when a pause that started at pauseStart ended: the
// destination's resume when it reported one within the pause (same
// host), else the ack's arrival.
func resumeEnd(ack Ack, pauseStart, acked time.Time) time.Time {
	if !ack.ResumedAt.IsZero() && ack.ResumedAt.After(pauseStart) && ack.ResumedAt.Before(acked) {
		return ack.ResumedAt
	}
	return acked
}

// waitResumed waits for the destination's word, after the commit, that it
// resumed the guest (a Final acknowledgement).
func (m *Migration) waitResumed(ctx context.Context, final uint64) (Ack, error) {
	notifier, _ := m.link.(AckNotifier)
	for {
		var changed <-chan struct{}
		if notifier != nil {
			changed = notifier.AckChanged() // before reading, so no change is missed
		}
		ack, err := m.link.WaitAck(ctx, final, true)
		if err != nil {
			return ack, err
		}
		if ack.Error != "" {
			return ack, errors.New(ack.Error)
		}
		if ack.Final {
			return ack, nil
		}
		// The Ready acknowledgement is still the last one: wait for
		// the next, unless the link has failed.
		if el, ok := m.link.(interface{ Err() error }); ok {
			if err := el.Err(); err != nil {
				return ack, err
			}
		}
		var poll <-chan time.Time
		if changed == nil {
			// A link that cannot say when: look again shortly.
			poll = m.clk().After(time.Millisecond)
		}
		select {
		case <-ctx.Done():
			return ack, ctx.Err()
		case <-changed:
		case <-poll:
		}
	}
}

// unconfirmed ends a migration whose commit went out (or may have) but was
// not confirmed: the source's guest stays stopped, the status says so.
func (m *Migration) unconfirmed(start time.Time, err error) error {
	m.update(func(s *MigrationStatus) {
		s.Status = StatusUnknown
		s.Outcome = OutcomeUnknown
		s.Error = err.Error()
		s.TotalTimeMs = clock.Since(m.clk(), start).Milliseconds()
		s.RemainingBytes = 0
	})
	return fmt.Errorf("%w: %v", ErrCommitUnconfirmed, err)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
