package ft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/postcopy"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// pcSource is a migration's post-copy page mover on the source
// (precopy.PostcopyLink): its two extra connections, opened before the
// first round, and the postcopy.Source serving them after the switch.
type pcSource struct {
	regions []guest.Region
	src     atomic.Pointer[postcopy.Source]
	log     *slog.Logger

	// mu guards the connections (a resume replaces them) and the
	// paused state (postcopy_resume.go).
	mu           sync.Mutex
	urgent, bulk net.Conn
	paused       pcPause
}

// SendMissing implements precopy.PostcopyLink.
func (p *pcSource) SendMissing(missing *precopy.Bitmap) error {
	return postcopy.SendMissing(p.urgent, missing, 0)
}

// Serve implements precopy.PostcopyLink.
func (p *pcSource) Serve(ctx context.Context, expected func() guest.Digest, lim *precopy.Limiter) error {
	s := postcopy.NewSourceFunc(p.regions, expected)
	s.Limiter = lim
	p.src.Store(s)
	for {
		p.mu.Lock()
		urgent, bulk := p.urgent, p.bulk
		p.mu.Unlock()
		err := s.Run(ctx, urgent, bulk)
		// A lost link is not the end: the guest runs on the destination
		// and this paused guest holds the pages it lacks, so the
		// migration waits for `tandem migrate --resume`.
		if !errors.Is(err, postcopy.ErrLink) {
			return err
		}
		if err := p.awaitResume(ctx, err); err != nil {
			return err
		}
	}
}

// close closes both connections (outside mu: a TLS close may wait to
// send its goodbye, and status must not).
func (p *pcSource) close() {
	p.mu.Lock()
	urgent, bulk := p.urgent, p.bulk
	p.mu.Unlock()
	urgent.Close()
	bulk.Close()
}

// fill adds the source's post-copy figures to a migration's status.
func (p *pcSource) fill(st *api.MigrationStatus) {
	if s := p.src.Load(); s != nil {
		ss := s.Stats()
		st.PostcopyRequests = ss.Requests
		if st.PostcopyActive {
			st.PostcopyRemainingPages = ss.Remaining
		}
	}
	p.fillPaused(st)
}

