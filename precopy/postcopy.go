package precopy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/clock"
)

// PostcopyLink moves the pages a switch to post-copy leaves behind
// (docs/POSTCOPY.md). Package postcopy imports this one, so the engine
// knows its page mover only by this interface; ft implements it with
// postcopy.Source over the migration's two extra connections.
type PostcopyLink interface {
	// SendMissing tells the destination, ahead of the final epoch,
	// which pages it will lack: the switch's missing set. An empty set
	// says the completion is precopy's (every page is in the stream).
	SendMissing(missing *Bitmap) error
	// Serve serves the paused guest's missing pages until the
	// destination reports every page arrived with the digest expected
	// (nil), or the run fails. lim, if set, caps its bytes.
	// expected may block until the digest is taken.
	Serve(ctx context.Context, expected func() guest.Digest, lim *Limiter) error
}

// OutcomePostcopyIncomplete is a post-copy that was committed (the
// destination runs the guest) but whose pages did not all arrive.
const OutcomePostcopyIncomplete = "post-copy incomplete: destination runs the guest with pages missing; source stopped, holds them"

// StatusPostcopyPaused is a committed post-copy whose link was lost: the
// destination runs the guest and waits for the pages the source still
// holds (its guest paused); `tandem migrate --resume` goes on over new
// connections. OutcomePostcopyPaused is the source's outcome meanwhile.
const (
	StatusPostcopyPaused  = "postcopy-paused"
	OutcomePostcopyPaused = "committed; post-copy paused: the link to the destination is lost; the destination runs the guest, waiting for the pages this source holds (its guest stays paused); `tandem migrate --resume` continues it"
)

// switchIf switches to post-copy if DecideSwitch says so, after
// roundsSent rounds whose last the controller answered with d. tried
// says a switch was tried; done that Run must return err (the migration
// completed or failed); tried and not done: it was given up (its flush
// missed its budget) and the guest runs here again.
func (m *Migration) switchIf(ctx context.Context, ctrl *Controller, start time.Time, d Decision, roundsSent int) (tried, done bool, err error) {
	if m.Postcopy == nil {
		return false, false, nil
	}
	sw := DecideSwitch(SwitchView{
		RoundsSent: roundsSent, AfterRounds: m.PostcopyAfterRounds, Commanded: m.switchNow.Load(),
		RetryAfter: m.switchRetryAfter, Decision: d, DowntimeLimit: m.policy.DowntimeLimit, GivenUp: m.switchGivenUp,
		Progress: m.progress, Elapsed: clock.Since(m.clk(), start), MaxTime: ctrl.Policy().MaxTime,
	})
	if !sw.Switch {
		return false, false, nil
	}
	m.logf("post-copy: switching", "reason", sw.Reason, "why", sw.Why, "rounds", roundsSent)
	m.update(func(s *MigrationStatus) { s.PostcopySwitchReason, s.PostcopySwitchWhy = sw.Reason, sw.Why })
	if roundsSent == 0 {
		m.send.markRest(m.core.G.Regions(), 0) // nothing sent yet: every page is owed
	}
	done, err = m.switchPostcopy(ctx, ctrl, start)
	if !done && err == nil {
		m.switchGivenUp++
		m.switchRetryAfter = clock.Since(m.clk(), start) + m.policy.withDefaults().MinRetryInterval
		m.update(func(s *MigrationStatus) { s.PostcopySwitchReason, s.PostcopySwitchWhy = "", "" })
		if roundsSent == 0 {
			m.core.Dirty.Clear() // the full pass that follows sends every page
		}
	}
	return true, done || err != nil, err
}

// stopRound says whether the round being sent must stop for a switch
// asked for by command (SwitchToPostcopy). Run's goroutine only.
func (m *Migration) stopRound() bool {
	return m.Postcopy != nil && m.switchNow.Load() && clock.Since(m.clk(), m.started) >= m.switchRetryAfter && m.switchGivenUp < MaxSwitchGiveUps
}

