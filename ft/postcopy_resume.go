package ft

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/postcopy"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// Post-copy recovery (docs/POSTCOPY.md, "Resume"): a link lost after the
// commit pauses the post-copy on both ends instead of ending it. The
// source keeps its paused guest and the pages the destination lacks; the
// destination's vCPUs that touch one of them wait. POST /migrate/resume
// on the source dials new channels to the destination, which hands them
// to its Target for a new run.

// pcPause is the source's paused state (under pcSource.mu).
type pcPause struct {
	since    time.Time     // when the link was lost; zero: up
	why      string        // the link's failure
	resumes  int           // resumes that reconnected
	resuming bool          // a resume is dialing
	resumed  chan struct{} // closed by a resume's new connections
	quit     chan struct{} // closed when the node closes, or the destination gave the migration up
	// gone is the destination's refusal of a resume because it no
	// longer holds the migration (abandoned, failed for good, a
	// restarted process): the pause ends, for nothing can continue it.
	gone string
}

func newPcPause() pcPause { return pcPause{quit: make(chan struct{})} }

// awaitResume pauses the post-copy after a link failure and waits for a
// resume (nil: its connections are in place), the node's end, or the
// destination's word that it gave the migration up (the error to end
// the serving with). It has no deadline of its own: this source holds
// the only copy of the pages the destination's running guest lacks, so
// only stopping the node, or the destination itself, gives them up.
func (p *pcSource) awaitResume(ctx context.Context, err error) error {
	resumed := make(chan struct{})
	p.mu.Lock()
	dropConns(p.urgent, p.bulk)
	p.paused.since, p.paused.why, p.paused.resumed = time.Now(), err.Error(), resumed
	quit := p.paused.quit
	p.mu.Unlock()
	var owed uint64
	if s := p.src.Load(); s != nil {
		owed = s.Stats().Remaining
	}
	p.log.Warn("POST-COPY PAUSED: the link to the destination is lost; the guest runs there and waits for the pages this source holds (its copy stays paused here); `tandem migrate --resume` continues it",
		"err", err, "pages_owed", owed)
	select {
	case <-resumed:
		return nil
	case <-quit:
	case <-ctx.Done():
	}
	p.mu.Lock()
	p.paused.since, p.paused.resumed = time.Time{}, nil
	gone := p.paused.gone
	p.mu.Unlock()
	if gone != "" {
		p.log.Error("POST-COPY ENDED: the destination no longer holds the migration; nothing can resume it, and this source's paused copy is stale",
			"refusal", gone, "pages_owed", owed)
		return fmt.Errorf("%w; the destination then gave the migration up: %s", err, gone)
	}
	return err
}

// stop ends a wait for a resume (the node is closing).
func (p *pcSource) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.quitLocked()
}

// quitLocked closes p.paused.quit once. Preconditions: p.mu held.
func (p *pcSource) quitLocked() {
	select {
	case <-p.paused.quit:
	default:
		close(p.paused.quit)
	}
}

// beginResume reserves a paused post-copy for one resume (endResume
// ends it), or says why there is nothing to resume (state: the
// migration's, for that answer).
func (p *pcSource) beginResume(id, state string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.paused.resumed == nil:
		return fmt.Errorf("migration %q is not paused (%s): nothing to resume", id, state)
	case p.paused.resuming:
		return fmt.Errorf("migration %q: another resume is connecting", id)
	}
	p.paused.resuming = true
	return nil
}

// endResume ends what beginResume began: with the new connections (dial
// nil) the post-copy goes on over them; refused by the migration's own
// destination (ownDest) saying it no longer holds the migration, the
// pause ends for good (awaitResume); otherwise it stays paused (another
// receiver's word, a --to typed wrong, says nothing of the migration).
func (p *pcSource) endResume(urgent, bulk net.Conn, dial error, ownDest bool) error {
	// Connections given up are closed after mu is released (deferred
	// first, run last): a TLS close may wait to send its goodbye, and
	// status waits for mu.
	var drop []net.Conn
	defer func() { dropConns(drop...) }()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.paused.resuming = false
	if dial == nil && p.paused.resumed == nil {
		dial = errors.New("the migration ended while the resume was connecting")
	}
	if ownDest && errors.Is(dial, replica.ErrPostcopyGone) && p.paused.resumed != nil {
		p.paused.gone = dial.Error()
		p.quitLocked()
	}
	if dial != nil {
		drop = []net.Conn{urgent, bulk}
		return dial
	}
	p.urgent, p.bulk = urgent, bulk
	close(p.paused.resumed)
	p.paused.since, p.paused.why, p.paused.resumed = time.Time{}, "", nil
	p.paused.resumes++
	return nil
}

