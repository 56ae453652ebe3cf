package precopy

import (
	"context"
	"errors"
	"fmt"
	"github.com/tandemvm/tandem/internal/clock"
	"sync"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
)

// Link is the destination of a precopy run as the engine sees it: a stream
// writer and the destination's acknowledgements. The engine owns the
// Writer from one goroutine.
type Link interface {
	// Writer is the stream to the destination (header already sent).
	Writer() *checkpoint.Writer
	// Flush pushes buffered stream bytes out.
	Flush() error
	// BytesSent is how many bytes went on the wire so far.
	BytesSent() uint64
	// WaitAck waits until the destination acknowledges epoch (or a later
	// one), ctx ends, or the link fails. final says epoch carries the
	// machine state of a switch-over: the destination resumes on it.
	WaitAck(ctx context.Context, epoch uint64, final bool) (Ack, error)
}

// Ack is the destination's word on an epoch.
type Ack struct {
	Epoch  uint64 `json:"epoch"`
	Digest string `json:"digest,omitempty"`
	// Final acknowledgements (migration) say the destination loaded the
	// state and resumed the guest.
	Final     bool          `json:"final,omitempty"`
	LoadTime  time.Duration `json:"load_ns,omitempty"`
	ResumedAt time.Time     `json:"resumed_at,omitzero"`
	Error     string        `json:"error,omitempty"`
	// Ready (two-phase migration) says the destination loaded the final
	// epoch and waits, paused, for the source's commit. Older sources
	// never ask for it.
	Ready bool `json:"ready,omitempty"`
	// Activated (replication) says the secondary was activated and runs
	// the guest itself: the primary that reads it is fenced. Sent once,
	// on the primary's connection, as the secondary stops receiving;
	// older primaries ignore it (it acknowledges no epoch).
	Activated bool `json:"activated,omitempty"`
}

// AckNotifier is a Link that can say when its last acknowledgement
// changes, so a wait for one that is not the last (the Final after Ready)
// blocks instead of polling.
type AckNotifier interface {
	// AckChanged returns a channel closed at the next change of the last
	// acknowledgement or of the link's failure.
	AckChanged() <-chan struct{}
}

// Committer is a Link whose destination takes the two-phase switch-over:
// it loads the final epoch, answers Ready and waits, paused, for Commit
// (it resumes) or Abort (it drops what it loaded). A Link without it (a
// file, an older receiver) resumes on the final epoch itself.
type Committer interface {
	// Commit tells the destination to resume; the source has stopped its
	// guest for good before calling it.
	Commit(epoch uint64) error
	// Abort tells the destination to drop the loaded guest; best effort.
	Abort(epoch uint64, reason string) error
}

// Migration states, as QEMU's query-migrate names them, plus unknown: the
// source sent its commit but the destination never confirmed it resumed.
const (
	StatusSetup     = "setup"
	StatusActive    = "active"
	StatusDevice    = "device"
	StatusCompleted = "completed"
	StatusFailed    = "failed"
	StatusUnknown   = "unknown"
)

// Outcomes of a migration as the source knows them.
const (
	OutcomeCommitted = "committed"
	OutcomeAborted   = "aborted: source resumed"
	OutcomeUnknown   = "unknown: destination awaiting commit; source stopped"
)

// ErrCommitUnconfirmed is Run's error when the source committed (its guest
// stays stopped for good) but the destination's confirmation never came:
// the destination holds the guest, paused, awaiting a commit it may have
// missed. It never means the source runs the guest.
var ErrCommitUnconfirmed = errors.New("commit sent, not confirmed: the destination may be awaiting it; the source stays stopped")

// DefaultConfirmTimeout bounds the source's wait for the destination's
// word that it resumed, after the commit.
const DefaultConfirmTimeout = 5 * time.Second

// DowntimeBreakdown is where the last pause went, source and destination
// together; the fields sum to TotalMs. The type is the API's (package api
// holds the JSON contract).
type DowntimeBreakdown = api.DowntimeBreakdown

// MigrationStatus is the figure set of query-migrate, plus Tandem's own.
// JSON names are part of the command-line contract, kept in package api.
type MigrationStatus = api.MigrationStatus

// Migration runs one live migration of a Core's guest over a Link. Status
// may be read from any goroutine while Run runs.
type Migration struct {
	core   *Core
	link   Link
	policy Policy
	// EpochPages bounds the pages per epoch during live rounds, so the
	// destination's staging stays small.
	EpochPages int

	// mu guards status.
	mu     sync.Mutex
	status MigrationStatus

	send    *LiveSender
	started time.Time
	// Clock times the migration: round figures, the downtime and
	// completion deadlines, the bandwidth limiter, the status's times.
	// nil means clock.Real. Set it before Run.
	Clock clock.Clock
	// ConfirmTimeout bounds the wait for the destination's confirmation
	// after the commit; 0 means DefaultConfirmTimeout.
	ConfirmTimeout time.Duration
	// committed: the commit was decided; the source's guest never
	// resumes from here on.
	committed bool
	// pendingDisk holds disk writes taken by a completion attempt that
	// was given up after its final sync; the next final send sends them.
	pendingDisk []guest.DiskWrite
}

