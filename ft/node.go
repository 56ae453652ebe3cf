package ft

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/block"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// Node is a process that runs one guest: `tandem run`, and `tandem
// receive` once its guest has arrived. Its API serves status, metrics,
// migration control and (with --allow-faults) fault injection.
type Node struct {
	log         *slog.Logger
	api         *APIServer
	console     *consoleBridge
	role        string
	allowFaults bool
	// snapshotDir is where file:NAME migrations write ("" : refused).
	snapshotDir string
	// trust authenticates the node's listeners and the connections it
	// makes (a migration's, an epoch loop's).
	trust Trust
	// users counts goroutines that read guest memory (a migration; an
	// epoch loop is its Member's, stopped before the node closes); Close
	// waits for them before unmapping it.
	users sync.WaitGroup

	// mu guards the fields below. It is never held across a guest pause
	// or a memory scan: a status digest marks itself in digesting and
	// works on n.g outside mu, and whoever replaces or closes n.g, or
	// starts something that pauses it, takes mu through lockIdle, which
	// waits for that digest to end.
	mu sync.Mutex
	// digesting, while a status digest runs, is closed when it ends.
	digesting chan struct{}
	closing   bool // close began: no new digest
	g         guest.Guest
	cfg       guest.Config
	state     string // "waiting", "running", "paused", "postmigrate", "fenced", "awaiting-commit"
	// stateReason says why the state is what it is, when that needs
	// saying (fenced, awaiting-commit).
	stateReason string
	mig         *precopy.Migration
	migDest     string
	// migBusy reserves the guest for one migration from the moment a
	// POST /migrate is accepted until its Run ends, so two requests
	// cannot both pass the check while the first one dials.
	migBusy bool
	// migCancel stops the migration (an epoch loop is its Member's to
	// stop: POST /migrate/cancel never drops protection).
	migCancel context.CancelFunc
	inbound   *replica.MigrationResult
	pending   *pendingCommit          // a received guest awaiting its commit
	epochs    *failover.EpochLoop     // primary: protection
	sec       *replica.Secondary      // secondary: the committed image
	cluster   func() *api.ClusterView // raft view of a cluster member
	// pair is a pair member's coordinator, which POST /protect points at
	// a new secondary (nil: not in a pair).
	pair *PairCoordinator
}

// NodeConfig configures a Node.
type NodeConfig struct {
	// Role is what status says the node is: run, receive, primary,
	// secondary (a member's changes with its part).
	Role string
	// APIAddr and ConsoleAddr are where the HTTP API and the console
	// bridge listen.
	APIAddr, ConsoleAddr string
	Log                  *slog.Logger
	Trust                Trust
	// AllowFaults serves the fault-injection endpoints (tests).
	AllowFaults bool
	// SnapshotDir is where file:NAME migrations write ("": refused); it
	// is created, private, if missing.
	SnapshotDir string
}

// NewNode opens the node's API and console listeners. Its API answers
// only once Start is called (so a caller can set up what status reports
// first); Close stops everything it owns.
func NewNode(cfg NodeConfig) (*Node, error) {
	log := cfg.Log
	api, err := NewAPIServer(cfg.APIAddr, log, cfg.Trust)
	if err != nil {
		return nil, err
	}
	n := &Node{log: log, api: api, role: cfg.Role, state: "waiting", trust: cfg.Trust, allowFaults: cfg.AllowFaults}
	if err := n.setSnapshotDir(cfg.SnapshotDir); err != nil {
		api.Close()
		return nil, err
	}
	n.console, err = newConsoleBridge(cfg.ConsoleAddr, n.input, log, cfg.Trust)
	if err != nil {
		api.Close()
		return nil, err
	}
	n.console.serving = func() bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		return n.g != nil && n.state == "running"
	}
	n.registerProtectionMetrics()
	api.HandleFunc("GET /status", n.handleStatus)
	api.HandleFunc("POST /migrate", n.handleMigrate)
	api.HandleFunc("POST /migrate/cancel", n.handleMigrateCancel)
	api.HandleFunc("POST /debug/stall-flush", n.handleStallFlush)
	api.HandleFunc("POST /protect", n.handleProtect)
	return n, nil
}

// Start makes the API answer.
func (n *Node) Start() { n.api.Start() }

// APIAddr and ConsoleAddr are the addresses the node listens on.
func (n *Node) APIAddr() string     { return n.api.Addr() }
func (n *Node) ConsoleAddr() string { return n.console.addr() }

// HandleFunc adds a handler to the node's API (before Start).
func (n *Node) HandleFunc(pattern string, h http.HandlerFunc) { n.api.HandleFunc(pattern, h) }

// Log is the node's logger.
func (n *Node) Log() *slog.Logger { return n.log }

