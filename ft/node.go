package ft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/block"
	"github.com/tandemvm/tandem/internal/tap"
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
	// exits exports the running guest's vCPU-exit timings.
	exits exitMetrics

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
	state     string // "waiting", "running", "paused", "postmigrate", "fenced", "awaiting-commit", "discarded", "lost" (postcopy_lost.go)
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
	pending   *pendingCommit // a received guest awaiting its commit
	// pcOut is the running migration's post-copy mover (nil: none);
	// pcIn a destination's post-copy side (set by ReceiveMigrations).
	pcOut *pcSource
	pcIn  *pcInbound
	// hold is a destination's hold on the output of a guest moved from
	// a protected source (postcopy_hold.go); pairMove a pair primary's
	// move of its guest (migrate_protected.go). nil: none.
	hold       *outputHold
	pairMove   *pairMove
	pairMember *Member                 // a pair member's driver (nil: not in a pair)
	epochs     *failover.EpochLoop     // primary: protection
	sec        *replica.Secondary      // secondary: the committed image
	cluster    func() *api.ClusterView // raft view of a cluster member
	raft       *failover.Node          // a raft member's node (metrics)
	// nodes, if set, is the "nodes" of a member whose coordinator is not
	// raft (etcd): its record's members; lag as clusterNodes takes it.
	// record is that coordinator's record (the role metrics read it).
	nodes  func(lag *int) []api.NodeView
	record func() failover.FSMState
	// fences counts the times the node's guest was fenced.
	fences    atomic.Uint64
	fencedGen atomic.Uint64 // the generation last counted in fences
	// pair is a pair member's coordinator, which POST /protect points at
	// a new secondary (nil: not in a pair).
	pair *PairCoordinator
	// net is the guest network's TAP end (nil: no --net).
	net *netPort
	// outMetrics are the output gate's histograms, fed by every epoch
	// loop of this node (set once, by NewNode).
	outMetrics *outputMetrics
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
	// Net is the TAP device of the guest's network card (nil: none). The
	// node owns it from NewNode on and closes it in Close.
	Net *tap.Device
}

// NewNode opens the node's API and console listeners. Its API answers
// only once Start is called (so a caller can set up what status reports
// first); Close stops everything it owns.
func NewNode(cfg NodeConfig) (_ *Node, err error) {
	if cfg.Net != nil {
		defer func() {
			if err != nil {
				cfg.Net.Close()
			}
		}()
	}
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
	serving := func() bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		return n.g != nil && n.state == "running"
	}
	n.console, err = newConsoleBridge(cfg.ConsoleAddr, n.input, serving, api.timings, log, cfg.Trust)
	if err != nil {
		api.Close()
		return nil, err
	}
	n.registerProtectionMetrics()
	n.outMetrics = newOutputMetrics(api.reg)
	api.reg.MustRegister(&netMetrics{n: n})
	api.reg.MustRegister(&n.exits)
	api.HandleFunc("GET /status", n.handleStatus)
	api.HandleFunc("POST /migrate", n.handleMigrate)
	api.HandleFunc("POST /migrate/cancel", n.handleMigrateCancel)
	api.HandleFunc("POST /migrate/postcopy", n.handleMigratePostcopy)
	api.HandleFunc("POST /migrate/resume", n.handleMigrateResume)
	api.HandleFunc("POST /migrate/moved", n.handleMigrateMoved)
	api.HandleFunc("POST /debug/stall-flush", n.handleStallFlush)
	api.HandleFunc("POST /debug/stall-write", n.handleStallWrite)
	api.HandleFunc("POST /protect", n.handleProtect)
	if cfg.Net != nil {
		n.net = newNetPort(cfg.Net, log)
	}
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
	if nic := guest.NICOf(g); nic != nil {
		nic.SetTransmit(n.net.send)
		n.net.attach(nic)
	}
	n.observeDisk(g)
	n.lockIdle()
	n.g, n.cfg = g, cfg
	n.mu.Unlock()
	n.exits.follow(g, n.api.timings)
}

// lockIdle takes mu once no status digest is pausing or scanning the
// guest (it does so outside mu). Everything that replaces or closes n.g,
// or starts pausing it (a migration, an epoch loop), locks this way, so a
// digest never resumes a guest in another's pause nor scans unmapped
// memory. A digest does not wait here: while one runs, another is
// refused (status says so), so digests never queue up.
func (n *Node) lockIdle() {
	n.mu.Lock()
	for n.digesting != nil {
		done := n.digesting
		n.mu.Unlock()
		<-done
		n.mu.Lock()
	}
}