// clk is the migration's clock: m.Clock, or the real one.
func (m *Migration) clk() clock.Clock { return clock.Or(m.Clock) }

// NewMigration prepares a migration; Run starts it.
func NewMigration(core *Core, link Link, p Policy) (*Migration, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	var total uint64
	for _, r := range core.G.Regions() {
		total += uint64(len(r.Mem))
	}
	m := &Migration{core: core, link: link, policy: p, EpochPages: 1024}
	m.send = &LiveSender{Core: core, Link: link, KeepDisk: true}
	m.send.OnPages = func(sent, zero uint64) {
		m.update(func(s *MigrationStatus) {
			s.NormalPages += sent
			s.ZeroPages += zero
			s.TransferredBytes = link.BytesSent()
			if !m.started.IsZero() {
				s.TotalTimeMs = clock.Since(m.clk(), m.started).Milliseconds()
			}
		})
	}
	m.status = MigrationStatus{Status: StatusSetup, TotalBytes: total}
	return m, nil
}

// SetID names the migration in its status (MigrationID).
func (m *Migration) SetID(id string) {
	m.update(func(s *MigrationStatus) { s.MigrationID = id })
}

// Status returns a copy of the figures so far.
func (m *Migration) Status() MigrationStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.status
}

func (m *Migration) update(f func(*MigrationStatus)) {
	m.mu.Lock()
	f(&m.status)
	m.mu.Unlock()
}

// Run migrates until the destination has resumed the guest (the source's
// guest is then left paused: status completed) or the migration fails
// (the source's guest is running: status failed, with the reason). It
// never leaves the source guest paused on failure.
//
// With a Committer link the switch-over is two-phase: the destination
// loads the final epoch and answers Ready; only then does the source stop
// for good and send Commit, on which the destination resumes. Without
// Ready (within the ack deadline) the source resumes and sends Abort.
// Once Commit is decided the source never resumes: if the destination's
// confirmation does not come, Run returns ErrCommitUnconfirmed with
// status unknown (the destination may be paused, awaiting the commit;
// never both running).
func (m *Migration) Run(ctx context.Context) (err error) {
	if m.Clock != nil && m.core.Clock == nil {
		m.core.Clock = m.Clock // the round deadline and the pause stamps
	}
	start := m.clk().Now()
	m.started = start
	ctrl, err := NewController(m.policy, start)
	if err != nil {
		return m.failed(start, err)
	}
	defer func() {
		if th, ok := m.core.G.(guest.Throttler); ok {
			th.SetThrottle(0)
		}
	}()
	if err := m.setUp(start); err != nil {
		return m.failed(start, err)
	}

	lastSync := m.clk().Now()
	applied := 0
	for round := 0; ; round++ {
		m.update(func(s *MigrationStatus) { s.Round = round })
		t0 := m.clk().Now()
		wire0 := m.link.BytesSent()
		var sent uint64
		if round == 0 {
			sent, err = m.send.SendAll(ctx)
		} else {
			sent, err = m.send.SendDirty(ctx)
		}
		if err == nil {
			// Wait until the destination has what was sent: socket
			// buffers hide megabytes on a slow link, and the bandwidth
			// figure and the final send must not be fooled by them.
			err = m.send.Drain(ctx)
		}
		if err != nil {
			return m.failed(start, err)
		}
		sendTime := clock.Since(m.clk(), t0)
		dirtied, err := m.core.Sync()
		if err != nil {
			return m.failed(start, err)
		}
		now := m.clk().Now()
		remaining := m.core.Dirty.Count()
		d := ctrl.RoundDone(RoundStats{
			Round: round, PagesSent: sent, BytesSent: m.link.BytesSent() - wire0, SendTime: sendTime,
			PagesDirtied: dirtied, DirtyInterval: now.Sub(lastSync), RemainingPages: remaining,
		}, now)
		lastSync = now
		if d.Throttle != applied {
			if th, ok := m.core.G.(guest.Throttler); ok {
				th.SetThrottle(d.Throttle)
			}
			applied = d.Throttle
		}
		m.report(ctrl, start, remaining)
		switch d.Action {
		case Fail:
			return m.failed(start, d.Err)
		case TryComplete:
			done, err := m.complete(ctx, ctrl, start, d.ExpectedDowntime)
			if done || err != nil {
				return err
			}
			m.report(ctrl, start, m.core.Dirty.Count())
		case Continue:
			if sent == 0 {
				// Nothing was dirty (typically waiting out the retry
				// interval after an aborted completion): let some
				// dirt gather instead of spinning.
				select {
				case <-ctx.Done():
				case <-m.clk().After(20 * time.Millisecond):
				}
			}
		}
		if err := ctx.Err(); err != nil {
			return m.failed(start, fmt.Errorf("migration cancelled: %w", err))
		}
	}
}