func (n *Node) input(p []byte) error {
	n.mu.Lock()
	g := n.g
	n.mu.Unlock()
	if g == nil {
		return errors.New("no guest yet")
	}
	return g.Console().Input(p)
}

// Attach makes g the node's guest; its console output goes straight to
// the bridge (an unprotected guest has no epoch to wait for).
func (n *Node) Attach(g guest.Guest, cfg guest.Config) {
	g.Console().SetOutput(n.console.release)
	n.observeDisk(g)
	n.lockIdle()
	n.g, n.cfg = g, cfg
	n.mu.Unlock()
}

// lockIdle takes mu once no status digest is pausing or scanning the
// guest (it does so outside mu). Everything that replaces or closes n.g,
// or starts pausing it (a migration, an epoch loop), locks this way, so a
// digest never resumes a guest in another's pause nor scans unmapped
// memory. A digest takes mu this way too: digests run one at a time.
func (n *Node) lockIdle() {
	n.mu.Lock()
	for n.digesting != nil {
		done := n.digesting
		n.mu.Unlock()
		<-done
		n.mu.Lock()
	}
}

// observeDisk names every disk flush of g in the node's timings, so a
// flush that stalls for a minute shows up as "disk_flush" with its whole
// length, not only as the budget an epoch or completion gave up at.
func (n *Node) observeDisk(g guest.Guest) {
	if bd, ok := g.(interface{ BlockDisk() *block.Disk }); ok && bd.BlockDisk() != nil {
		bd.BlockDisk().SetFlushObserver(func(start time.Time, took time.Duration, err error) {
			n.api.timings.Observe("disk_flush", start, took)
		})
	}
}

func (n *Node) SetState(s string) {
	n.mu.Lock()
	n.state, n.stateReason = s, ""
	n.mu.Unlock()
}

// Wait blocks until ctx ends (a signal, in the command) or POST /quit,
// and logs which.
func (n *Node) Wait(ctx context.Context) {
	WaitStop(ctx, n.api.Quit(), n.log)
}

// WaitStop blocks until ctx ends or quit is closed (nil: never) and logs
// which. It is how every long-running node ends.
func WaitStop(ctx context.Context, quit <-chan struct{}, log *slog.Logger) {
	select {
	case <-ctx.Done():
		log.Info("stopping", "reason", "signal")
	case <-quit:
		log.Info("stopping", "reason", "POST /quit")
	}
}

// Close stops the node: its epoch loop and migration (joined, bounded),
// its console bridge and API, and closes its guest.
func (n *Node) Close() {
	n.lockIdle()
	n.closing = true
	if n.migCancel != nil {
		n.migCancel()
	}
	g := n.g
	n.mu.Unlock()
	n.console.close()
	n.api.Close()
	done := make(chan struct{})
	go func() { n.users.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		n.log.Error("a migration did not stop within 5s; leaving the guest mapped")
		return
	}
	if g != nil {
		if err := g.Close(); err != nil {
			n.log.Warn("closing the guest", "err", err)
		}
	}
}

// nodeStatus is the JSON of GET /status on a guest node: the guest's and
// the node's state with, when there was a migration, query-migrate's
// figures at the top level (their names are the command-line contract,
// kept in package api), and a primary's or secondary's protection figures
// merged into the top level.
type nodeStatus = api.Status

func (n *Node) status(digest bool) nodeStatus {
	// Copy what is needed under mu; ask the parts (the migration, raft,
	// the epoch loop, the secondary) and take a digest outside it.
	if digest {
		n.lockIdle()
	} else {
		n.mu.Lock()
	}
	st := nodeStatus{Role: n.role, State: n.state, StateReason: n.stateReason, Build: version.Build()}
	if n.g != nil {
		st.GuestInfo = describeGuest(n.g, n.cfg)
	}
	mig, migDest, inbound := n.mig, n.migDest, n.inbound
	cluster, epochs, sec := n.cluster, n.epochs, n.sec
	var g guest.Guest
	if digest && n.g != nil && n.epochs == nil && !n.migBusy && !n.closing {
		// A protected guest is paused only by its epoch loop; its proof
		// is the per-epoch digest comparison (--verify-epochs). A guest
		// being migrated is paused only by the migration: the status
		// handler's Pause/Resume would resume it in the middle of the
		// stop-and-copy (migBusy is set under mu before Run starts). And
		// while this digest runs, nobody starts either or takes the
		// guest away: they wait in lockIdle for done.
		g = n.g
		done := make(chan struct{})
		n.digesting = done
		defer func() {
			n.mu.Lock()
			n.digesting = nil
			n.mu.Unlock()
			close(done)
		}()
	}
	n.mu.Unlock()
	switch {
	case mig != nil:
		st.MigrationStatus = mig.Status()
		st.Destination = migDest
	case inbound != nil:
		st.MigrationStatus = precopy.MigrationStatus{Status: precopy.StatusCompleted, SwitchoverDigest: inbound.Digest}
		st.DowntimeBreakdown.DestinationLoadMs = float64(inbound.LoadTime.Microseconds()) / 1000
	default:
		st.MigrationStatus.Status = st.State
	}
	if cluster != nil {
		st.Cluster = cluster()
	}
	if epochs != nil {
		es := epochs.Status()
		st.Epochs = &es
	}
	if sec != nil {
		ss := sec.Status(digest)
		st.Secondary = &ss
	}
	if g != nil {
		st.MemoryDigest = memoryDigest(g)
	}
	return st
}

