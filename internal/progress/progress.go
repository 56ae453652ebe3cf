package progress

import (
	"fmt"
	"time"
)

// Sample is one status reading of a migration.
type Sample struct {
	At          time.Time
	Transferred uint64  // bytes sent so far
	Remaining   uint64  // bytes still to send (dirty pages included)
	Total       uint64  // guest memory
	Mbps        float64 // the link's recent rate
	Done        bool    // completed: 100 %, ETA 0
}

// Tracker follows one migration. The zero value is ready.
type Tracker struct {
	percent float64
	eta     time.Duration // last ETA shown; <0: none yet
	etaAt   time.Time
	have    bool
}

// Observe reads s and returns the percentage done (never lower than one
// returned before) and the ETA (ok false while it cannot be estimated:
// round 0, before any rate is known). The ETA never rises: it is the
// smaller of the new estimate and the last one less the time since.
func (t *Tracker) Observe(s Sample) (percent float64, eta time.Duration, ok bool) {
	if s.Done {
		t.percent = 100
		return 100, 0, true
	}
	if s.Transferred+s.Remaining > 0 && s.Remaining > 0 {
		p := 100 * float64(s.Transferred) / float64(s.Transferred+s.Remaining)
		if s.Total > 0 && s.Transferred < s.Total {
			// Round 0 sends each page once: the share of memory sent.
			p = min(p, 100*float64(s.Transferred)/float64(s.Total))
		}
		t.percent = max(t.percent, min(p, 99.9))
	}
	rate := s.Mbps * 1e6 / 8 // bytes per second
	if rate <= 0 || s.Remaining == 0 {
		if t.have {
			return t.percent, t.countdown(s.At), true
		}
		return t.percent, 0, false
	}
	est := time.Duration(float64(s.Remaining) / rate * float64(time.Second))
	if t.have {
		est = min(est, t.countdown(s.At))
	}
	t.eta, t.etaAt, t.have = est, s.At, true
	return t.percent, est, true
}

func (t *Tracker) countdown(now time.Time) time.Duration {
	return max(0, t.eta-now.Sub(t.etaAt))
}

// FormatETA is an ETA for a progress line: "eta 12s", "eta <1s",
// "eta ?" while unknown.
func FormatETA(eta time.Duration, ok bool) string {
	switch {
	case !ok:
		return "eta ?"
	case eta < time.Second:
		return "eta <1s"
	}
	return fmt.Sprintf("eta %s", eta.Round(time.Second))
}

// DowntimeVerdict is the final line's judgement of a migration's
// downtime against its limit: "" when within it.
func DowntimeVerdict(downtime, limit time.Duration) string {
	if limit <= 0 || downtime <= limit {
		return ""
	}
	return fmt.Sprintf("DOWNTIME OVER THE LIMIT: %v > %v (--downtime-limit)", downtime.Round(time.Millisecond), limit)
}
