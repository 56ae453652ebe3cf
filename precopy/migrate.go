package precopy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/internal/clock"

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
	// OnFinalPause, if set, runs as each completion attempt begins, just
	// before the guest pauses for the final copy. A node uses it to stop
	// announcing the guest's network address: the destination announces
	// it once it resumes, and a later announcement from the source would
	// point the network back here. Set it before Run.
	OnFinalPause func()
	// OnCommit, if set, runs once the commit is decided, before it is
	// sent: the source's guest never runs again from here on, whatever
	// follows (a post-copy may serve its pages for long after). Set it
	// before Run.
	OnCommit func()
	// Log, if set, gets one debug line per round: what it sent, what it
	// left and the controller's decision with its reason.
	Log *slog.Logger
	// committed: the commit was decided; the source's guest never
	// resumes from here on.
	committed bool
	// Postcopy, if set, switches the migration to post-copy when
	// DecideSwitch says so: when the controller predicts precopy will
	// not converge, and once PostcopyAfterRounds rounds have been sent
	// at the latest (0: before any; the first round is the full pass;
	// negative: no such limit). A completion the controller decides
	// sooner stays precopy's. Set both before Run.
	Postcopy            PostcopyLink
	PostcopyAfterRounds int
	// switchNow asks for the post-copy switch now (SwitchToPostcopy).
	switchNow atomic.Bool
	// progress is the dirty set's last sizes (DecideSwitch);
	// switchRetryAfter, since the start, when a switch given up may be
	// tried again. Run's goroutine only.
	progress         []ProgressSample
	switchRetryAfter time.Duration
	// switchGivenUp counts the switch attempts given up (DecideSwitch
	// stops after MaxSwitchGiveUps). Run's goroutine only.
	switchGivenUp int
	// beforeCommit, if set, runs in switchOver once the destination is
	// ready, before the commit (the post-copy switch starts serving).
	beforeCommit func()
	// ResumeOnFailure, if set, resumes the source's guest when the
	// migration fails before its commit, instead of a plain Resume (a
	// protected guest resumes under a new epoch loop). BeforeComplete,
	// if set, runs once a post-copy's pages all arrived with the right
	// digest, before the status says completed; its error leaves the
	// migration unknown (a protected source retires its secondary here:
	// the destination releases its output only on completed).
	ResumeOnFailure func()
	BeforeComplete  func() error
	// BeforeSwitch, if set, runs at the post-copy switch before the
	// migration's own pause (a protected guest's final epoch to its
	// secondary); its error fails the migration. It returns when it
	// paused the guest (zero: it did not): the switch's pause is timed,
	// budgeted and reported from there. With it set, a completion the
	// controller decides is a post-copy switch too.
	BeforeSwitch func() (time.Time, error)
	// throttled: this migration set the guest's throttle (Run undoes
	// it at its end). Run's goroutine only.
	throttled bool
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

// SetPostcopyRefused records why a post-copy migration stays
// precopy-only ("": it does not).
func (m *Migration) SetPostcopyRefused(why string) {
	m.update(func(s *MigrationStatus) { s.PostcopyRefused = why })
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
		// Only a throttle this migration set is undone: a protected
		// guest's epoch loop throttles it itself (auto-converge is off
		// for it), and a move that failed leaves it to that loop.
		if th, ok := m.core.G.(guest.Throttler); ok && m.throttled {
			th.SetThrottle(0)
		}
	}()
	if err := m.setUp(start); err != nil {
		return m.failed(start, err)
	}

	m.send.Stop = m.stopRound
	lastSync := m.clk().Now()
	applied := 0
	for round := 0; ; round++ {
		m.update(func(s *MigrationStatus) { s.Round = round })
		if round == 0 {
			// --postcopy-after-rounds 0, or a command before any round.
			if _, done, err := m.switchIf(ctx, ctrl, start, Decision{}, 0); done {
				return err
			}
		}
		wire0, roundStart := m.link.BytesSent(), m.clk().Now()
		sent, sendTime, err := m.sendRound(ctx, round)
		if err != nil {
			return m.failed(start, err)
		}
		if m.stopRound() {
			// A command cut the round short: switch now (the
			// capture's dirty sync takes what the round left).
			if _, done, err := m.switchIf(ctx, ctrl, start, Decision{}, round+1); done {
				return err
			}
			continue
		}
		if round == 0 {
			m.sample(roundStart.Sub(start), sent) // the pages the full pass set out to send
		}
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
		m.sample(now.Sub(start), remaining)
		if m.Log != nil {
			m.Log.Debug("migration round", "round", round, "sent_pages", sent, "send_ms", ms(sendTime),
				"dirtied", dirtied, "remaining", remaining, "expected_ms", ms(d.ExpectedDowntime), "action", d.Action.String(), "reason", d.Reason)
		}
		if d.Throttle != applied {
			if th, ok := m.core.G.(guest.Throttler); ok {
				th.SetThrottle(d.Throttle)
				m.throttled = true
			}
			applied = d.Throttle
		}
		m.report(ctrl, start, remaining)
		if done, err := m.act(ctx, ctrl, start, d, round, sent); done {
			return err
		}
	}
}