// fillPaused adds the source's paused state to its status: the status
// itself says postcopy-paused, with since when and why.
func (p *pcSource) fillPaused(st *api.MigrationStatus) {
	p.mu.Lock()
	since, why, resumes, gone := p.paused.since, p.paused.why, p.paused.resumes, p.paused.gone
	p.mu.Unlock()
	st.PostcopyResumes = resumes
	if gone != "" {
		st.Outcome = "post-copy ended: the destination no longer holds the migration (" + gone + "): no resume can continue it; this source's copy stays paused for good and is stale"
		return
	}
	if since.IsZero() {
		return
	}
	st.Status, st.Outcome = precopy.StatusPostcopyPaused, precopy.OutcomePostcopyPaused
	st.PostcopyLinkDownSince, st.PostcopyLinkError = since.UTC().Format(time.RFC3339Nano), why
}

// dropConns closes the connections of a lost link. A TLS connection's
// own Close first sends its goodbye, waiting up to 5 s for a socket
// whose buffer the dead link has filled; the transport under it is
// closed at once instead (nothing more is sent on a link given up).
func dropConns(conns ...net.Conn) {
	for _, c := range conns {
		if c == nil {
			continue
		}
		if tc, ok := c.(interface{ NetConn() net.Conn }); ok {
			c = tc.NetConn()
		}
		c.Close()
	}
}

// PostcopyResumeDialTimeout bounds a resume's two dials and handshakes
// (a client's wait for POST /migrate/resume must be longer, or it gives
// up before the server's one-line refusal arrives).
const PostcopyResumeDialTimeout = 10 * time.Second

// handleMigrateResume is POST /migrate/resume on the source: a post-copy
// paused by a lost link goes on over new channels to the destination
// (the request's "to", default the migration's). Refused, in one line
// naming the ids, without a paused post-copy, for another migration id
// ("stale migration"), or by the destination (it holds another
// migration, or its link is still up).
func (n *Node) handleMigrateResume(w http.ResponseWriter, r *http.Request) {
	var req api.MigrateResumeRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<12)).Decode(&req); err != nil {
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("bad resume request: %v", err))
		return
	}
	if _, _, err := net.SplitHostPort(req.To); req.To != "" && err != nil {
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("bad resume request: to %q: want a receiver's data HOST:PORT", req.To))
		return
	}
	n.mu.Lock()
	m, pc, dest := n.mig, n.pcOut, n.migDest
	n.mu.Unlock()
	var ms api.MigrationStatus
	if m != nil {
		ms = m.Status()
	}
	id := ms.MigrationID
	refuse := func(err error) { WriteError(w, http.StatusConflict, api.CodeRefused, err) }
	switch {
	case m == nil || id == "":
		asked := "any"
		if req.MigrationID != "" {
			asked = strconv.Quote(req.MigrationID)
		}
		refuse(fmt.Errorf("nothing to resume: this source holds no migration (asked to resume %s); a source that lost it (restarted) holds none of its pages: `tandem migrate --abandon` on the destination declares the guest lost", asked))
		return
	case req.MigrationID != "" && req.MigrationID != id:
		refuse(fmt.Errorf("stale migration: this source holds migration %q; asked to resume %q", id, req.MigrationID))
		return
	case pc == nil:
		refuse(fmt.Errorf("migration %q has no post-copy (status %s): nothing to resume", id, ms.Status))
		return
	}
	state := "status " + ms.Status
	if ms.PostcopyActive {
		state = "its post-copy link is up"
	}
	if err := pc.beginResume(id, state); err != nil {
		refuse(err)
		return
	}
	to := cmp.Or(req.To, dest)
	urgent, bulk, err := n.dialResume(r.Context(), to, id)
	if err = pc.endResume(urgent, bulk, err, to == dest); err != nil {
		WriteError(w, http.StatusBadGateway, api.CodeRefused, fmt.Errorf("resume of migration %q: %w", id, err))
		return
	}
	n.mu.Lock()
	if n.mig == m {
		n.migDest = to // where the pages go now
	}
	n.mu.Unlock()
	n.log.Info("post-copy resumed: serving the destination's missing pages over new connections", "migration", id, "to", to)
	WriteJSON(w, http.StatusAccepted, map[string]any{"ok": true, "migration_id": id, "to": to})
}

// dialResume opens the resumed run's two channels to to, urgent first,
// with the node's identity and trust (as the migration's own).
func (n *Node) dialResume(ctx context.Context, to, id string) (urgent, bulk net.Conn, err error) {
	ctx, cancel := context.WithTimeout(ctx, PostcopyResumeDialTimeout)
	defer cancel()
	o := replica.DialOptions{TLS: n.trust.ID, Insecure: n.trust.Insecure}
	if urgent, err = replica.ResumePostcopy(ctx, to, id, replica.ChannelUrgent, o); err != nil {
		return nil, nil, err
	}
	if bulk, err = replica.ResumePostcopy(ctx, to, id, replica.ChannelBulk, o); err != nil {
		urgent.Close()
		return nil, nil, err
	}
	return urgent, bulk, nil
}

