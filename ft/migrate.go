package ft

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/block"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// migrateRequest is the body of POST /migrate; `tandem migrate` sends it.
type migrateRequest = api.MigrateRequest

// migratePolicy is the precopy policy a migrate request asks for.
func migratePolicy(req migrateRequest) (precopy.Policy, error) {
	p := precopy.DefaultPolicy()
	p.MaxBandwidth = req.MaxBandwidth
	if req.DowntimeLimitMs > 0 {
		p.DowntimeLimit = time.Duration(req.DowntimeLimitMs) * time.Millisecond
		// The default target (20 ms) must not exceed a smaller limit.
		p.DowntimeTarget = min(p.DowntimeTarget, p.DowntimeLimit)
	}
	if req.MaxTimeMs > 0 {
		p.MaxTime = time.Duration(req.MaxTimeMs) * time.Millisecond
	}
	if req.MinRetryMs > 0 {
		p.MinRetryInterval = time.Duration(req.MinRetryMs) * time.Millisecond
	}
	if req.AutoConverge != nil {
		p.AutoConverge = *req.AutoConverge
	}
	return p, p.Validate()
}

// parseMigrateRequest reads and checks a POST /migrate body, or answers
// why not: the request, its precopy policy, its compression and the
// rounds before a post-copy switch.
func parseMigrateRequest(w http.ResponseWriter, r *http.Request) (req migrateRequest, pol precopy.Policy, comp checkpoint.Compression, pcRounds int, ok bool) {
	bad := func(err error) (migrateRequest, precopy.Policy, checkpoint.Compression, int, bool) {
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, err)
		return req, pol, comp, 0, false
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&req); err != nil {
		return bad(fmt.Errorf("bad migrate request: %v", err))
	}
	if req.Streams < 0 || req.Streams > api.MaxMigrateStreams {
		return bad(fmt.Errorf("bad migrate request: streams %d not in 1..%d", req.Streams, api.MaxMigrateStreams))
	}
	pcRounds = -1 // the controller alone decides (precopy.DecideSwitch)
	if req.PostcopyAfterRounds != nil {
		pcRounds = *req.PostcopyAfterRounds
	}
	if req.PostcopyAfterRounds != nil && (pcRounds < 0 || pcRounds > api.MaxPostcopyAfterRounds) {
		return bad(fmt.Errorf("bad migrate request: postcopy_after_rounds %d not in 0..%d", pcRounds, api.MaxPostcopyAfterRounds))
	}
	if req.Postcopy && strings.HasPrefix(req.To, "file:") {
		return bad(errors.New("bad migrate request: postcopy needs a receiver, not a file: destination"))
	}
	pol, err := migratePolicy(req)
	if err != nil {
		return bad(err)
	}
	if comp, err = checkpoint.ParseCompression(cmp.Or(req.Compression, "default")); err != nil {
		return bad(err)
	}
	return req, pol, comp, pcRounds, true
}

