package failover

import (
	"fmt"
	"slices"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/clock"
)

const recentSamples = 2048

func appendBounded(s []time.Duration, d time.Duration) []time.Duration {
	if len(s) >= recentSamples {
		copy(s, s[1:])
		s = s[:recentSamples-1]
	}
	return append(s, d)
}

// The hops of an epoch from its pause to the release of its output, each
// a named histogram in EpochConfig.Timings
// (tandem_phase_seconds{phase=...}), besides precopy's pause phases.
// Every hop is woken by the one before it (channels, the link's reader),
// none polls.
const (
	// PhaseOutputWait: the open epoch's first held byte to the pause
	// that seals it (what the trigger costs output).
	PhaseOutputWait = "epoch_output_wait"
	// PhasePause: the whole time an epoch held the guest paused (the
	// sum of precopy's pause phases, the status's pause_p50_ms and
	// pause_p99_ms as one histogram, so a window's quantiles can be read
	// from two scrapes).
	PhasePause = "epoch_pause"
	// PhaseCapture: the pause's start to the capture's end (guest
	// resumed, pages copied and, verifying, hashed).
	PhaseCapture = "epoch_capture"
	// PhaseQueue: captured to taken by the shipper (the previous epoch
	// still encoding).
	PhaseQueue = "epoch_queue"
	// PhaseEncode: pages, disk writes and device state encoded into the
	// link (zero detection, delta, zstd).
	PhaseEncode = "epoch_encode"
	// PhaseSend: the epoch's end written and the link flushed.
	PhaseSend = "epoch_send"
	// PhaseShip is PhaseEncode and PhaseSend together (kept as before).
	PhaseShip = "epoch_ship"
	// PhaseApply: the epoch sent to its acknowledgement received: the
	// secondary's decode, apply and commit, and the acknowledgement's
	// way back (measured on the primary's clock alone).
	PhaseApply = "epoch_apply"
	// PhaseAck is an epoch's pause-to-acknowledgement time.
	PhaseAck = "epoch_ack"
	// PhaseRelease: the acknowledgement to its output handed to the
	// outside world (the gate's sink returned).
	PhaseRelease = "epoch_release"
)

// observe records a hop in the timings, if any.
func (l *EpochLoop) observe(phase string, start time.Time, d time.Duration) {
	if l.cfg.Timings != nil {
		l.cfg.Timings.Observe(phase, start, d)
	}
}

// noteProtectedLocked records when protection begins (a join's first
// consistent acknowledgement) and ends. A new join's figures start
// afresh when protection is lost. mu held.
func (l *EpochLoop) noteProtectedLocked(on bool, now time.Time) {
	if on {
		if l.protectedAt.IsZero() {
			l.protectedAt, l.joinSeen = now, true
		}
		return
	}
	l.protectedAt = time.Time{}
	l.joinPauseMax, l.joinAckMax = 0, 0
}

// joining says whether an epoch paused at pausedAt is the join's: paused
// before protection began. mu held.
func (l *EpochLoop) joining(pausedAt time.Time) bool {
	return l.protectedAt.IsZero() || pausedAt.Before(l.protectedAt)
}

// sentStamp is when an epoch's end went out on the link.
type sentStamp struct {
	epoch uint64
	at    time.Time
	bytes uint64 // its wire bytes
}

// noteSent stamps an epoch sent, for its apply hop (bounded: stamps of
// epochs never acknowledged on a dropped link fall off).
func (l *EpochLoop) noteSent(epoch uint64, at time.Time, bytes uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.sentAt) >= 64 {
		l.sentAt = append(l.sentAt[:0], l.sentAt[1:]...)
	}
	l.sentAt = append(l.sentAt, sentStamp{epoch, at, bytes})
}

// ackedSent takes the stamps up to epoch and returns epoch's.
func (l *EpochLoop) ackedSent(epoch uint64) (time.Time, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var at time.Time
	ok := false
	i := 0
	for ; i < len(l.sentAt) && l.sentAt[i].epoch <= epoch; i++ {
		if l.sentAt[i].epoch == epoch {
			at, ok = l.sentAt[i].at, true
		}
		l.thr.win.AckedBytes += l.sentAt[i].bytes
	}
	l.sentAt = append(l.sentAt[:0], l.sentAt[i:]...)
	return at, ok
}

// EpochStatus is the primary's protection figures; JSON names are part of
// `tandem status --json`, kept in package api.
type EpochStatus = api.EpochStatus

