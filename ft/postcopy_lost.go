package ft

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/postcopy"
	"github.com/tandemvm/tandem/replica"
)

// The source's death during post-copy, on the destination of an
// unprotected guest (docs/POSTCOPY.md, "Source death"). The pages the
// source still owed exist nowhere else: while its link is down the
// destination's status says so (fillOutage), and an operator who knows
// the source is gone declares the guest lost (POST /migrate/abandon):
// the half guest is stopped for good rather than left to run on
// silently until it touches a page that never comes.

// statusPostcopyPaused is a destination's migration status while its
// post-copy source is unreachable (QEMU's name for the same state).
const statusPostcopyPaused = "postcopy-paused"

// stateLost is the node's state once its guest was declared lost.
const stateLost = "lost"

// pcLost is a post-copy migration abandoned on its destination: what
// status says of it from then on. Not changed after it is published.
type pcLost struct {
	id, source string
	at         time.Time // abandoned
	downSince  time.Time // the source's last word (unreachableSince)
	stats      postcopy.TargetStats
}

func rfc3339(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

// reason is the node's state_reason once the guest is lost.
func (l *pcLost) reason() string {
	return fmt.Sprintf("guest lost: post-copy migration %s from %s was abandoned at %s (its source unreachable since %s): "+
		"%d pages never arrived, so this half guest can never be whole; its vCPUs are stopped for good and nothing of it runs or sends here again. "+
		"The source's copy, if its process still lives, stays paused (it committed at the switch and never resumes after that)",
		l.id, sourceName(l.source), rfc3339(l.at), rfc3339(l.downSince), l.stats.Remaining)
}

// sourceName is a source as status names it.
func sourceName(s string) string {
	if s == "" {
		return "(a source that gave no API)"
	}
	return s
}

// fill puts the abandoned migration in a status.
func (l *pcLost) fill(st *nodeStatus) {
	fillTargetStats(&st.MigrationStatus, l.stats)
	st.PostcopyActive = false // nothing runs: no page will come
	st.MigrationID, st.PostcopySource = l.id, l.source
	st.PostcopyAbandonedAt, st.PostcopySourceUnreachableSince = rfc3339(l.at), rfc3339(l.downSince)
	st.Error = "abandoned: the post-copy source was declared lost"
}

// fillOutage says, while a destination's guest lacks pages, which
// migration and source it waits on, and while the link to that source is
// down, since when, which vCPUs are blocked and for how long, and what
// the operator can do (state_reason; status postcopy-paused).
func fillOutage(st *nodeStatus, ts postcopy.TargetStats, id, source, apiAddr string) {
	if !ts.Active {
		return
	}
	st.MigrationID, st.PostcopySource = id, source
	if ts.LinkDownSince.IsZero() {
		return // connected: the pages are coming
	}
	since := unreachableSince(ts)
	down := max(time.Since(since), 0)
	st.Status = statusPostcopyPaused
	st.PostcopySourceUnreachableSince, st.PostcopySourceUnreachableMs = rfc3339(since), down.Milliseconds()
	st.PostcopyWaitingMs = make([]int64, len(ts.Waiting))
	var blocked []string
	for v, d := range ts.Waiting {
		st.PostcopyWaitingMs[v] = d.Milliseconds()
		if d > 0 {
			blocked = append(blocked, fmt.Sprintf("vCPU %d for %v", v, d.Round(time.Millisecond)))
		}
	}
	vcpus := "no vCPU is blocked yet (each runs until it touches a missing page, then waits)"
	if len(blocked) > 0 {
		vcpus = "blocked on a missing page: " + strings.Join(blocked, ", ")
	}
	st.StateReason = fmt.Sprintf("post-copy migration %s: the source %s has been unreachable since %s (its last word, %v ago); %d pages exist only there, "+
		"and the guest cannot run past a missing page: %s. If the source comes back, resume the migration (tandem migrate --resume --from %s --id %s); "+
		"if it is gone, declare the guest lost: tandem migrate --abandon --to %s --id %s",
		id, sourceName(source), rfc3339(since), down.Round(100*time.Millisecond), ts.Remaining, vcpus, sourceName(source), id, apiAddr, id)
}

// unreachableSince is when the source went: its last frame (a silent
// source is declared gone only a link timeout later), or, with none
// heard, when the link was lost.
func unreachableSince(ts postcopy.TargetStats) time.Time {
	if !ts.LastHeard.IsZero() && ts.LastHeard.Before(ts.LinkDownSince) {
		return ts.LastHeard
	}
	return ts.LinkDownSince
}

// abandon declares the source of the post-copy migration lost (id, if
// set, must name it): the run is stopped, its channels closed, and from
// here on status reports the migration abandoned and its channels are
// refused. It returns what was lost and the Target, which the caller
// closes once the guest is closed (its fault loop maps never-touched
// pages meanwhile). Refused, with nothing changed: no post-copy
// migration here, another id, every page arrived (the guest is whole),
// or a source still connected. Whether the link is down is the run's
// word (waiting for a resume, or failed for good), not the Target's
// LinkDownSince: a resume that just handed its channels over has
// reconnected the source though the new run has not cleared it yet.
func (p *pcInbound) abandon(id string) (*pcLost, *postcopy.Target, error) {
	p.mu.Lock()
	var ts postcopy.TargetStats
	if p.tg != nil {
		ts = p.tg.Stats()
	}
	switch {
	case p.lost != nil:
		p.mu.Unlock()
		return nil, nil, fmt.Errorf("post-copy migration %s was already abandoned at %s", p.lost.id, rfc3339(p.lost.at))
	case p.tg == nil && p.last != nil && p.last.Remaining == 0:
		p.mu.Unlock()
		return nil, nil, fmt.Errorf("post-copy migration %s is complete: every page arrived and the guest is whole; nothing to abandon", p.lastID)
	case p.tg == nil:
		p.mu.Unlock()
		return nil, nil, errors.New("no post-copy migration on this node to abandon")
	case id != "" && id != p.id:
		p.mu.Unlock()
		return nil, nil, fmt.Errorf("migration %q is not this destination's: it holds post-copy migration %s", id, p.id)
	case !ts.Active:
		p.mu.Unlock()
		return nil, nil, fmt.Errorf("every page of post-copy migration %s has arrived: the guest is whole; nothing to abandon", p.id)
	case p.waiting == nil && p.failed == "":
		p.mu.Unlock()
		return nil, nil, fmt.Errorf("the source of post-copy migration %s is connected and its pages are arriving (%d left): abandon only a migration whose source is unreachable", p.id, ts.Remaining)
	}
	l := &pcLost{id: p.id, source: p.source, at: time.Now(), downSince: unreachableSince(ts), stats: ts}
	tg, cancel, end, conns := p.tg, p.cancel, p.end, p.conns
	p.lost = l
	p.tg, p.g, p.cancel, p.end, p.conns, p.id = nil, nil, nil, nil, nil, ""
	half := p.dropResumeLocked()
	p.mu.Unlock()
	dropConns(half...) // a half-made resume's channels: outside mu
	if cancel != nil {
		cancel()
		end.wait() // the run ended with the link; bounded either way (Run's readers have deadlines)
	}
	dropConns(conns[replica.ChannelUrgent], conns[replica.ChannelBulk])
	return l, tg, nil
}

// maxSourceAPI bounds the source's API address as a peer's Hello gives
// it, before status, state_reason and logs repeat it.
const maxSourceAPI = 256

// sourceAPIOf is a Hello's SourceAPI as this node keeps it: a HOST:PORT
// of bounded length, or "" (status then says the source gave none).
func sourceAPIOf(s string) string {
	host, port, err := net.SplitHostPort(s)
	if err != nil || len(s) > maxSourceAPI || host == "" || strings.ContainsFunc(host, func(r rune) bool { return r <= ' ' || r > '~' }) {
		return ""
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return ""
	}
	return s
}

// handleMigrateAbandon is POST /migrate/abandon on a post-copy
// destination ({"migration_id": ID}, optional): the operator declares
// the source lost. The half guest is silenced at once (console, card,
// TAP), detached from the node (state lost; status, the console and the
// digest no longer reach it), then closed in the background: its vCPUs
// stop, but one blocked on a missing page stays blocked in the kernel
// until the process ends (the Target keeps its userfaultfd open so no
// such vCPU is handed a zero page). Nothing resumes it: the receiver
// takes no more migrations once a guest ran here, refuses the
// migration's channels, and a restarted process holds no guest.
func (n *Node) handleMigrateAbandon(w http.ResponseWriter, r *http.Request) {
	var req api.AbandonRequest
	if r.ContentLength != 0 {
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<12)).Decode(&req); err != nil {
			WriteError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("want {\"migration_id\": ID} or no body: %v", err))
			return
		}
	}
	n.mu.Lock()
	pending, state, pc, hold := n.pending, n.state, n.pcIn, n.hold
	n.mu.Unlock()
	if hold != nil && !hold.discarded.Load() && hold.reason() != "" {
		// A protected source's guest is not lost when its source dies:
		// its secondary is the fallback, and this copy said nothing.
		WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("migration %s came from a protected source and this copy's output is held: the guest is not lost (its source's secondary falls back to the epoch the move started from); discard this copy with POST /migrate/abort {\"force\": true} once that secondary is activated", hold.id))
		return
	}
	if pending != nil {
		WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("migration %s awaits its commit: its guest never ran here; POST /migrate/abort drops it", pending.res.Hello.MigrationID))
		return
	}
	if pc == nil || (state != "running" && state != stateLost) {
		WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("no post-copy migration on this node to abandon (state %s)", state))
		return
	}
	l, tg, err := pc.abandon(req.MigrationID)
	if err != nil {
		WriteError(w, http.StatusConflict, api.CodeRefused, err)
		return
	}
	n.lockIdle()
	g := n.g
	n.g, n.inbound, n.state, n.stateReason = nil, nil, stateLost, l.reason()
	n.mu.Unlock()
	n.exits.follow(nil, nil)
	silence(g)
	n.net.attach(nil) // no frame reaches it, no announcement names it
	n.users.Add(1)
	go func() { // joined by Close (users)
		defer n.users.Done()
		closeLostGuest(n, g, tg)
	}()
	n.log.Error("GUEST LOST: post-copy source declared lost by the operator; the half guest is stopped for good",
		"migration", l.id, "source", l.source, "pages_never_received", l.stats.Remaining, "unreachable_since", l.downSince)
	WriteJSON(w, http.StatusOK, api.AbandonResult{OK: true, MigrationID: l.id, Source: l.source, PagesLost: l.stats.Remaining,
		Detail: l.reason()})
}