func (n *Node) handleMigrate(w http.ResponseWriter, r *http.Request) {
	req, pol, comp, pcRounds, ok := parseMigrateRequest(w, r)
	if !ok {
		return
	}
	g, cfg, protected, ok := n.reserveForMigration(w, req)
	if !ok {
		return
	}
	started := false
	defer func() {
		if !started {
			n.mu.Lock()
			n.migBusy = false
			n.mu.Unlock()
		}
	}()
	hello := replica.Hello{Purpose: replica.PurposeMigrate, Kind: g.Kind(), Config: cfg, Build: version.Build(),
		Devices: guest.StateSectionsOf(g)}
	migID := newMigrationID()
	if !strings.HasPrefix(req.To, "file:") {
		// Two-phase switch-over: the destination resumes only on this
		// source's commit (see precopy.Committer).
		hello.Commit, hello.MigrationID, hello.SourceAPI = true, migID, cmp.Or(req.SourceAPI, n.api.Addr())
		hello.Postcopy = req.Postcopy
		hello.HoldOutput = protected
		hello.Resident = replica.ResidentHint(g)
	}
	// Connect and handshake before answering, so a refusal (another kind,
	// another format version, nobody listening) comes back to the caller
	// before the guest is paused at all.
	opts := checkpoint.Options{Compression: comp, Encoders: req.Streams, CacheBytes: migrationCache(req.MaxBandwidth, g), HugeCache: true}
	link, closeLink, ok := n.openMigrationLink(w, r, req.To, hello, g, opts)
	if !ok {
		return
	}
	pc, pcRefused, ok := n.openPostcopy(w, r, req, migID, link, g)
	if !ok {
		closeLink()
		return
	}
	if pc != nil {
		linkOnly := closeLink
		closeLink = func() { pc.close(); linkOnly() }
	}
	if protected {
		pol.AutoConverge = false // the epoch loop throttles its guest itself
	}
	core := precopy.NewCore(g, n.api.timings)
	m, err := precopy.NewMigration(core, link, pol)
	if err != nil {
		closeLink()
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, err)
		return
	}
	m.SetID(migID)
	if pc != nil {
		m.Postcopy, m.PostcopyAfterRounds = pc, pcRounds
	}
	m.SetPostcopyRefused(pcRefused)
	pm, ok := n.startPairMove(w, protected, req.To, migID, pcRefused, link, pc != nil, core, m)
	if !ok {
		closeLink()
		return
	}
	m.Log = n.log
	// From the final pause on, the guest's address is the destination's
	// to announce (it does once it resumes); this node's schedule, if one
	// still runs, ends here rather than after the commit.
	m.OnFinalPause = n.net.stopAnnouncing
	started = true
	n.launchMigration(m, req.To, closeLink, pc, pm)
	reply := map[string]any{"ok": true, "to": req.To}
	if pcRefused != "" {
		reply["postcopy_refused"] = pcRefused
	}
	WriteJSON(w, http.StatusAccepted, reply)
}

// launchMigration runs m (to to) on a goroutine of the node's, recording
// it as the node's migration with its post-copy mover pc and its pair
// move pm (either nil: none); closeLink ends its connections.
func (n *Node) launchMigration(m *precopy.Migration, to string, closeLink func(), pc *pcSource, pm *pairMove) {
	if pc != nil && pm == nil {
		// A post-copy may serve pages long after its commit: the node
		// says from the commit on that its guest is the destination's.
		m.OnCommit = func() { n.committedPostcopy(m, to) }
	}
	ctx, cancel := context.WithCancel(context.Background())
	n.mu.Lock()
	n.mig, n.migDest, n.migCancel, n.pcOut = m, to, cancel, pc
	if pm != nil {
		n.pairMove = pm
	}
	n.mu.Unlock()
	n.users.Add(1)
	go func() { // owned by the node: migCancel stops it, Close joins it (users)
		defer n.users.Done()
		defer cancel()
		n.runMigration(ctx, m, to, closeLink)
		if pm != nil {
			n.pairMoveFinished(pm, m.Status())
		}
	}()
}

// migrationCache is the size of the stream's XOR delta cache. On a
// capped link (a bandwidth limit) the link, not the source's memory or
// CPU, is the bottleneck, so the cache grows to cover the guest's memory,
// up to maxLinkCacheBytes: a page rewritten a few bytes at a time is then
// sent again as a small delta instead of 4 KiB (the default cache, 64
// MiB, holds an eighth of a 512 MiB working set). Whole-page rewrites of
// fresh data gain nothing from it. The cache costs the source what it
// fills, up to its size, for the migration's length: on the host that
// holds the only running copy, so it is bounded. Uncapped, the default.
func migrationCache(maxBandwidth uint64, g guest.Guest) int64 {
	if maxBandwidth == 0 {
		return 0
	}
	var total int64
	for _, r := range g.Regions() {
		total += int64(len(r.Mem))
	}
	return min(max(total, checkpoint.DefaultCacheBytes), maxLinkCacheBytes)
}

// maxLinkCacheBytes bounds the delta cache of a migration over a capped
// link: the source's extra memory for it.
const maxLinkCacheBytes = 1 << 30

