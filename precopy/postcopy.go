package precopy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

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

// switchPostcopy is the switch to post-copy: pause, the machine state and
// disk writes in a final epoch without pages, the pages still dirty sent
// as the missing set instead; once the destination is ready, serve them
// and commit; the migration completes when every page has arrived and
// the destination's digest equals the source's. It returns done=false,
// err=nil when the flush missed its budget (the guest runs here again).
func (m *Migration) switchPostcopy(ctx context.Context, ctrl *Controller, start time.Time, round int) (bool, error) {
	m.update(func(s *MigrationStatus) { s.Status = StatusDevice })
	if m.OnFinalPause != nil {
		m.OnFinalPause()
	}
	if round == 0 {
		m.markAll() // nothing sent yet: every page is owed
	}
	pauseStart := m.clk().Now()
	budget := max(ctrl.FlushBudget(pauseStart, pauseStart), time.Millisecond)
	cp, err := m.core.Capture(ctx, CaptureOptions{FlushBudget: budget, KeepPaused: true, InPlace: true})
	if err != nil {
		if errors.Is(err, ErrFlushAborted) {
			m.completionAborted(ctrl, cp, err)
			return false, nil
		}
		return false, m.failed(start, err)
	}
	missing := NewBitmap(m.core.Dirty.Len())
	for _, p := range cp.Pages {
		missing.Set(p.Index)
	}
	owed := missing.Count()
	cp.Pages = nil
	wait := m.serveOnReady(ctx, cp.State)
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
	m.update(func(s *MigrationStatus) { s.PostcopyActive, s.PostcopyPages = true, owed })
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
	m.completed(ctrl, cp, ack, start, pauseStart, sendStart, acked)
	m.update(func(s *MigrationStatus) {
		// Serve returned nil: the destination's digest, taken as
		// every page arrived, is the source's.
		s.DestinationDigest = s.SwitchoverDigest
		s.TotalTimeMs = clock.Since(m.clk(), start).Milliseconds()
		s.PostcopyActive = false
	})
	return true, nil
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

// markAll marks every page of the guest dirty.
func (m *Migration) markAll() {
	for _, r := range m.core.G.Regions() {
		for p := r.FirstPage(); p < r.FirstPage()+r.Pages(); p++ {
			m.core.Dirty.Set(p)
		}
	}
}

func (m *Migration) logf(msg string, args ...any) {
	if m.Log != nil {
		m.Log.Info(msg, args...)
	}
}