// sample records the dirty set's size for DecideSwitch, keeping the
// last progressWindow.
func (m *Migration) sample(at time.Duration, pages uint64) {
	m.progress = append(m.progress, ProgressSample{At: at, Pages: pages})
	if n := len(m.progress); n > progressWindow {
		m.progress = append(m.progress[:0], m.progress[n-progressWindow:]...)
	}
}

// switchPostcopy is the switch to post-copy: pause, the machine state and
// disk writes in a final epoch without pages, the pages still dirty sent
// as the missing set instead; once the destination is ready, serve them
// and commit; the migration completes when every page has arrived and
// the destination's digest equals the source's. It returns done=false,
// err=nil when the flush missed its budget (the guest runs here again).
//
// The pause is held to the downtime limit as a precopy attempt's is,
// only where giving up helps: the flush gets what the limit leaves after
// the switch's predicted rest (at least a quarter of it), and a flush
// that misses it gives the switch up, to be tried again after the retry
// interval. The rest (the missing set, the final epoch, the
// destination's registration) is not given up when it runs over: the
// set would not be smaller later. Either way the attempt is recorded
// with its expected and actual pause.
func (m *Migration) switchPostcopy(ctx context.Context, ctrl *Controller, start time.Time) (bool, error) {
	var pausedAt time.Time
	if m.BeforeSwitch != nil {
		var err error
		if pausedAt, err = m.BeforeSwitch(); err != nil {
			return false, m.failed(start, fmt.Errorf("post-copy switch: %w", err))
		}
	}
	m.update(func(s *MigrationStatus) { s.Status = StatusDevice })
	if m.OnFinalPause != nil {
		m.OnFinalPause()
	}
	expected := m.switchExpected(ctrl, m.core.Dirty)
	pauseStart := m.clk().Now()
	if !pausedAt.IsZero() && pausedAt.Before(pauseStart) {
		// The guest paused already (a protected guest's final epoch):
		// that part of the pause is spent, and counts.
		expected += pauseStart.Sub(pausedAt)
		pauseStart = pausedAt
	}
	att := api.CompletionAttempt{ExpectedDowntimeMs: ms(expected)}
	limit := m.policy.withDefaults().DowntimeLimit
	budget := max(limit-expected, limit/4, time.Millisecond)
	cp, err := m.core.Capture(ctx, CaptureOptions{FlushBudget: budget, KeepPaused: true, InPlace: true})
	if err != nil {
		if errors.Is(err, ErrFlushAborted) && m.ResumeOnFailure == nil {
			att.ActualDowntimeMs, att.Outcome = ms(m.clk().Now().Sub(pauseStart)), "aborted: flush"
			m.addAttempt(att)
			m.completionAborted(ctrl, cp, err)
			return false, nil
		}
		// A guest with its own way back (a protected one) does not run
		// rounds here meanwhile: the switch fails and it resumes that way.
		return false, m.failed(start, err)
	}
	ctrl.ObserveStateSave(cp.Breakdown.StateSave)
	missing := NewBitmap(m.core.Dirty.Len())
	for _, p := range cp.Pages {
		missing.Set(p.Index)
	}
	cp.Pages = nil
	att.FinalPages = missing.Count()
	att.FinalExpectedMs = ms(m.clk().Now().Sub(pauseStart) + m.missingSendTime(ctrl, missing))
	if att.FinalExpectedMs > ms(limit) {
		m.logf("post-copy: the switch's pause is expected over the downtime limit; switching anyway (a later switch owes no fewer pages)",
			"expected_ms", att.FinalExpectedMs, "limit", limit, "pages", att.FinalPages)
	}
	return m.switchSend(ctx, ctrl, start, cp, missing, pauseStart, att)
}