// Status returns the figures now.
func (l *EpochLoop) Status() EpochStatus {
	l.mu.Lock()
	defer l.mu.Unlock()
	state, why := l.prot.State()
	st := EpochStatus{
		Protected: state == StateProtected, Protection: state, ProtectionReason: why, Secondary: l.prot.Secondary(),
		LastCommittedEpoch: l.prot.Committed(), LastShippedEpoch: l.shipped, SecondaryLag: l.prot.InFlight(),
		Epochs: l.epochs, AckedEpochs: l.acked, EpochRawBytes: l.rawBytes, EpochWireBytes: l.wireBytes,
		FlushAborts: l.flushAborts, BackpressureStalls: l.stalls, VerifyEpochs: l.cfg.Verify, DeltaCacheBypasses: l.cacheBypasses,
		VerifiedEpochs: l.verified, DigestMismatches: l.mismatches, LastMismatch: l.lastMismatch, Joins: l.joins,
		LastMismatchEpoch: l.mismatchEpoch, LastMismatchResolution: l.mismatchResolution,
		QueuePolicy: fmt.Sprintf("at most %d epochs unacknowledged and 1 queued for shipping; a slow secondary lengthens epochs", l.cfg.MaxInFlight),
	}
	if state == StateProtected {
		// why is the moment protection began; say where it stands now.
		st.ProtectionReason = fmt.Sprintf("since %s; last acknowledged epoch %d", why, st.LastCommittedEpoch)
	}
	if !l.mismatchAt.IsZero() {
		st.LastMismatchAt = l.mismatchAt.UTC().Format(time.RFC3339Nano)
	}
	if l.cfg.Verify {
		st.VerifySlicePages = l.cfg.VerifySlicePages
		st.VerifyCycleEpochs = (l.guestPages + uint64(l.cfg.VerifySlicePages) - 1) / uint64(l.cfg.VerifySlicePages)
	}
	if l.epochs > 0 {
		st.EpochRawBytesAvg = l.rawBytes / l.epochs
		st.EpochWireBytesAvg = l.wireBytes / l.epochs
	}
	if l.rawBytes > 0 {
		st.WireRatio = float64(l.wireBytes) / float64(l.rawBytes)
	}
	if !l.startedEpochs.IsZero() && state != StateUnprotected {
		if secs := clock.Since(l.clk, l.startedEpochs).Seconds(); secs > 0 {
			st.EpochsPerSecond = float64(l.linkEpochs) / secs
		}
	}
	st.PauseP50Ms, st.PauseP99Ms, st.PauseMaxMs = quantiles(l.pauses)
	if l.joinSeen {
		p, a := millis(l.joinPauseMax), millis(l.joinAckMax)
		st.JoinPauseMaxMs, st.JoinAckMaxMs = &p, &a
	}
	st.AckLatencyP50Ms, st.AckLatencyP99Ms, _ = quantiles(l.ackLatency)
	st.OutputDelayP50Ms, st.OutputDelayP99Ms, _ = quantiles(l.gate.Delays())
	st.OutputHeldBytes = l.gate.Held()
	st.EpochTrigger = l.cfg.Trigger.String()
	st.EpochsByOutput, st.EpochsByClock = l.epochsByOutput, l.epochsByClock
	if l.cfg.Trigger == TriggerOutput {
		tc := l.cfg.triggerConfig()
		st.EpochBound = l.bound
		st.MaxOutputDelayMs = float64(tc.MaxOutputDelay.Microseconds()) / 1000
		st.MaxPauseFraction = tc.MaxPauseFraction
	}
	st.PausedMsPerSecond, st.HeldMsPerSecond = l.pausedPerSecond()
	st.ThrottlePercent = l.throttle
	st.Resync = l.resyncStatus()
	if l.lastResyncDone {
		ms, b := l.lastResync.Milliseconds(), l.lastResyncBytes
		st.LastResyncMs, st.LastResyncBytes = &ms, &b
	}
	return st
}

// LastAck is when the secondary last acknowledged anything on the
// current (or last) link; zero before the first.
func (l *EpochLoop) LastAck() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastAckAt
}

// pausedPerSecond is the guest's paused time over the last pauseWindow
// (or since the link's epochs started, if later), in ms per second, and
// of it the time that held guest work (what MaxPauseFraction bounds; see
// idlePauser); mu is held.
func (l *EpochLoop) pausedPerSecond() (paused, held float64) {
	if l.startedEpochs.IsZero() || len(l.pauseLog) == 0 {
		return 0, 0
	}
	now := l.clk.Now()
	window := min(pauseWindow, now.Sub(l.startedEpochs))
	if window <= 0 {
		return 0, 0
	}
	var sum, sumHeld time.Duration
	for _, s := range l.pauseLog {
		if !s.at.Before(now.Add(-window)) {
			sum += s.d
			sumHeld += s.held
		}
	}
	return 1000 * sum.Seconds() / window.Seconds(), 1000 * sumHeld.Seconds() / window.Seconds()
}

// quantiles returns p50, p99 and max in milliseconds.
func quantiles(ds []time.Duration) (p50, p99, mx float64) {
	if len(ds) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) float64 {
		return millis(s[min(len(s)-1, int(q*float64(len(s))))])
	}
	return at(0.5), at(0.99), millis(s[len(s)-1])
}

// millis is d in milliseconds, to the microsecond.
func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