// silence cuts a guest's outputs: nothing it writes to its console or
// sends on its card leaves the node from here on.
func silence(g guest.Guest) {
	if g == nil {
		return
	}
	g.Console().SetOutput(nil)
	if nic := guest.NICOf(g); nic != nil {
		nic.SetTransmit(nil)
	}
}

// closeLostGuest closes an abandoned guest (bounded: a vCPU that waits
// for a missing page does not stop, and its memory then stays mapped),
// then the Target: its fault loop served never-touched pages until the
// other vCPUs were gone.
func closeLostGuest(n *Node, g guest.Guest, tg *postcopy.Target) {
	if g != nil {
		if err := g.Close(); err != nil {
			n.log.Warn("closing the lost guest: a vCPU waits for a page that never comes (it stays blocked until the process ends)", "err", err)
		}
	}
	tg.Close()
	n.log.Info("the lost guest is closed")
}

// collectors are a post-copy destination's alerts: how long its source
// has been unreachable with pages owed (0 otherwise), and whether its
// guest was declared lost.
func (p *pcInbound) collectors() []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "tandem_postcopy_source_unreachable_seconds",
			Help: "on a post-copy destination whose guest lacks pages: seconds since its source's last word, once the link to it is lost (0 otherwise)"},
			func() float64 {
				p.mu.Lock()
				tg := p.tg
				p.mu.Unlock()
				if tg == nil {
					return 0
				}
				ts := tg.Stats()
				if !ts.Active || ts.LinkDownSince.IsZero() {
					return 0
				}
				return max(time.Since(unreachableSince(ts)).Seconds(), 0)
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "tandem_guest_lost",
			Help: "1 once this node's guest was declared lost (a post-copy migration abandoned with pages never received)"},
			func() float64 {
				p.mu.Lock()
				defer p.mu.Unlock()
				if p.lost != nil {
					return 1
				}
				return 0
			}),
	}
}