// setUp readies the sender and clears the dirty log: it has been
// gathering since the guest started, and round 0 sends everything anyway.
func (m *Migration) setUp(start time.Time) error {
	if m.policy.MaxBandwidth > 0 {
		m.send.Limiter = NewLimiter(m.policy.MaxBandwidth, DefaultBurst(m.policy.MaxBandwidth), m.clk())
	}
	m.send.EpochPages = m.EpochPages
	m.send.RoundLimit = time.Second
	if _, err := m.core.Sync(); err != nil {
		return err
	}
	m.core.Dirty.Clear()
	m.update(func(s *MigrationStatus) {
		s.Status = StatusActive
		s.SetupTimeMs = clock.Since(m.clk(), start).Milliseconds()
	})
	return nil
}

// report copies the controller's figures into the status.
func (m *Migration) report(ctrl *Controller, start time.Time, remaining uint64) {
	st := ctrl.Stats()
	m.update(func(s *MigrationStatus) {
		s.TotalTimeMs = clock.Since(m.clk(), start).Milliseconds()
		s.TransferredBytes = m.link.BytesSent()
		s.RemainingBytes = remaining * guest.PageSize
		s.DirtyPagesRate = uint64(st.DirtyRate)
		s.Mbps = st.BandwidthMbps()
		s.DirtySyncCount++
		s.ThrottlePercent = st.ThrottlePercent
		s.CompletionAttempts = st.CompletionAttempts
		s.AbortedCompletions = st.AbortedCompletions
		if st.Predicted {
			s.ExpectedDowntimeMs = st.ExpectedDowntime.Milliseconds()
		}
	})
}

func (m *Migration) failed(start time.Time, err error) error {
	if m.committed {
		// Never: once the commit is decided the guest is the
		// destination's. Report, do not resume.
		return m.unconfirmed(start, err)
	}
	if m.core.G.Paused() {
		m.core.G.Resume()
	}
	m.update(func(s *MigrationStatus) {
		s.Status = StatusFailed
		s.Outcome = OutcomeAborted
		s.Error = err.Error()
		s.TotalTimeMs = clock.Since(m.clk(), start).Milliseconds()
	})
	return err
}

// complete tries the stop-and-copy. It returns done=true when the
// destination has resumed the guest; done=false, err=nil when the attempt
// was aborted (the flush missed its budget, or the final sync left more
// than fits the limit) and the guest runs again on the source; err when
// the migration failed (the guest runs on the source).
func (m *Migration) complete(ctx context.Context, ctrl *Controller, start time.Time, expected time.Duration) (bool, error) {
	m.update(func(s *MigrationStatus) { s.Status = StatusDevice })
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
	final, err := m.sendFinal(cp)
	if err != nil {
		return false, m.failed(start, err)
	}
	ack, acked, err := m.switchOver(ctx, final, start)
	if err != nil {
		return false, err
	}
	m.completed(ctrl, cp, ack, start, pauseStart, sendStart, acked)
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
	m.committed = true
	m.update(func(s *MigrationStatus) { s.CommitSent = true })
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
// (same host), else to the ack's arrival, and the switch-over digest.
// Preconditions: the guest is still paused here.
func (m *Migration) completed(ctrl *Controller, cp *Capture, ack Ack, start, pauseStart, sendStart, acked time.Time) {
	end := acked
	if !ack.ResumedAt.IsZero() && ack.ResumedAt.After(pauseStart) && ack.ResumedAt.Before(acked) {
		end = ack.ResumedAt
	}
	downtime := end.Sub(pauseStart)
	b := cp.Breakdown
	srcPart := b.Pause + b.Flush + b.DirtySync + b.StateSave + b.Copy
	send := end.Sub(sendStart) - ack.LoadTime
	// The guest stays stopped here, so this scan sees the switch-over image.
	srcDigest := guest.CombineDigest(guest.ScanMemory(m.core.G.Regions()).Sum(), cp.State).String()
	m.update(func(s *MigrationStatus) {
		s.Status = StatusCompleted
		s.Outcome = OutcomeCommitted
		s.DowntimeMs = downtime.Milliseconds()
		s.TotalTimeMs = clock.Since(m.clk(), start).Milliseconds()
		s.TransferredBytes = m.link.BytesSent()
		s.RemainingBytes = 0
		s.CompletionAttempts = ctrl.CompletionAttempts()
		s.SwitchoverDigest = srcDigest
		s.DestinationDigest = ack.Digest
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