// memoryDigest is the digest of the guest's memory now. A running guest is
// paused for the scan so the figure is one instant's.
func memoryDigest(g guest.Guest) string {
	if !g.Paused() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := g.Pause(ctx); err == nil {
			defer g.Resume()
		}
	}
	s := guest.ScanMemory(g.Regions()).Sum()
	return fmt.Sprintf("%x", s[:])
}

func (n *Node) handleStatus(w http.ResponseWriter, r *http.Request) {
	WriteJSON(w, http.StatusOK, n.status(r.URL.Query().Get("digest") != ""))
}

// migrateRequest is the body of POST /migrate; `tandem migrate` sends it.
type migrateRequest = api.MigrateRequest

// migratePolicy is the precopy policy a migrate request asks for.
func migratePolicy(req migrateRequest) (precopy.Policy, error) {
	p := precopy.DefaultPolicy()
	p.MaxBandwidth = req.MaxBandwidth
	if req.DowntimeLimitMs > 0 {
		p.DowntimeLimit = time.Duration(req.DowntimeLimitMs) * time.Millisecond
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

func (n *Node) handleMigrate(w http.ResponseWriter, r *http.Request) {
	var req migrateRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&req); err != nil {
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("bad migrate request: %v", err))
		return
	}
	pol, err := migratePolicy(req)
	if err != nil {
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, err)
		return
	}
	comp, err := checkpoint.ParseCompression(orDefault(req.Compression, "default"))
	if err != nil {
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, err)
		return
	}
	n.lockIdle()
	// An epoch loop that has a secondary owns the guest's dirty log and
	// pauses; one without (an activated node not yet re-protected) is idle.
	protected := n.sec != nil || n.cluster != nil || (n.epochs != nil && n.epochs.Status().Secondary != "")
	g, cfg, state, busy := n.g, n.cfg, n.state, n.migBusy
	refuse := g == nil || state != "running" || busy || protected
	if !refuse {
		n.migBusy = true
	}
	n.mu.Unlock()
	switch {
	case g == nil || state != "running":
		WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("no running guest to migrate (state %s)", state))
		return
	case busy:
		WriteError(w, http.StatusConflict, api.CodeBusy, errors.New("a migration is already running"))
		return
	case protected:
		// The epoch loop owns the guest's dirty log and its pauses; a
		// migration beside it would take pages the secondary never gets.
		WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("this guest is protected by a secondary (or in a raft cluster): use switchover, not migrate"))
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
	hello := replica.Hello{Purpose: replica.PurposeMigrate, Kind: g.Kind(), Config: cfg, Build: version.Build()}
	migID := newMigrationID()
	if !strings.HasPrefix(req.To, "file:") {
		// Two-phase switch-over: the destination resumes only on this
		// source's commit (see precopy.Committer).
		hello.Commit, hello.MigrationID, hello.SourceAPI = true, migID, orDefault(req.SourceAPI, n.api.Addr())
	}
	opts := checkpoint.Options{Compression: comp}
	// Connect and handshake before answering, so a refusal (another kind,
	// another format version, nobody listening) comes back to the caller
	// before the guest is paused at all.
	var link precopy.Link
	var closeLink func()
	if name, ok := strings.CutPrefix(req.To, "file:"); ok {
		// The name comes from whoever reached the API: it is resolved
		// under this node's --snapshot-dir and never taken as a path.
		path, err := snapshotPath(n.snapshotDir, name)
		if err != nil {
			WriteError(w, http.StatusBadRequest, api.CodeRefused, fmt.Errorf("migrate to %s refused: %w", req.To, err))
			return
		}
		fl, err := replica.CreateFileLink(path, hello, g.Regions(), opts)
		if err != nil {
			WriteError(w, http.StatusBadRequest, "", err)
			return
		}
		link, closeLink = fl, fl.Abort
	} else {
		// The source dials with its own identity; the destination must
		// hold a certificate of the same CA.
		ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		l, err := replica.Dial(ctx, req.To, hello, g.Regions(), replica.DialOptions{Stream: opts, TLS: n.trust.ID})
		cancel()
		if err != nil {
			WriteError(w, http.StatusBadGateway, api.CodeInternal, err)
			return
		}
		link, closeLink = l, func() { l.Close() }
	}
	m, err := precopy.NewMigration(precopy.NewCore(g, n.api.timings), link, pol)
	if err != nil {
		closeLink()
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, err)
		return
	}
	m.SetID(migID)
	ctx, cancel := context.WithCancel(context.Background())
	n.mu.Lock()
	n.mig, n.migDest, n.migCancel = m, req.To, cancel
	n.mu.Unlock()
	started = true
	n.users.Add(1)
	go func() {
		defer n.users.Done()
		defer cancel()
		err := m.Run(ctx)
		closeLink()
		// The state changes with migBusy, under one lock: a completed
		// migration leaves a paused guest that runs elsewhere now, and a
		// second POST /migrate must not find it "running" in between.
		unconfirmed := errors.Is(err, precopy.ErrCommitUnconfirmed)
		n.mu.Lock()
		n.migBusy = false
		if err == nil || unconfirmed {
			n.state, n.stateReason = "postmigrate", ""
		}
		if unconfirmed {
			n.stateReason = "commit sent to " + req.To + " but not confirmed: the guest is stopped here for good; the destination resumes it once it learns of the commit (it asks this API), or by POST /migrate/commit on it"
		}
		n.mu.Unlock()
		if unconfirmed {
			n.log.Error("migration committed but unconfirmed: the guest stays stopped here; the destination holds it, paused, until it learns of the commit", "to", req.To, "err", err)
			return
		}
		if err != nil {
			n.log.Error("migration failed; the guest keeps running here", "to", req.To, "err", err)
			return
		}
		st := m.Status()
		n.log.Info("migration completed; the guest runs on the destination", "to", req.To,
			"downtime_ms", st.DowntimeMs, "total_time_ms", st.TotalTimeMs, "transferred_bytes", st.TransferredBytes)
	}()
	WriteJSON(w, http.StatusAccepted, map[string]any{"ok": true, "to": req.To})
}