// reserveForMigration reserves the running guest for one migration
// (migBusy), or answers why not: no running guest, a migration already
// running, or a protected guest that may not move this way
// (protectedRefusal). protected: a pair primary's protected guest, moved
// by migrate_protected.go's rules.
func (n *Node) reserveForMigration(w http.ResponseWriter, req migrateRequest) (g guest.Guest, cfg guest.Config, protected, ok bool) {
	n.lockIdle()
	// An epoch loop that has a secondary owns the guest's dirty log and
	// pauses; one without (an activated node not yet re-protected) is idle.
	protected = n.sec != nil || n.cluster != nil || (n.epochs != nil && n.epochs.Status().Secondary != "")
	var why error
	if protected {
		pairPrimary := n.sec == nil && n.cluster == nil && n.pair != nil && n.pairMember != nil
		why = protectedRefusal(pairPrimary, n.cluster != nil, req, n.cfg.Disk)
	}
	g, cfg, state, busy := n.g, n.cfg, n.state, n.migBusy
	refuse := g == nil || state != "running" || busy || why != nil
	if !refuse {
		n.migBusy = true
	}
	n.mu.Unlock()
	switch {
	case g == nil || state != "running":
		WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("no running guest to migrate (state %s)", state))
	case busy:
		WriteError(w, http.StatusConflict, api.CodeBusy, errors.New("a migration is already running"))
	case why != nil:
		// The epoch loop owns the guest's dirty log and its pauses; a
		// migration beside it would take pages the secondary never gets.
		WriteError(w, http.StatusConflict, api.CodeRefused, why)
	default:
		return g, cfg, protected, true
	}
	return nil, guest.Config{}, false, false
}

// openMigrationLink opens the migration's link to to (a receiver's data
// address, or file:NAME under the snapshot directory), or answers why not.
func (n *Node) openMigrationLink(w http.ResponseWriter, r *http.Request, to string, hello replica.Hello, g guest.Guest, opts checkpoint.Options) (precopy.Link, func(), bool) {
	if name, ok := strings.CutPrefix(to, "file:"); ok {
		// The name comes from whoever reached the API: it is resolved
		// under this node's --snapshot-dir and never taken as a path.
		path, err := snapshotPath(n.snapshotDir, name)
		if err != nil {
			WriteError(w, http.StatusBadRequest, api.CodeRefused, fmt.Errorf("migrate to %s refused: %w", to, err))
			return nil, nil, false
		}
		fl, err := replica.CreateFileLink(path, hello, g.Regions(), opts)
		if err != nil {
			WriteError(w, http.StatusBadRequest, "", err)
			return nil, nil, false
		}
		return fl, fl.Abort, true
	}
	// The source dials with its own identity; the destination must hold
	// a certificate of the same CA.
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	l, err := replica.Dial(ctx, to, hello, g.Regions(), replica.DialOptions{Stream: opts, TLS: n.trust.ID, Insecure: n.trust.Insecure})
	cancel()
	if err != nil {
		WriteError(w, http.StatusBadGateway, api.CodeInternal, err)
		return nil, nil, false
	}
	return l, func() { l.Close() }, true
}

// runMigration runs m to its end and records how it ended.
func (n *Node) runMigration(ctx context.Context, m *precopy.Migration, to string, closeLink func()) {
	err := m.Run(ctx)
	closeLink()
	// The state changes with migBusy, under one lock: a completed
	// migration leaves a paused guest that runs elsewhere now, and a
	// second POST /migrate must not find it "running" in between.
	unconfirmed := errors.Is(err, precopy.ErrCommitUnconfirmed)
	n.mu.Lock()
	n.migBusy, n.migCancel = false, nil // nothing left to cancel
	if err == nil || unconfirmed {
		n.state, n.stateReason = "postmigrate", ""
	}
	switch st := m.Status(); {
	case unconfirmed && st.PostcopyPages > 0:
		n.stateReason = "committed to " + to + ", but post-copy ended before every page arrived (" + err.Error() + "): the guest is stopped here for good; see the destination's status for its guest"
	case unconfirmed:
		n.stateReason = "commit sent to " + to + " but not confirmed: the guest is stopped here for good; the destination resumes it once it learns of the commit (it asks this API), or by POST /migrate/commit on it"
	}
	n.mu.Unlock()
	if err == nil || unconfirmed {
		// The guest runs elsewhere now: frames for it are not this
		// node's to deliver, nor its address to announce.
		n.net.attach(nil)
	}
	if unconfirmed && m.Status().PostcopyPages > 0 {
		n.log.Error("post-copy ended before every page arrived: the guest stays stopped here for good; the destination's status says what became of its guest", "to", to, "err", err)
		return
	}
	if unconfirmed {
		n.log.Error("migration committed but unconfirmed: the guest stays stopped here; the destination holds it, paused, until it learns of the commit", "to", to, "err", err)
		return
	}
	if err != nil {
		n.log.Error("migration failed; the guest keeps running here", "to", to, "err", err)
		return
	}
	st := m.Status()
	n.log.Info("migration completed; the guest runs on the destination", "to", to,
		"downtime_ms", st.DowntimeMs, "total_time_ms", st.TotalTimeMs, "transferred_bytes", st.TransferredBytes)
}