// act carries out the controller's decision on a round (round, which sent
// sent pages), a switch to post-copy first if DecideSwitch says so. It
// returns done when the migration ended, err when it failed.
func (m *Migration) act(ctx context.Context, ctrl *Controller, start time.Time, d Decision, round int, sent uint64) (bool, error) {
	if tried, done, err := m.switchIf(ctx, ctrl, start, d, round+1); tried {
		return done, err // given up (not done): the guest runs here; go on
	}
	switch d.Action {
	case Fail:
		if m.Postcopy != nil && errors.Is(d.Err, ErrMaxTime) && clock.Since(m.clk(), start) < m.switchRetryAfter && m.switchGivenUp < MaxSwitchGiveUps {
			// The switch that replaces this failure was given up a
			// moment ago: it is tried again (a bounded number of
			// times), not abandoned.
			return false, nil
		}
		return true, m.failed(start, d.Err)
	case TryComplete:
		done, err := m.tryComplete(ctx, ctrl, start, d.ExpectedDowntime)
		if done || err != nil {
			return true, err
		}
		m.report(ctrl, start, m.core.Dirty.Count())
		// Precopy did not complete: the rounds (or a command) may
		// switch now instead.
		d.Action = Continue
		if _, done, err := m.switchIf(ctx, ctrl, start, d, round+1); done {
			return true, err
		}
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
		return true, m.failed(start, fmt.Errorf("migration cancelled: %w", err))
	}
	return false, nil
}

// tryComplete is the controller's completion: precopy's stop-and-copy,
// or the post-copy switch for a migration that must switch
// (BeforeSwitch: a protected guest moves only that way, its final epoch
// the switch).
func (m *Migration) tryComplete(ctx context.Context, ctrl *Controller, start time.Time, expected time.Duration) (bool, error) {
	if m.BeforeSwitch != nil && m.Postcopy != nil {
		m.update(func(s *MigrationStatus) {
			s.PostcopySwitchReason, s.PostcopySwitchWhy = SwitchController, "precopy would complete: a protected guest completes by a post-copy switch"
		})
		return m.switchPostcopy(ctx, ctrl, start)
	}
	return m.complete(ctx, ctrl, start, expected)
}

// SwitchToPostcopy asks a post-copy migration to switch now: the round
// being sent stops at its next batch (a full pass of a large guest lasts
// minutes), whatever PostcopyAfterRounds said. Safe from any goroutine.
func (m *Migration) SwitchToPostcopy() error {
	if m.Postcopy == nil {
		return errors.New("this migration has no post-copy (start it with --postcopy; the destination must grant it)")
	}
	m.switchNow.Store(true)
	return nil
}

// sendRound sends one iterative round (round 0: all of memory) and waits
// until the destination has it: socket buffers hide megabytes on a slow
// link, and the bandwidth figure and the final send must not be fooled
// by them. It returns the pages sent and how long that took.
func (m *Migration) sendRound(ctx context.Context, round int) (uint64, time.Duration, error) {
	t0 := m.clk().Now()
	var sent uint64
	var err error
	if round == 0 {
		sent, err = m.send.SendAll(ctx)
	} else {
		sent, err = m.send.SendDirty(ctx)
	}
	if err == nil && !m.stopRound() {
		// A round stopped for the switch is not measured: its
		// epochs reach the destination before the final one anyway.
		err = m.send.Drain(ctx)
	}
	return sent, clock.Since(m.clk(), t0), err
}

// setUp readies the sender and clears the dirty log: it has been
// gathering since the guest started, and round 0 sends everything anyway.
func (m *Migration) setUp(start time.Time) error {
	if m.policy.MaxBandwidth > 0 {
		m.send.Limiter = NewLimiter(m.policy.MaxBandwidth, DefaultBurst(m.policy.MaxBandwidth), m.clk())
	}
	m.send.EpochPages = m.EpochPages
	m.send.RoundLimit = time.Second
	// Round 0 reads every page anyway: the log gathered since the guest
	// started is dropped, and where the guest can, pages are
	// write-protected only as round 0 reaches them (guest.LazyDirtyLog).
	// A post-copy switch before round 0 sends nothing: its pause would
	// then sync (and protect) everything logged since boot, so it keeps
	// the eager sync here.
	// A Core that takes its pages from an epoch loop's tap (From: a
	// protected guest's move) must not touch the guest's log at all:
	// dropping it or clearing pieces of it would take writes the loop
	// has not synced, and its secondary would never get them.
	lazy := false
	if lz, ok := m.core.G.(guest.LazyDirtyLog); ok && m.core.From == nil && (m.Postcopy == nil || m.PostcopyAfterRounds != 0) {
		var err error
		if lazy, err = lz.DiscardDirty(); err != nil {
			return err
		}
		if lazy {
			m.send.Lazy = lz
		}
	}
	if !lazy {
		if _, err := m.core.Sync(); err != nil {
			return err
		}
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
	switch {
	case m.ResumeOnFailure != nil:
		m.ResumeOnFailure()
	case m.core.G.Paused():
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
