package failover

import (
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest"
)

// resyncProgress is a join's catch-up as it goes: the status shows it
// (api.ResyncStatus) and the "protected" line says what it took.
type resyncProgress struct {
	at        time.Time // zero: no join in progress
	addr      string
	phase     string
	pagesDone uint64 // pages the full sync went through (sent or zero)
	bytes     uint64 // page bytes sent, dirty rounds included
}

// resyncStart begins a join's progress (mu not held).
func (l *EpochLoop) resyncStart(addr string) {
	l.mu.Lock()
	l.resync = resyncProgress{at: l.clk.Now(), addr: addr, phase: "connecting"}
	l.mu.Unlock()
}

// resyncPhase moves the join in progress to phase (mu not held).
func (l *EpochLoop) resyncPhase(phase string) {
	l.mu.Lock()
	if !l.resync.at.IsZero() {
		l.resync.phase = phase
	}
	l.mu.Unlock()
}

// resyncPages is the sender's OnPages during a join: sent pages went on
// the wire, zero ones were skipped by the full sync.
func (l *EpochLoop) resyncPages(sent, zero uint64) {
	l.mu.Lock()
	if !l.resync.at.IsZero() {
		if l.resync.phase == "full sync" {
			l.resync.pagesDone += sent + zero
		}
		l.resync.bytes += sent * guest.PageSize
	}
	l.mu.Unlock()
}

// resyncEnd ends the join's progress; done records it as the last
// completed catch-up (mu not held).
func (l *EpochLoop) resyncEnd(done bool) {
	l.mu.Lock()
	if done && !l.resync.at.IsZero() {
		l.lastResync = l.clk.Now().Sub(l.resync.at)
		l.lastResyncBytes = l.resync.bytes
		l.lastResyncDone = true
	}
	l.resync = resyncProgress{}
	l.mu.Unlock()
}

// resyncStatus is the join in progress for the status (nil: none); mu
// is held.
func (l *EpochLoop) resyncStatus() *api.ResyncStatus {
	r := l.resync
	if r.at.IsZero() {
		return nil
	}
	st := &api.ResyncStatus{Secondary: r.addr, Phase: r.phase, PagesDone: min(r.pagesDone, l.guestPages),
		PagesTotal: l.guestPages, BytesSent: r.bytes, ElapsedMs: l.clk.Now().Sub(r.at).Milliseconds()}
	if l.guestPages > 0 {
		st.Percent = 100 * float64(st.PagesDone) / float64(l.guestPages)
	}
	return st
}

// repeatLog quiets lines that repeat: each key is logged at most once
// per repeatQuiet, and the next one logged says how many were left out.
// reset (protection came back) forgets them all.
type repeatLog map[string]*repeat

// repeatQuiet is how long a repeated "not protected" line stays quiet.
const repeatQuiet = 30 * time.Second

// admit says whether the line with key is logged now, and how many were
// left out before it.
func (r *repeatLog) admit(key string, now time.Time) (bool, int) {
	if *r == nil {
		*r = repeatLog{}
	}
	rp := (*r)[key]
	if rp == nil {
		if len(*r) >= 16 { // distinct failures: keep the map small
			clear(*r)
		}
		(*r)[key] = &repeat{logged: now}
		return true, 0
	}
	if now.Sub(rp.logged) < repeatQuiet {
		rp.suppressed++
		return false, 0
	}
	n := rp.suppressed
	rp.logged, rp.suppressed = now, 0
	return true, n
}

func (r *repeatLog) reset() { clear(*r) }