// newMigrationID names a migration, so a destination asking the source's
// API about it cannot mistake another migration's outcome for its own.
func newMigrationID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (n *Node) handleMigrateCancel(w http.ResponseWriter, r *http.Request) {
	n.mu.Lock()
	cancel := n.migCancel
	n.mu.Unlock()
	if cancel == nil {
		WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("no migration to cancel"))
		return
	}
	cancel()
	WriteJSON(w, http.StatusOK, map[string]any{"ok": true})
}

// handleStallFlush makes the guest's disk stall its next flush (tests of
// the stalled-flush path). Only with --allow-faults.
func (n *Node) handleStallFlush(w http.ResponseWriter, r *http.Request) {
	if !n.allowFaults {
		WriteError(w, http.StatusForbidden, api.CodeForbidden, errors.New("fault injection is off (start with --allow-faults)"))
		return
	}
	var req struct {
		DurationMs int64 `json:"duration_ms"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<12)).Decode(&req); err != nil || req.DurationMs <= 0 {
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, errors.New("want {\"duration_ms\": N} with N > 0"))
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
	bd.BlockDisk().StallFlush(time.Duration(req.DurationMs) * time.Millisecond)
	WriteJSON(w, http.StatusOK, map[string]any{"ok": true})
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// registerProtectionMetrics exports the primary's protection as metrics,
// so an alert can follow a replica that stops matching: protected drops
// to 0 the moment a mismatch is found.
func (n *Node) registerProtectionMetrics() {
	status := func() (failover.EpochStatus, bool) {
		n.mu.Lock()
		loop := n.epochs
		n.mu.Unlock()
		if loop == nil {
			return failover.EpochStatus{}, false
		}
		return loop.Status(), true
	}
	gauge := func(name, help string, f func(failover.EpochStatus) float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 {
			st, ok := status()
			if !ok {
				return 0
			}
			return f(st)
		})
	}
	counter := func(name, help string, f func(failover.EpochStatus) uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 {
			st, ok := status()
			if !ok {
				return 0
			}
			return float64(f(st))
		})
	}
	n.api.reg.MustRegister(
		gauge("tandem_protected", "1 while this primary's secondary holds a replica whose last epoch was acknowledged (and verified, with --verify-epochs)",
			func(st failover.EpochStatus) float64 {
				if st.Protected {
					return 1
				}
				return 0
			}),
		counter("tandem_digest_mismatches_total", "replica digest mismatches found (each one ends protection and re-syncs the secondary)",
			func(st failover.EpochStatus) uint64 { return st.DigestMismatches }),
		counter("tandem_verified_epochs_total", "epochs whose replica digest matched the primary's",
			func(st failover.EpochStatus) uint64 { return st.VerifiedEpochs }),
		counter("tandem_joins_total", "times the primary connected to a secondary and started a full sync",
			func(st failover.EpochStatus) uint64 { return st.Joins }),
	)
}