// switchSend is the switch once the guest is paused and the missing set
// taken: the set, the final epoch, the switch-over and the serving.
func (m *Migration) switchSend(ctx context.Context, ctrl *Controller, start time.Time, cp *Capture, missing *Bitmap, pauseStart time.Time, att api.CompletionAttempt) (bool, error) {
	owed := att.FinalPages
	// Nothing owed (the guest dirtied nothing since the last round): the
	// destination reads an empty set as a precopy completion and runs no
	// post-copy, so nothing is served (a Serve would wait for a run that
	// never comes, and take the closed channels for a lost link).
	wait := func(bool) (bool, error) { return false, nil }
	if owed > 0 {
		wait = m.serveOnReady(ctx, cp.State)
	}
	sendStart := m.clk().Now()
	if err := m.Postcopy.SendMissing(missing); err != nil {
		wait(true)
		return false, m.failed(start, fmt.Errorf("post-copy: send the missing set: %w", err))
	}
	final, err := m.sendFinal(cp)
	if err != nil {
		wait(true)
		return false, m.failed(start, err)
	}
	ack, acked, err := m.switchOver(ctx, final, start)
	if err != nil {
		// Once the commit is decided the guest is the destination's
		// (it may have resumed, or await the commit paused): its pages
		// are served to the end, or until its link fails.
		if _, serr := wait(!m.committed); m.committed && serr != nil {
			m.logf("post-copy: serving ended after an unconfirmed commit", "err", serr)
		}
		return false, err
	}
	resumed := resumeEnd(ack, pauseStart, acked)
	m.recordSwitch(att, resumed.Sub(pauseStart), sendStart, acked, ack)
	if owed == 0 {
		// The ack carries the destination's digest, as a precopy
		// completion's does (completed compares it).
		if err := m.beforeComplete(start); err != nil {
			return false, err
		}
		m.completed(ctrl, cp, ack, ack.Digest, start, pauseStart, sendStart, acked)
		return true, nil
	}
	m.update(func(s *MigrationStatus) {
		s.PostcopyActive, s.PostcopyPages, s.PostcopyResumedAfterMs = true, owed, resumed.Sub(start).Milliseconds()
	})
	m.logf("post-copy: the guest runs on the destination; serving the pages it lacks", "pages", owed)
	started, err := wait(false)
	if !started {
		return false, m.unconfirmed(start, errors.New("post-copy: the destination resumed without a post-copy switch"))
	}
	if err != nil {
		m.unconfirmed(start, fmt.Errorf("post-copy: %w", err))
		m.update(func(s *MigrationStatus) { s.Outcome, s.PostcopyActive = OutcomePostcopyIncomplete, false })
		return false, fmt.Errorf("%w: post-copy: %w", ErrCommitUnconfirmed, err)
	}
	if err := m.beforeComplete(start); err != nil {
		return false, err
	}
	// Serve returned nil: the destination's digest, taken as every page
	// arrived, is the source's (""). Set with the completion itself, not
	// after it: a reader that saw "completed" with the digest of the
	// switch (pages still missing) reported a mismatch (make test,
	// TestMigratePostcopyKV, 2026-12-01).
	m.completed(ctrl, cp, ack, "", start, pauseStart, sendStart, acked)
	m.update(func(s *MigrationStatus) {
		s.TotalTimeMs = clock.Since(m.clk(), start).Milliseconds()
		s.PostcopyActive = false
	})
	return true, nil
}

// recordSwitch adds the switch's attempt to the status, its pause as it
// happened (to the destination's resume), and says so in the log when
// it ran over the limit.
func (m *Migration) recordSwitch(att api.CompletionAttempt, paused time.Duration, sendStart, acked time.Time, ack Ack) {
	limit := m.policy.withDefaults().DowntimeLimit
	att.ActualDowntimeMs = ms(paused)
	att.FinalSendMs = ms(acked.Sub(sendStart) - ack.LoadTime)
	att.Outcome = "post-copy switch"
	if paused > limit {
		att.Outcome = "post-copy switch: over the limit"
		m.logf("post-copy: the switch's pause ran over the downtime limit", "paused", paused, "limit", limit,
			"expected_ms", att.FinalExpectedMs)
	}
	m.addAttempt(att)
}