// observeDisk names every disk write and flush of g in the node's timings
// (tandem_device_seconds{device="disk"}), so a flush that stalls for a
// minute shows up in the slow list as "device disk.flush" with its whole
// length, not only as the budget an epoch or completion gave up at.
func (n *Node) observeDisk(g guest.Guest) {
	if bd, ok := g.(interface{ BlockDisk() *block.Disk }); ok && bd.BlockDisk() != nil {
		bd.BlockDisk().SetObserver(func(op string, start time.Time, took time.Duration, err error) {
			n.api.timings.Device("disk", op, start, took)
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
	if n.pcOut != nil {
		n.pcOut.stop() // a post-copy waiting for a resume gives up
	}
	g := n.g
	n.mu.Unlock()
	n.closeMove()
	n.console.close()
	n.api.Close()
	n.net.close()
	if !joinWithin(n.users.Wait, 5*time.Second, n.log, "a migration (leaving the guest mapped)") {
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
	n.mu.Lock()
	st := nodeStatus{Role: n.role, State: n.state, StateReason: n.stateReason, Build: version.Build()}
	if digest && n.digesting != nil {
		// Digests do not queue: each pauses the guest and scans all of
		// its memory, and everything that needs the guest waits for them.
		digest = false
		st.MemoryDigestError = "another digest is running; ask again when it is done"
	}
	// The guest is described after mu: its Paused and PageWrites take the
	// guest's own lock, which a pause and a dirty sync hold.
	cur, curCfg := n.g, n.cfg
	mig, migDest, inbound := n.mig, n.migDest, n.inbound
	pcOut, pcIn, hold, pm := n.pcOut, n.pcIn, n.hold, n.pairMove
	digest = digest && !postcopyRefusesDigest(pcIn, &st)
	cluster, epochs, sec, rn, nodes := n.cluster, n.epochs, n.sec, n.raft, n.nodes
	st.Net = n.netStatusLocked(epochs)
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
	if cur != nil {
		st.GuestInfo = describeGuest(cur, curCfg)
	}
	reason := st.StateReason
	migrationStatus(&st, mig, migDest, inbound)
	postcopyStatus(&st, mig != nil, pcOut, pcIn)
	postcopyStateReason(&st, hold, reason)
	if cluster != nil {
		st.Cluster = cluster()
	}
	var lag *int
	var dataLast time.Time // the data link's last word from the peer
	if epochs != nil {
		es := epochs.Status()
		st.Epochs = &es
		st.Protection, st.ProtectionReason = es.Protection, es.ProtectionReason
		lag = &es.SecondaryLag
		dataLast = epochs.LastAck()
	} else if st.State == "fenced" {
		// Fenced by raft: no loop, but the guest's protection is over.
		st.Protection, st.ProtectionReason = "fenced", st.StateReason
	}
	if last, ok := pairStatus(&st, sec, pm, mig != nil, digest); ok {
		dataLast = last
	}
	listNodes(&st, rn, nodes, lag, epochs != nil, dataLast)
	if g != nil {
		d, err := memoryDigest(g)
		if err != nil {
			st.MemoryDigestError = err.Error()
		} else {
			st.MemoryDigest = d
		}
	}
	return st
}

// pairStatus adds a pair secondary's figures (and, ok, its data link's
// last word from the primary) and a protected move's word on either end:
// the secondary's while the primary moves the guest, the source's when
// its notice to the secondary is down or (migrating) its post-copy is
// paused.
func pairStatus(st *nodeStatus, sec *replica.Secondary, pm *pairMove, migrating, digest bool) (last time.Time, ok bool) {
	if sec != nil {
		ss := sec.Status(digest)
		st.Secondary = &ss
		_, _, last = sec.PrimaryContact()
		ok = true
		if mv, moving := sec.Move(); moving {
			st.StateReason = moveReason(mv)
		}
	}
	if why := pm.noticeLost(); why != "" {
		st.StateReason = why
	}
	if pm != nil && st.Status == precopy.StatusPostcopyPaused && migrating {
		st.Outcome += pausedProtectedAdvice
	}
	return last, ok
}

// postcopyStateReason settles a destination's state_reason (own: the
// node's own) once the post-copy status is in. The post-copy outage's
// advice (resume or abandon) is for a running unprotected destination: a
// discarded or lost one keeps its own word, and one holding a protected
// source's output says that (its guest is not lost: the source's
// secondary is the fallback).
func postcopyStateReason(st *nodeStatus, hold *outputHold, own string) {
	r := hold.reason()
	switch {
	case st.State != "running":
		st.StateReason = own
	case r == "":
	case st.Status == precopy.StatusPostcopyPaused:
		st.StateReason = fmt.Sprintf("output held (migration %s from a protected source, %d pages still missing): nothing this guest said has left this node; "+
			"the source has been unreachable since %s: if it comes back, resume the migration (tandem migrate --resume); if it died, its secondary is the fallback: "+
			"once that secondary is activated, discard this copy (POST /migrate/abort {\"force\": true})",
			hold.id, st.PostcopyRemainingPages, st.PostcopySourceUnreachableSince)
	default:
		st.StateReason = r
	}
}

// listNodes fills st's nodes: a raft member's from raft (with its
// quorum), another coordinator's from its record, or this node alone.
func listNodes(st *nodeStatus, rn *failover.Node, nodes func(lag *int) []api.NodeView, lag *int, protecting bool, dataLast time.Time) {
	switch {
	case rn != nil:
		st.Nodes, st.Quorum = raftNodes(rn, lag, dataContact(rn, protecting, dataLast))
	case nodes != nil:
		st.Nodes = nodes(lag)
	default:
		st.Nodes = soloNodes(st.Role)
	}
}

// migrationStatus fills st's migration figures: the migration running
// from here (to dest), or the one that brought the guest here, or none
// (the node's state stands in for query-migrate's status).
func migrationStatus(st *nodeStatus, mig *precopy.Migration, dest string, inbound *replica.MigrationResult) {
	switch {
	case mig != nil:
		st.MigrationStatus = mig.Status()
		st.Destination = dest
	case inbound != nil:
		st.MigrationStatus = precopy.MigrationStatus{Status: precopy.StatusCompleted, SwitchoverDigest: inbound.Digest}
		st.DowntimeBreakdown.DestinationLoadMs = float64(inbound.LoadTime.Microseconds()) / 1000
	default:
		st.MigrationStatus.Status = st.State
	}
}

// dataContact is the data link's last contact by peer, for the nodes
// table: a primary (protecting) hears its secondary, a secondary its
// primary; nil before any contact.
func dataContact(rn *failover.Node, protecting bool, last time.Time) map[string]time.Duration {
	if last.IsZero() {
		return nil
	}
	fsm := rn.State()
	peer := fsm.Primary
	if protecting {
		info, _ := fsm.Secondary()
		peer = info.ID
	}
	if peer == "" || peer == rn.ID() {
		return nil
	}
	return map[string]time.Duration{peer: max(time.Since(last), 0)}
}

// memoryDigest is the digest of the guest's memory now. A running guest is
// paused for the scan so the figure is one instant's.
// A guest that does not pause within a second gets no digest (a scan of
// a running guest is of no one instant).
func memoryDigest(g guest.Guest) (string, error) {
	if !g.Paused() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := g.Pause(ctx); err != nil {
			return "", fmt.Errorf("no digest: the guest did not pause: %w", err)
		}
		defer g.Resume()
	}
	s := guest.MemorySum(g.Regions())
	return fmt.Sprintf("%x", s[:]), nil
}

func (n *Node) handleStatus(w http.ResponseWriter, r *http.Request) {
	WriteJSON(w, http.StatusOK, n.status(r.URL.Query().Get("digest") != ""))
}

// registerProtectionMetrics exports the role metrics every node has (see
// roleMetrics: protected drops to 0 the moment a mismatch is found) and
// the primary's verification figures.
func (n *Node) registerProtectionMetrics() {
	registerRoleMetrics(n.api.reg, metricSource{
		role: func() string {
			n.mu.Lock()
			defer n.mu.Unlock()
			return n.role
		},
		cluster: func() (failover.FSMState, int, bool) {
			n.mu.Lock()
			rn, record := n.raft, n.record
			n.mu.Unlock()
			if rn == nil && record != nil {
				return record(), 0, true // etcd: no raft voters to count
			}
			if rn == nil {
				return failover.FSMState{}, 0, false
			}
			return rn.State(), rn.ReachableVoters(), true
		},
		loop: func() *failover.EpochLoop {
			n.mu.Lock()
			defer n.mu.Unlock()
			return n.epochs
		},
		fences: &n.fences,
	})
	status := func() (failover.EpochStatus, bool) {
		n.mu.Lock()
		loop := n.epochs
		n.mu.Unlock()
		if loop == nil {
			return failover.EpochStatus{}, false
		}
		return loop.Status(), true
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
		counter("tandem_verified_epochs_total", "epochs whose replica digest matched the primary's",
			func(st failover.EpochStatus) uint64 { return st.VerifiedEpochs }),
		counter("tandem_joins_total", "times the primary connected to a secondary and started a full sync",
			func(st failover.EpochStatus) uint64 { return st.Joins }),
	)
}