// newMigrationID names a migration, so a destination asking the source's
// API about it cannot mistake another migration's outcome for its own.
func newMigrationID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// committedPostcopy is a post-copy migration's commit on its source
// (Migration.OnCommit): the guest is the destination's from here on,
// though this paused copy serves the pages it lacks until every one
// arrived.
func (n *Node) committedPostcopy(m *precopy.Migration, to string) {
	id := m.Status().MigrationID
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.mig != m {
		return
	}
	n.state = "postmigrate"
	n.stateReason = fmt.Sprintf("migration %s committed: the guest runs on %s now; this copy stays paused and serves the pages it lacks until every one arrived "+
		"(while the link is lost, status says postcopy-paused and `tandem migrate --resume --from <this API>` continues it)", id, to)
}

// handleMigrateCancel is POST /migrate/cancel: the running migration
// stops and the guest runs on here. Refused without one, and once it
// committed (the guest is the destination's: a post-copy serving its
// pages is not the source's to stop).
func (n *Node) handleMigrateCancel(w http.ResponseWriter, r *http.Request) {
	n.mu.Lock()
	cancel, state := n.migCancel, n.state
	n.mu.Unlock()
	switch {
	case cancel == nil:
		WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("no migration to cancel"))
		return
	case state == "postmigrate":
		WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("the migration is committed: the guest is the destination's now and nothing cancels it (a paused post-copy continues by `tandem migrate --resume`, or ends by `tandem migrate --abandon` on the destination)"))
		return
	}
	cancel()
	WriteJSON(w, http.StatusOK, map[string]any{"ok": true})
}

// handleStallFlush makes the guest's disk stall its next flush (tests of
// the stalled-flush path). Only with --allow-faults.
func (n *Node) handleStallFlush(w http.ResponseWriter, r *http.Request) {
	n.stallDisk(w, r, (*block.Disk).StallFlush)
}

// handleStallWrite makes the guest's disk stall its next write (tests of
// the slow list: the write must show up by name). Only with
// --allow-faults.
func (n *Node) handleStallWrite(w http.ResponseWriter, r *http.Request) {
	n.stallDisk(w, r, (*block.Disk).StallWrite)
}

// stallDisk serves the stall faults: {"duration_ms": N}, N > 0.
func (n *Node) stallDisk(w http.ResponseWriter, r *http.Request, stall func(*block.Disk, time.Duration)) {
	if !n.allowFaults {
		WriteError(w, http.StatusForbidden, api.CodeForbidden, errors.New("fault injection is off (start with --allow-faults)"))
		return
	}
	var req struct {
		DurationMs int64 `json:"duration_ms"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<12)).Decode(&req); err != nil || req.DurationMs <= 0 || req.DurationMs > 3_600_000 {
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, errors.New("want {\"duration_ms\": N} with 0 < N <= 3600000"))
		return
	}
	n.mu.Lock()
	g := n.g
	n.mu.Unlock()
	bd, ok := g.(interface{ BlockDisk() *block.Disk })
	if !ok || bd.BlockDisk() == nil {
		WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("the guest has no disk (start with --disk PATH)"))
		return
	}
	stall(bd.BlockDisk(), time.Duration(req.DurationMs)*time.Millisecond)
	WriteJSON(w, http.StatusOK, map[string]any{"ok": true})
}