// MissingRunBytes is what one run of the missing set takes on the wire
// (package postcopy's 'M' frame: type, first page, count) and
// MissingEndBytes its end frame; the switch's prediction counts with
// them (postcopy's TestMissingSetSize holds them to the encoding).
const (
	MissingRunBytes = 17
	MissingEndBytes = 9
)

// missingSendTime is the predicted time to send missing as runs at the
// measured wire rate (0 without one).
func (m *Migration) missingSendTime(ctrl *Controller, missing *Bitmap) time.Duration {
	rate := ctrl.Stats().Bandwidth
	if rate <= 0 {
		return 0
	}
	return secondsToDuration(float64(missingRuns(missing)*MissingRunBytes+MissingEndBytes) / rate)
}

// missingRuns is how many runs of consecutive pages b holds.
func missingRuns(b *Bitmap) uint64 {
	var runs uint64
	next := uint64(0) // the page that would extend the current run
	b.ForEach(func(p uint64) bool {
		if runs == 0 || p != next {
			runs++
		}
		next = p + 1
		return true
	})
	return runs
}

// switchExpected is the switch's predicted pause for the pages dirty now:
// the state save and the missing set's runs (the flush and the
// destination's registration are not predicted).
func (m *Migration) switchExpected(ctrl *Controller, dirty *Bitmap) time.Duration {
	return ctrl.Stats().StateSaveEstimate + m.missingSendTime(ctrl, dirty)
}

// serveOnReady arranges for the page mover to start serving once the
// destination is ready (switchOver's beforeCommit: it faults only after
// the commit, but its run is already going). wait ends the arrangement:
// with stop it cancels the serving (the switch failed); without, it
// starts the switch-over digest of the paused guest (after the commit
// and the destination's resume, so the scan is not in the downtime; the
// guest stays paused, so it is the image of the switch) and waits for
// the serving's end, which asks for the digest when the destination's
// arrives. started says whether serving began.
func (m *Migration) serveOnReady(ctx context.Context, state guest.MachineState) (wait func(stop bool) (started bool, err error)) {
	digest := make(chan guest.Digest, 1)
	var scan sync.Once
	startScan := func() {
		scan.Do(func() {
			go func() { digest <- guest.CombineDigest(guest.MemorySum(m.core.G.Regions()), state) }()
		})
	}
	expected := sync.OnceValue(func() guest.Digest { startScan(); return <-digest })
	// Not the migration's ctx: once committed the guest is the
	// destination's, and a cancel must not strand its pages.
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var served chan error
	m.beforeCommit = func() {
		served = make(chan error, 1)
		go func() { served <- m.Postcopy.Serve(sctx, expected, m.send.Limiter) }()
	}
	return func(stop bool) (bool, error) {
		m.beforeCommit = nil
		defer cancel()
		if stop {
			cancel()
		}
		if served == nil {
			return false, nil
		}
		if !stop {
			startScan()
		}
		return true, <-served
	}
}

// beforeComplete runs BeforeComplete (a protected guest's secondary
// retires) once every page is at the destination; its failure leaves the
// migration unconfirmed.
func (m *Migration) beforeComplete(start time.Time) error {
	if m.BeforeComplete == nil {
		return nil
	}
	if err := m.BeforeComplete(); err != nil {
		m.update(func(s *MigrationStatus) { s.PostcopyActive = false })
		return m.unconfirmed(start, fmt.Errorf("post-copy: every page arrived, digests equal, but %w", err))
	}
	return nil
}

func (m *Migration) logf(msg string, args ...any) {
	if m.Log != nil {
		m.Log.Info(msg, args...)
	}
}
