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

// PhaseAck is an epoch's pause-to-acknowledgement time in the timings
// (tandem_phase_seconds{phase="epoch_ack"}).
const PhaseAck = "epoch_ack"

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
		FlushAborts: l.flushAborts, BackpressureStalls: l.stalls, VerifyEpochs: l.cfg.Verify,
		VerifiedEpochs: l.verified, DigestMismatches: l.mismatches, LastMismatch: l.lastMismatch, Joins: l.joins,
		LastMismatchEpoch: l.mismatchEpoch, LastMismatchResolution: l.mismatchResolution,
		QueuePolicy: fmt.Sprintf("at most %d epochs unacknowledged and 1 queued for shipping; a slow secondary lengthens epochs", l.cfg.MaxInFlight),
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
	st.AckLatencyP50Ms, st.AckLatencyP99Ms, _ = quantiles(l.ackLatency)
	st.OutputDelayP50Ms, st.OutputDelayP99Ms, _ = quantiles(l.gate.Delays())
	st.OutputHeldBytes = l.gate.Held()
	return st
}

// quantiles returns p50, p99 and max in milliseconds.
func quantiles(ds []time.Duration) (p50, p99, mx float64) {
	if len(ds) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) float64 {
		i := min(len(s)-1, int(q*float64(len(s))))
		return float64(s[i].Microseconds()) / 1000
	}
	return at(0.5), at(0.99), float64(s[len(s)-1].Microseconds()) / 1000
}
