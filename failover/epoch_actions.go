package failover

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// step feeds the protection machine one event and performs what it
// returns, in order, after releasing mu (the actions call out: the gate's
// sink, OnProtected, OnCommitted, Unprotect). It returns the actions too,
// for a caller that waits on one (a back-off's delay, a final epoch's
// answer).
func (l *EpochLoop) step(ev ProtectionEvent) []ProtectionAction {
	l.mu.Lock()
	acts := l.prot.Step(ev)
	// Protection's start and end are recorded here, under mu, in the
	// machine's order: performed later, a loss stepped on another
	// goroutine could overtake the start it follows.
	for _, a := range acts {
		if a.Kind == DoProtected {
			l.noteProtectedLocked(a.Protected, ev.Now)
		}
	}
	l.mu.Unlock()
	l.perform(acts, ev.Now)
	return acts
}

// perform carries out the machine's actions; now is the event's time.
// Actions that answer a waiting caller (backoff, refuse-final,
// capture-final, final-acked, final-failed) are read by that caller from
// step's result and are nothing to do here; so is pause, which Run
// performs when it sees the fence (parkFenced).
func (l *EpochLoop) perform(acts []ProtectionAction, now time.Time) {
	for i, a := range acts {
		switch a.Kind {
		case DoState:
			var retry time.Duration
			for _, b := range acts[i+1:] {
				if b.Kind == DoBackoff {
					retry = b.Delay
				}
			}
			l.logState(a, retry)
		case DoProtected:
			if l.cfg.OnProtected != nil {
				l.cfg.OnProtected(a.Protected, a.Why)
			}
		case DoReleaseHeld:
			l.releaseHeld()
		case DoHold:
			l.gate.Hold(true)
		case DoRelease:
			l.gate.Release(a.Epoch)
			l.observe(PhaseRelease, now, l.clk.Now().Sub(now))
		case DoAcked:
			l.noteAcked(a, now)
		case DoVerified:
			l.noteVerified(a.Epoch, now)
		case DoCommitted:
			l.mu.Lock()
			l.lastCommitAt = now
			l.mu.Unlock()
			if l.cfg.OnCommitted != nil {
				l.cfg.OnCommitted(a.Epoch)
			}
		case DoMismatch:
			l.noteMismatch(a, now)
		case DoIgnored:
			l.log.Error("secondary's acknowledgement ignored", "epoch", a.Epoch, "why", a.Why)
		case DoRelink:
			select {
			case l.relink <- a.Why:
			default: // one request pending is enough
			}
		case DoDropLink:
			l.dropLink(a.Why)
		case DoFence:
			l.performFence(a.Why)
		case DoResume:
			l.cfg.Guest.Resume()
		case DoFinalFailed:
			l.log.Warn("final epoch abandoned", "why", a.Why)
		}
	}
}

// logState says what protection is doing: a loss of protection and each
// join at warning level, "protected" with what the catch-up took. A
// secondary that stays down makes the same two lines (joining, and the
// same failure) at every retry: each is logged once per repeatQuiet,
// with the count of those left out; retry is the wait before the next
// join (0: none follows).
func (l *EpochLoop) logState(a ProtectionAction, retry time.Duration) {
	l.mu.Lock()
	var ok bool
	var repeated int
	switch a.State {
	case StateProtected, StateFenced:
		l.stateLog.reset()
	default:
		ok, repeated = l.stateLog.admit(a.State+"\x00"+a.Why, l.clk.Now())
	}
	took, bytes, resynced := l.lastResync, l.lastResyncBytes, l.lastResyncDone
	l.mu.Unlock()
	switch a.State {
	case StateProtected:
		attrs := []any{"secondary", l.secondaryAddr()}
		if resynced {
			attrs = append(attrs, "catch_up_took", took.Round(time.Millisecond).String(), "catch_up_bytes", bytes)
		}
		l.log.Info("protected", attrs...)
	case StateFenced: // performFence says it louder
	default:
		if !ok {
			return
		}
		attrs := []any{"state", a.State, "why", a.Why}
		if retry > 0 {
			attrs = append(attrs, "next_join_in", retry.String())
		}
		if repeated > 0 {
			attrs = append(attrs, "repeated", repeated)
		}
		l.log.Warn("not protected", attrs...)
	}
}

func (l *EpochLoop) secondaryAddr() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.prot.Secondary()
}

// noteAcked records a consistent epoch's acknowledgement latency.
func (l *EpochLoop) noteAcked(a ProtectionAction, now time.Time) {
	l.mu.Lock()
	l.acked++
	if l.joining(a.PausedAt) {
		l.joinAckMax = max(l.joinAckMax, now.Sub(a.PausedAt))
	} else {
		l.ackLatency = appendBounded(l.ackLatency, now.Sub(a.PausedAt))
	}
	l.mu.Unlock()
	if sent, ok := l.ackedSent(a.Epoch); ok {
		l.observe(PhaseApply, sent, now.Sub(sent))
	}
	if l.cfg.Timings != nil {
		// As a named phase too, so a window's mean can be taken from
		// the metrics (status's quantiles cover the recent epochs).
		l.cfg.Timings.Observe(PhaseAck, a.PausedAt, now.Sub(a.PausedAt))
	}
}

// noteVerified counts a verified epoch; the first after a mismatch's
// re-sync resolves it.
func (l *EpochLoop) noteVerified(epoch uint64, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.verified++
	if !l.mismatchAt.IsZero() && strings.HasPrefix(l.mismatchResolution, resyncing) {
		l.mismatchResolution = fmt.Sprintf("resolved %s: epoch %d verified after a full re-sync of the secondary (join %d)",
			now.UTC().Format(time.RFC3339Nano), epoch, l.joins)
	}
}

// noteMismatch is a replica that does not match: an incident, not a log
// line. The machine has already made the secondary stop counting as a
// replica and asked for the relink (see the package doc); this keeps the
// record that status shows.
func (l *EpochLoop) noteMismatch(a ProtectionAction, now time.Time) {
	l.mu.Lock()
	l.mismatches++
	l.lastMismatch, l.mismatchEpoch, l.mismatchAt, l.mismatchResolution = a.Why, a.Epoch, now, resyncing
	l.mu.Unlock()
	l.log.Error("REPLICA DIGEST MISMATCH: the secondary no longer counts as a replica; re-syncing it from scratch",
		"epoch", a.Epoch, "detail", a.Why)
}

// dropLink fails the current link: a secondary that accepted the stream
// and stopped answering is retried afresh, with back-off, instead of
// keeping this primary joining, or its output held, for ever.
func (l *EpochLoop) dropLink(why string) {
	l.mu.Lock()
	link := l.link
	l.mu.Unlock()
	l.log.Warn("secondary silent", "err", why)
	if link != nil {
		link.Fail(errors.New(why))
	}
}

// performFence: nothing leaves through the gate from now on, the link
// ends, and Run parks the guest paused.
func (l *EpochLoop) performFence(why string) {
	l.fencedFlag.Store(true)
	l.gate.Discard()
	l.mu.Lock()
	cancel := l.linkCancel
	l.mu.Unlock()
	l.fencedOnce.Do(func() {
		close(l.fencedCh)
		l.log.Error("FENCED: the secondary runs the guest now; no output leaves here and the guest is paused", "why", why)
	})
	if cancel != nil {
		cancel()
	}
}