// serve runs the destination's Target until every page arrived (nil),
// ctx ends, or a failure other than the link's (recorded in p.failed:
// no resume continues such a run). A lost link pauses it: the channels
// are dropped and the run waits for the source's resume (takeResume),
// reported in status meanwhile.
func (p *pcInbound) serve(ctx context.Context, tg *postcopy.Target, id string) error {
	var err error
	for {
		// An abandon or abort may have taken the channels a resume just
		// handed over, and cancelled ctx, after the wait below woke:
		// the channels are read again, under mu, each round.
		p.mu.Lock()
		urgent, bulk := p.conns[replica.ChannelUrgent], p.conns[replica.ChannelBulk]
		p.mu.Unlock()
		if ctx.Err() != nil || urgent == nil || bulk == nil {
			return cmp.Or(err, ctx.Err(), errors.New("post-copy: the run's channels were taken away"))
		}
		err = tg.Run(ctx, urgent, bulk)
		dropConns(urgent, bulk)
		if ctx.Err() != nil {
			return err
		}
		if err != nil && !errors.Is(err, postcopy.ErrLink) {
			p.mu.Lock()
			p.failed = err.Error()
			p.mu.Unlock()
			p.log.Error("POST-COPY FAILED: the run ended on a failure other than the link's; no resume can continue it, the guest waits for pages that never come",
				"migration", id, "remaining", tg.Stats().Remaining, "err", err)
			return err
		}
		if err == nil {
			return nil
		}
		resumed := make(chan struct{})
		p.mu.Lock()
		p.waiting, p.linkErr = resumed, err.Error()
		p.mu.Unlock()
		p.log.Warn("POST-COPY PAUSED: the link to the source is lost; vCPUs that touch a missing page wait until the source's `tandem migrate --resume`",
			"migration", id, "remaining", tg.Stats().Remaining, "err", err)
		select {
		case <-resumed: // takeResume put the new channels in p.conns
			p.log.Info("post-copy resumed by the source", "migration", id)
		case <-ctx.Done():
			return err
		}
	}
}

// takeResume is take for a resume's channel: accepted only for the
// post-copy migration this destination runs, while its link is down.
// Once both channels are in, the waiting run is woken; a channel that
// comes again (a resume retried after a half-made one) replaces the
// earlier one, returned as stale for the caller to close outside mu.
// conn nil: check only.
// Preconditions: p.mu held.
func (p *pcInbound) takeResume(h replica.Hello, conn net.Conn) (stale net.Conn, err error) {
	held := "none"
	if p.id != "" && p.tg != nil {
		held = strconv.Quote(p.id)
	}
	switch {
	case p.tg == nil || h.MigrationID != p.id:
		return nil, fmt.Errorf("this destination holds post-copy migration %s; asked to resume %q: %w", held, h.MigrationID, replica.ErrPostcopyGone)
	case p.failed != "":
		return nil, fmt.Errorf("migration %q cannot be resumed: its post-copy run failed here for good (%s); only an abandon ends it: %w", p.id, p.failed, replica.ErrPostcopyGone)
	case p.waiting == nil:
		return nil, fmt.Errorf("migration %q: its post-copy link is up here, nothing to resume (a lost link is noticed within %v: retry then)", p.id, postcopy.DefaultLinkTimeout)
	case conn == nil:
		return nil, nil
	}
	if name, _ := trust.PeerName(conn); p.peer != "" && name != p.peer {
		return nil, fmt.Errorf("resume of migration %q refused: its channels came from %q, the migration's source is %q", p.id, name, p.peer)
	}
	if p.resumeConns == nil {
		p.resumeConns = map[string]net.Conn{}
	}
	stale = p.resumeConns[h.Channel]
	p.resumeConns[h.Channel] = conn
	if len(p.resumeConns) < 2 {
		return stale, nil
	}
	p.conns, p.resumeConns = p.resumeConns, nil
	close(p.waiting)
	p.waiting, p.linkErr = nil, ""
	return stale, nil
}

// fillPaused adds the destination's paused state to its status while
// its Target waits for a resume.
func (p *pcInbound) fillPaused(st *api.MigrationStatus, ts postcopy.TargetStats) {
	p.mu.Lock()
	waiting, why, id := p.waiting != nil, p.linkErr, p.id
	p.mu.Unlock()
	st.PostcopyResumes = max(ts.Runs-1, 0)
	if id != "" {
		st.MigrationID = id
	}
	if !waiting || ts.LinkDownSince.IsZero() {
		return
	}
	st.Status = precopy.StatusPostcopyPaused
	st.PostcopyLinkDownSince, st.PostcopyLinkError = ts.LinkDownSince.UTC().Format(time.RFC3339Nano), why
}