// openPostcopy (for a request with Postcopy) reads the destination's handshake answer
// (replica.Link.Postcopy) says whether it takes post-copy. If it does,
// the two extra connections are opened through the migration's dialer
// and trust, tied to the migration by id; if it does not, the migration
// stays precopy-only and refused says why (nil pcSource, ok). ok false:
// the error has been answered.
func (n *Node) openPostcopy(w http.ResponseWriter, r *http.Request, req migrateRequest, id string, link precopy.Link, g guest.Guest) (pc *pcSource, refused string, ok bool) {
	if !req.Postcopy {
		return nil, "", true
	}
	to := req.To
	rl, isLink := link.(*replica.Link)
	if !isLink {
		return nil, "post-copy needs a receiver, not a file", true
	}
	if granted, why := rl.Postcopy(); !granted {
		n.log.Warn("post-copy refused by the destination; the migration stays precopy-only", "to", to, "why", why)
		return nil, why, true
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	o := replica.DialOptions{TLS: n.trust.ID, Insecure: n.trust.Insecure}
	urgent, err := replica.DialPostcopy(ctx, to, id, replica.ChannelUrgent, o)
	if err != nil {
		WriteError(w, http.StatusBadGateway, api.CodeInternal, err)
		return nil, "", false
	}
	bulk, err := replica.DialPostcopy(ctx, to, id, replica.ChannelBulk, o)
	if err != nil {
		urgent.Close()
		WriteError(w, http.StatusBadGateway, api.CodeInternal, err)
		return nil, "", false
	}
	return &pcSource{urgent: urgent, bulk: bulk, regions: g.Regions(), log: n.log, paused: newPcPause()}, "", true
}

// pcInbound is a destination's post-copy side of the one migration it
// receives: the migration it granted post-copy to, that migration's two
// extra connections as they arrive, and the postcopy.Target after the
// switch.
type pcInbound struct {
	log     *slog.Logger
	apiAddr string // this node's API, for status's advice

	mu      sync.Mutex
	id      string              // the migration granted post-copy; "": none
	conns   map[string]net.Conn // by channel
	arrived chan struct{}       // closed once both channels are in
	tg      *postcopy.Target
	g       guest.Guest
	cancel  context.CancelFunc
	end     *runEnd // the Target's run, once it ends
	// last is the figures of the last Target, kept for status once it
	// is released.
	last   *postcopy.TargetStats
	lastID string
	// waiting is set while the run waits for a resume after a lost link
	// (closed when one arrives), linkErr why the link was lost, and
	// resumeConns a resume's channels as they arrive
	// (postcopy_resume.go).
	waiting     chan struct{}
	linkErr     string
	resumeConns map[string]net.Conn
	// peer is the name in the certificate of the source that opened
	// the migration's channels ("": plaintext): a resume's channels
	// must come from the same identity, since the migration id they
	// name is published in status during the outage.
	peer string
	// failed is why the run ended for good on a failure other than
	// the link's (a protocol error, a page that could not be placed):
	// no resume can continue it, only an abandon ends it.
	failed string
	// source is the API of the migration's source (as its Hello gave
	// it); lost, once an operator abandoned the migration, what status
	// says of it from then on (postcopy_lost.go).
	source string
	lost   *pcLost
}

// runEnd is a Target's run once it ended. err is set before done is
// closed, so any number of waiters (finish, abort, abandon) read it
// after <-done; a channel of one value would serve only the first.
type runEnd struct {
	done chan struct{}
	err  error
}

// wait waits for the run's end (nil: no run) and says how it ended.
func (e *runEnd) wait() error {
	if e == nil {
		return nil
	}
	<-e.done
	return e.err
}

// grant expects the channels of migration id (any earlier state is
// dropped).
func (p *pcInbound) grant(id string) {
	p.abort()
	p.mu.Lock()
	p.id, p.conns, p.arrived, p.peer = id, map[string]net.Conn{}, make(chan struct{}), ""
	p.mu.Unlock()
}

// granted says whether migration id was granted post-copy here.
func (p *pcInbound) granted(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return id != "" && p.id == id
}

// take is replica.Receiver.PostcopyConn: a channel is accepted only for
// the migration granted post-copy, once each.
func (p *pcInbound) take(h replica.Hello, conn net.Conn) error {
	p.mu.Lock()
	if h.Resume && (p.lost == nil || h.MigrationID != p.lost.id) {
		stale, err := p.takeResume(h, conn)
		p.mu.Unlock()
		dropConns(stale) // outside mu: a TLS close may wait to send its goodbye
		return err
	}
	defer p.mu.Unlock()
	if p.lost != nil && h.MigrationID == p.lost.id {
		return fmt.Errorf("post-copy migration %q was abandoned here at %s (its source declared lost): its guest is stopped for good: %w",
			p.lost.id, p.lost.at.UTC().Format(time.RFC3339), replica.ErrPostcopyGone)
	}
	switch {
	case p.id == "" || h.MigrationID != p.id:
		return fmt.Errorf("no post-copy migration %q here (receiving %q)", h.MigrationID, p.id)
	case p.conns[h.Channel] != nil:
		return fmt.Errorf("the %s channel of migration %q is already open", h.Channel, p.id)
	case conn == nil:
		return nil
	}
	// Both channels come from the one source: the second from another
	// certificate name is refused, as a resume's is (takeResume).
	name, named := trust.PeerName(conn)
	if named && p.peer != "" && name != p.peer {
		return fmt.Errorf("the %s channel of migration %q comes from %q, not %q, which opened its other channel", h.Channel, p.id, name, p.peer)
	}
	p.conns[h.Channel] = conn
	if named && p.peer == "" {
		p.peer = name
	}
	if len(p.conns) == 2 {
		close(p.arrived)
	}
	return nil
}

// postcopyGuest is a guest with the post-copy access path (both kinds).
type postcopyGuest interface {
	SetPostcopy(on bool)
	VCPUOfThread(tid uint32) int
}

// pcChannelWait bounds the wait, at the switch, for channels the source
// opened before its first round.
const pcChannelWait = 10 * time.Second

// start is the destination's switch (replica's PostcopySwitch): it
// reads the source's missing set and, if pages are missing, registers
// the guest's memory, drops the stale pages and starts the Target's run,
// all before the guest resumes. An empty set: a precopy completion. An
// error fails the migration before Ready, so the source resumes.
func (p *pcInbound) start(g guest.Guest, h replica.Hello, state guest.MachineState) error {
	p.mu.Lock()
	arrived, id := p.arrived, p.id
	p.mu.Unlock()
	if id == "" || id != h.MigrationID {
		return fmt.Errorf("post-copy: migration %q was not granted post-copy here", h.MigrationID)
	}
	select {
	case <-arrived:
	case <-time.After(pcChannelWait):
		return fmt.Errorf("post-copy: the source's channels did not arrive within %v", pcChannelWait)
	}
	p.mu.Lock()
	urgent := p.conns[replica.ChannelUrgent]
	p.mu.Unlock()
	missing, err := postcopy.ReadMissing(urgent, g.Regions(), 0)
	if err != nil {
		return fmt.Errorf("post-copy: read the missing set: %w", err)
	}
	if missing.Count() == 0 {
		p.abort() // a precopy completion: the channels are done with
		return nil
	}
	cfg := postcopy.TargetConfig{Regions: g.Regions(), Missing: missing, State: state, VCPUs: h.Config.VCPUs}
	pg, _ := g.(postcopyGuest)
	if pg != nil {
		cfg.VCPUOf = pg.VCPUOfThread
	}
	tg, err := postcopy.NewTarget(cfg)
	if err != nil {
		return fmt.Errorf("post-copy: %w", err)
	}
	if pg != nil {
		pg.SetPostcopy(true)
	}
	p.mu.Lock()
	p.tg, p.g, p.source = tg, g, sourceAPIOf(h.SourceAPI)
	p.mu.Unlock()
	p.run(tg, id)
	p.log.Info("post-copy: switched; the guest resumes with pages missing", "migration", id, "pages", missing.Count())
	return nil
}

// run starts tg's run for migration id (serve), joined by finish,
// abort or abandon through p.end.
func (p *pcInbound) run(tg *postcopy.Target, id string) {
	ctx, cancel := context.WithCancel(context.Background())
	end := &runEnd{done: make(chan struct{})}
	p.mu.Lock()
	p.cancel, p.end = cancel, end
	p.mu.Unlock()
	go func() {
		end.err = p.serve(ctx, tg, id)
		close(end.done)
	}()
}

// finish waits until every page arrived (the run ends) or ctx ends, and
// turns the guest's post-copy path off once all are in.
func (p *pcInbound) finish(ctx context.Context) {
	p.mu.Lock()
	tg, g, end := p.tg, p.g, p.end
	p.mu.Unlock()
	if tg == nil {
		p.abort()
		return
	}
	var err error
	select {
	case <-end.done:
		err = end.err
	case <-ctx.Done():
		err = ctx.Err()
	}
	st := tg.Stats()
	p.mu.Lock()
	abandoned := p.lost != nil
	p.mu.Unlock()
	switch {
	case abandoned:
		p.log.Info("post-copy ended: the migration was abandoned (its guest is lost)", "remaining", st.Remaining)
		return
	case err != nil:
		// The node is stopping (a lost link waits for a resume in
		// serve), or the run failed for good: the vCPUs that need a
		// missing page wait. Status says which (postcopy_lost.go).
		p.log.Error("post-copy did not finish: the guest waits for pages that do not come; resume the migration if the source comes back and the run failed on its link, else POST /migrate/abandon",
			"err", err, "remaining", st.Remaining, "link_down_since", st.LinkDownSince)
		return
	}
	if pg, ok := g.(postcopyGuest); ok {
		pg.SetPostcopy(false)
	}
	p.log.Info("post-copy complete: every page arrived; switch-over digest sent to the source", "digest", st.Digest,
		"requests", st.Requests, "received", st.Received, "blocktime_ms", st.BlocktimeMs)
	p.abort()
}

// abort stops the run (if any), releases the Target and closes the
// channels. Idempotent.
func (p *pcInbound) abort() {
	p.mu.Lock()
	tg, cancel, end, conns, id := p.tg, p.cancel, p.end, p.conns, p.id
	p.tg, p.g, p.cancel, p.end, p.conns, p.id = nil, nil, nil, nil, nil, ""
	half := p.dropResumeLocked()
	p.failed = ""
	p.mu.Unlock()
	dropConns(half...) // outside mu: a TLS close may wait to send its goodbye
	if cancel != nil {
		cancel()
		end.wait()
	}
	if tg != nil {
		st := tg.Stats()
		tg.Close()
		p.mu.Lock()
		p.last, p.lastID = &st, id
		p.mu.Unlock()
	}
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

// dropResumeLocked ends a wait for a resume: the waiting run is no
// longer woken by one, and the channels of a half-made resume are
// returned for the caller to close outside mu.
// Preconditions: p.mu held.
func (p *pcInbound) dropResumeLocked() []net.Conn {
	var half []net.Conn
	for _, c := range p.resumeConns {
		half = append(half, c)
	}
	p.resumeConns, p.waiting, p.linkErr = nil, nil, ""
	return half
}

// fill adds the destination's post-copy figures to its status, and says
// what a lost link or an abandoned migration means (postcopy_lost.go).
func (p *pcInbound) fill(st *nodeStatus) {
	p.mu.Lock()
	tg, last, lost, id, source, failed := p.tg, p.last, p.lost, p.id, p.source, p.failed
	p.mu.Unlock()
	var ts postcopy.TargetStats
	switch {
	case lost != nil:
		lost.fill(st)
		return
	case tg != nil:
		ts = tg.Stats()
	case last != nil:
		ts = *last
	default:
		return
	}
	fillTargetStats(&st.MigrationStatus, ts)
	p.fillPaused(&st.MigrationStatus, ts)
	if tg != nil {
		fillOutage(st, ts, id, source, p.apiAddr)
	}
	if tg != nil && failed != "" {
		fillFailed(st, ts, id, failed, p.apiAddr)
	}
}

// statusPostcopyFailed is a destination's migration status once its
// post-copy run ended on a failure other than the link's: no resume
// continues it.
const statusPostcopyFailed = "postcopy-failed"

// fillFailed says, over what fillOutage said of a lost link, that the
// run failed for good (why) and that only an abandon is left.
func fillFailed(st *nodeStatus, ts postcopy.TargetStats, id, why, apiAddr string) {
	st.Status, st.Error = statusPostcopyFailed, "post-copy failed here for good: "+why
	st.PostcopyLinkDownSince, st.PostcopyLinkError = "", ""
	st.StateReason = fmt.Sprintf("post-copy migration %s failed here for good (%s): %d pages never arrived and no resume can continue it "+
		"(the source's channels are refused); the guest cannot run past a missing page: declare it lost: tandem migrate --abandon --to %s --id %s",
		id, why, ts.Remaining, apiAddr, id)
}

// fillTargetStats puts a Target's figures in a status.
func fillTargetStats(st *api.MigrationStatus, ts postcopy.TargetStats) {
	st.PostcopyActive, st.PostcopyRequests = ts.Active, ts.Requests
	st.PostcopyRemainingPages, st.PostcopyBlocktimeMs = ts.Remaining, ts.BlocktimeMs
	st.PostcopyPages = ts.Remaining + ts.Received
}

// active says whether the guest may still lack pages (Go code must not
// read its memory: a status digest would fault and could hang).
func (p *pcInbound) active() bool {
	p.mu.Lock()
	tg := p.tg
	p.mu.Unlock()
	return tg != nil && tg.Stats().Active
}

// postcopyRefusesDigest says (in st) why a status memory digest is not
// taken while the destination's guest lacks pages: a scan from Go code
// would fault on them (docs/POSTCOPY.md).
func postcopyRefusesDigest(pcIn *pcInbound, st *nodeStatus) bool {
	if pcIn == nil || !pcIn.active() {
		return false
	}
	st.MemoryDigestError = "post-copy is active: pages are still missing; ask again once every page arrived"
	return true
}

// postcopyStatus adds the post-copy figures: the source's while its
// migration is the node's, else the destination's.
func postcopyStatus(st *nodeStatus, migrating bool, pcOut *pcSource, pcIn *pcInbound) {
	switch {
	case migrating && pcOut != nil:
		pcOut.fill(&st.MigrationStatus)
	case !migrating && pcIn != nil:
		pcIn.fill(st)
	}
}

// handleMigratePostcopy is POST /migrate/postcopy: the running migration
// switches to post-copy now (the round being sent stops). Refused without
// a running migration, or one that has no post-copy (not asked for, or
// refused by the destination: its status says why).
func (n *Node) handleMigratePostcopy(w http.ResponseWriter, r *http.Request) {
	n.mu.Lock()
	m, running := n.mig, n.migCancel != nil
	n.mu.Unlock()
	if m == nil || !running {
		WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("no migration running to switch to post-copy"))
		return
	}
	if err := m.SwitchToPostcopy(); err != nil {
		WriteError(w, http.StatusConflict, api.CodeRefused, err)
		return
	}
	n.log.Info("post-copy switch asked for: the round being sent stops")
	WriteJSON(w, http.StatusAccepted, map[string]any{"ok": true})
}
