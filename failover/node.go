package failover

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/tandemvm/tandem/internal/clock"
	"github.com/tandemvm/tandem/internal/trust"
	"go.etcd.io/bbolt"
)

// EventKind names an Event.
type EventKind int

const (
	// EventBecamePrimary: run the guest (resume it, from the last committed
	// epoch if it came from a replica) and release output tagged with
	// Generation, checking CanRelease(Generation) before every release.
	EventBecamePrimary EventKind = iota + 1
	// EventFenced: stop releasing and pause the guest now. Reason says why.
	// CanRelease already returns false for Generation.
	EventFenced
	// EventPeerChanged: the secondary's addresses changed (Peer).
	EventPeerChanged
	// EventUnprotected: the FSM now records the trio as unprotected at
	// Generation (the secondary stopped acknowledging). Only after this may
	// the primary release output its secondary has not acknowledged.
	EventUnprotected
	// EventRefused: the cluster refused this node's registration (another
	// cluster, or its ID in use at another address). Reason has the detail.
	EventRefused
)

func (k EventKind) String() string {
	switch k {
	case EventBecamePrimary:
		return "became-primary"
	case EventFenced:
		return "fenced"
	case EventPeerChanged:
		return "peer-changed"
	case EventUnprotected:
		return "unprotected"
	case EventRefused:
		return "refused"
	}
	return fmt.Sprintf("event(%d)", int(k))
}

// Event tells the driver what changed. Events are hints for prompt action;
// the authoritative answers are CanRelease and State.
type Event struct {
	Kind       EventKind
	Generation uint64
	// Epoch: for BecamePrimary, the last epoch the FSM recorded as
	// acknowledged (a promoted secondary resumes from its own last
	// committed epoch, which is at least this).
	Epoch  uint64
	Peer   NodeInfo
	Reason string
	At     time.Time
}

// eventBuffer is the Events channel capacity. When the driver falls this far
// behind the oldest event is dropped: events are hints, and the newest ones
// (a fence, typically) matter most.
const eventBuffer = 64

// lease is the leader lease: valid until deadline, only in term.
type lease struct {
	term     uint64
	deadline time.Time
}

// Node is one member of the trio. All methods are safe for concurrent use.
type Node struct {
	cfg    Config
	log    *slog.Logger
	clock  clock.Clock
	self   NodeInfo
	dir    *dataDir
	store  *raftboltdb.BoltStore
	stream *muxStream
	trans  *raft.NetworkTransport
	fsm    *fsm
	raft   *raft.Raft
	events chan Event

	// Read without locks by CanRelease.
	lease        atomic.Pointer[lease]
	active       atomic.Pointer[Activation]
	transferring atomic.Int32 // leadership transfers in flight
	closed       atomic.Bool
	// started is set once raft exists; the registration handler may run
	// before that (the port opens first) and must not touch n.raft.
	started atomic.Bool
	// transferGrant is the last leadership transfer this node started.
	transferGrant atomic.Pointer[transferGrant]

	// mu guards the decision loop's bookkeeping below.
	mu             sync.Mutex
	leaderTerm     uint64
	claimed        uint64
	claimedTerm    uint64
	pending        Pending
	lastTransfer   time.Time
	transfers      int
	lastRegister   time.Time
	lastEpochApply time.Time
	reportedEpoch  uint64
	peerHeartbeat  time.Time
	announced      NodeInfo
	unreachable    map[string]bool
	voters         []NodeInfo // from Config.Peers, sorted; never changes
	image          *Image     // what the driver can resume; nil: nothing
	// claimFrom/claimTo: this node's claims raised the generation of the
	// image it claimed with from claimFrom to claimTo (nothing was
	// released under the claimed generations before an activation).
	claimFrom, claimTo uint64
	waiting            string    // why nobody serves, as this node sees it
	waitingSince       time.Time // when waiting last changed
	waitingLogged      string    // the reason last logged

	observed  chan raft.Observation
	wake      chan struct{}
	kickLease chan struct{}
	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// Open starts a node: it locks and checks the data directory, opens the raft
// log, listens on RaftAddr, bootstraps a new cluster from Peers (every node
// of a new trio does this with the same configuration) or checks a stored
// one against Peers, and starts the decision loop. It returns without
// waiting for an election.
func Open(cfg Config) (*Node, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	n := &Node{
		cfg:         cfg,
		log:         cfg.Logger.With("node", cfg.ID),
		clock:       cfg.Clock,
		self:        NodeInfo{ID: cfg.ID, Role: cfg.Role, RaftAddr: cfg.RaftAddr, DataAddr: cfg.DataAddr, APIAddr: cfg.APIAddr, ConsoleAddr: cfg.ConsoleAddr},
		events:      make(chan Event, eventBuffer),
		wake:        make(chan struct{}, 1),
		kickLease:   make(chan struct{}, 1),
		stop:        make(chan struct{}),
		observed:    make(chan raft.Observation, 16),
		unreachable: map[string]bool{},
	}
	if cfg.TLS == nil && cfg.Insecure && trust.CheckListen(nil, false, "--raft", cfg.RaftAddr) != nil {
		n.log.Warn("the raft port is plaintext on a non-loopback address (--insecure): whoever reaches it can elect a leader and register members; use --tls-ca, --tls-cert and --tls-key", "raft", cfg.RaftAddr)
	}
	if err := n.open(); err != nil {
		n.release()
		return nil, err
	}
	n.started.Store(true)
	n.raft.RegisterObserver(raft.NewObserver(n.observed, false, func(o *raft.Observation) bool {
		switch o.Data.(type) {
		case raft.FailedHeartbeatObservation, raft.ResumedHeartbeatObservation:
			return true
		}
		return false
	}))
	n.wg.Add(2)
	go n.loop()
	go n.leaseLoop()
	return n, nil
}

func (n *Node) open() error {
	cfg := n.cfg
	var err error
	if n.dir, err = openDataDir(cfg.DataDir, cfg.ClusterID, cfg.ID); err != nil {
		return err
	}
	n.store, err = raftboltdb.New(raftboltdb.Options{
		Path:        filepath.Join(cfg.DataDir, raftDBFile),
		BoltOptions: &bbolt.Options{Timeout: time.Second},
	})
	if err != nil {
		return fmt.Errorf("failover: open raft log %s: %w", filepath.Join(cfg.DataDir, raftDBFile), err)
	}
	hl := hclog.New(&hclog.LoggerOptions{Name: "raft", Level: hclog.Warn, Output: slogWriter{n.log}})
	snaps, err := raft.NewFileSnapshotStoreWithLogger(filepath.Join(cfg.DataDir, snapshotDir), 2, hl)
	if err != nil {
		return fmt.Errorf("failover: open snapshots: %w", err)
	}
	existing, err := raft.HasExistingState(n.store, n.store, snaps)
	if err != nil {
		return fmt.Errorf("failover: read raft state: %w", err)
	}
	want := raft.Configuration{}
	ids := make([]string, 0, len(cfg.Peers))
	for id := range cfg.Peers {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		n.voters = append(n.voters, NodeInfo{ID: id, RaftAddr: cfg.Peers[id]})
		want.Servers = append(want.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(id), Address: raft.ServerAddress(cfg.Peers[id])})
	}
	if existing {
		stored, ok, err := storedConfiguration(n.store, snaps)
		if err != nil {
			return err
		}
		if ok {
			if err := sameMembership(stored, want); err != nil {
				return err
			}
		}
	}

	n.stream, err = listenMux(muxConfig{
		Addr: cfg.RaftAddr, TLS: cfg.TLS, Insecure: cfg.Insecure, Members: cfg.Peers,
		Handle: n.handleRegister, Policy: n, Log: n.log,
	})
	if err != nil {
		return err
	}
	n.trans = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  n.stream,
		MaxPool: 3,
		Timeout: 500 * time.Millisecond,
		Logger:  hl,
	})
	n.fsm = newFSM(n.poke)

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	if cfg.Role == RoleWitness {
		rc.HeartbeatTimeout /= 2
		rc.ElectionTimeout *= 2
	}
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.CommitTimeout = 5 * time.Millisecond
	rc.SnapshotThreshold = 1024
	rc.TrailingLogs = 1024
	rc.Logger = hl
	if err := raft.ValidateConfig(rc); err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	n.raft, err = raft.NewRaft(rc, n.fsm, n.store, n.store, snaps, transport{n.trans, n.stream})
	if err != nil {
		return fmt.Errorf("failover: start raft: %w", err)
	}
	if !existing {
		if err := n.raft.BootstrapCluster(want).Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			return fmt.Errorf("failover: bootstrap: %w", err)
		}
	}
	return nil
}

// storedConfiguration finds the newest membership in the log, else in the
// newest snapshot.
func storedConfiguration(logs raft.LogStore, snaps raft.SnapshotStore) (c raft.Configuration, ok bool, err error) {
	first, err := logs.FirstIndex()
	if err != nil {
		return c, false, fmt.Errorf("failover: read raft log: %w", err)
	}
	last, err := logs.LastIndex()
	if err != nil {
		return c, false, fmt.Errorf("failover: read raft log: %w", err)
	}
	for i := last; i >= first && i > 0; i-- {
		var l raft.Log
		if err := logs.GetLog(i, &l); err != nil {
			if errors.Is(err, raft.ErrLogNotFound) {
				continue
			}
			return c, false, fmt.Errorf("failover: read raft log entry %d: %w", i, err)
		}
		if l.Type == raft.LogConfiguration {
			return decodeConfiguration(l.Data)
		}
	}
	metas, err := snaps.List()
	if err != nil {
		return c, false, fmt.Errorf("failover: list snapshots: %w", err)
	}
	if len(metas) > 0 {
		return metas[0].Configuration, true, nil
	}
	return c, false, nil
}

// decodeConfiguration wraps raft.DecodeConfiguration, which panics on bad
// input, so a damaged log is an error, not a crash.
func decodeConfiguration(b []byte) (c raft.Configuration, ok bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: stored raft configuration: %v", ErrCorrupt, r)
		}
	}()
	return raft.DecodeConfiguration(b), true, nil
}

// sameMembership refuses a start whose peers differ from the stored voters.
func sameMembership(stored, want raft.Configuration) error {
	str := func(c raft.Configuration) string {
		var parts []string
		for _, s := range c.Servers {
			p := fmt.Sprintf("%s=%s", s.ID, s.Address)
			if s.Suffrage != raft.Voter {
				p += "(" + s.Suffrage.String() + ")"
			}
			parts = append(parts, p)
		}
		sort.Strings(parts)
		return strings.Join(parts, ",")
	}
	if a, b := str(stored), str(want); a != b {
		return fmt.Errorf("%w: data dir holds voters %s, configured peers are %s", ErrMembership, a, b)
	}
	return nil
}

// release closes whatever open() managed to open, in reverse order.
func (n *Node) release() {
	if n.raft != nil {
		n.raft.Shutdown().Error()
	}
	if n.trans != nil {
		n.trans.Close() // closes the stream too
	} else if n.stream != nil {
		n.stream.Close()
	}
	if n.store != nil {
		n.store.Close()
	}
	if n.dir != nil {
		n.dir.close()
	}
}

// Close fences the node (CanRelease turns false), stops raft without
// handing leadership over (the others elect a new leader after their
// heartbeat timeout; use Switchover first for a planned stop), and releases
// the data directory. It is bounded by raft's shutdown and returns the first
// error.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		n.closed.Store(true)
		if a := n.active.Swap(nil); a != nil {
			n.emit(Event{Kind: EventFenced, Generation: a.Generation, Reason: "node closed"})
		}
		close(n.stop)
		if err := n.raft.Shutdown().Error(); err != nil {
			n.closeErr = fmt.Errorf("failover: raft shutdown: %w", err)
		}
		n.trans.Close()
		n.wg.Wait()
		if err := n.store.Close(); err != nil && n.closeErr == nil {
			n.closeErr = fmt.Errorf("failover: close raft log: %w", err)
		}
		n.dir.close()
		n.mu.Lock() // step emits under mu; it sees closed once we hold it
		close(n.events)
		n.mu.Unlock()
	})
	return n.closeErr
}

// Events delivers events in order. The channel is closed by Close. When the
// reader falls behind by more than 64 events, the oldest are dropped.
func (n *Node) Events() <-chan Event { return n.events }

func (n *Node) emit(e Event) {
	if e.At.IsZero() {
		e.At = n.clock.Now()
	}
	n.log.Info("failover event", "kind", e.Kind.String(), "gen", e.Generation, "peer", e.Peer.ID, "reason", e.Reason)
	for {
		select {
		case n.events <- e:
			return
		default:
		}
		select {
		case <-n.events:
		default:
		}
	}
}

// CanRelease reports whether output produced under generation gen may be
// released now: this node is the raft leader in the term it activated gen,
// its lease (majority contact within LeaderLeaseTimeout) holds, no
// switchover is under way, and the FSM names it primary at gen. It takes no
// lock and does no I/O; call it before every release.
func (n *Node) CanRelease(gen uint64) bool {
	if n.closed.Load() {
		return false
	}
	return MayRelease(n.liveView(), n.clock.Now(), gen)
}

// liveView is the part of View that CanRelease needs, read lock-free.
func (n *Node) liveView() View {
	v := View{
		Self:         n.self,
		Leader:       n.raft.State() == raft.Leader,
		Term:         n.raft.CurrentTerm(),
		Transferring: n.transferring.Load() > 0,
		State:        *n.fsm.load(),
	}
	if l := n.lease.Load(); l != nil && l.term == v.Term {
		v.LeaseDeadline = l.deadline
	}
	if a := n.active.Load(); a != nil {
		v.Active = *a
	}
	return v
}

// Active returns the generation this node currently runs the guest under.
func (n *Node) Active() (uint64, bool) {
	if a := n.active.Load(); a != nil {
		return a.Generation, true
	}
	return 0, false
}

// State returns a copy of the FSM state as applied on this node (a follower
// may lag the leader by a heartbeat).
func (n *Node) State() FSMState { return n.fsm.load().Clone() }

// Secondary returns the registered secondary: the non-witness member that
// is not the primary.
func (n *Node) Secondary() (NodeInfo, bool) { return n.fsm.load().Secondary() }

// Leader returns the raft leader's ID, if one is known.
func (n *Node) Leader() (string, bool) {
	_, id := n.raft.LeaderWithID()
	return string(id), id != ""
}

// ID returns the node's ID.
func (n *Node) ID() string { return n.cfg.ID }

// ReportEpoch records that the secondary acknowledged epoch. It only stores
// the number; the decision loop applies the newest one to raft at most
// every EpochInterval. Call it on every acknowledgement.
func (n *Node) ReportEpoch(epoch uint64) {
	n.mu.Lock()
	n.reportedEpoch = max(n.reportedEpoch, epoch)
	n.mu.Unlock()
}

// DataHeartbeat records that the data channel heard from the secondary now
// (an acknowledgement or a heartbeat). Without one for DataTimeout an active
// primary marks the trio unprotected.
func (n *Node) DataHeartbeat() {
	n.mu.Lock()
	n.peerHeartbeat = n.clock.Now()
	n.mu.Unlock()
}

// Image is the guest image a node could resume, as its driver reports it.
type Image struct {
	// Generation is the generation of the primary whose guest this is:
	// for the node's own guest (booted, or run and kept paused after a
	// fence), the generation it ran under (0: a fresh cluster's booted
	// guest); for a replica, the generation in the handshake of the stream
	// that built it (replica.Hello.Generation, also in a stored image).
	Generation uint64
	// Epoch is the image's last committed epoch (for the node's own guest,
	// its last shipped or captured epoch).
	Epoch uint64
	// Live: the node's own guest, kept in memory, not a replica.
	Live bool
}

func (img Image) String() string {
	kind := "replica image"
	if img.Live {
		kind = "own guest"
	}
	return fmt.Sprintf("%s of generation %d at epoch %d", kind, img.Generation, img.Epoch)
}

// SetImage tells the node it holds a guest image of this cluster it could
// run. A node starts without one: a primary-role node reports its booted
// guest (Live, generation 0) on a new cluster; a secondary reports every
// committed epoch with its stream's generation; a fenced primary that
// keeps its guest paused reports it (Live, the generation it ran under,
// its last shipped epoch). Only a node whose image holds what raft
// committed claims the primary role (see IneligibleReason). Activation
// makes the image the node's own guest of the activated generation.
func (n *Node) SetImage(img Image) {
	n.mu.Lock()
	n.image = &img
	n.mu.Unlock()
	n.poke()
}

// ClearImage tells the node it holds no image it could run (it lost or
// dropped its guest).
func (n *Node) ClearImage() {
	n.mu.Lock()
	n.image = nil
	n.mu.Unlock()
	n.poke()
}

// Waiting says why no node serves the guest, as far as this node can
// tell ("" when it cannot tell, or a primary serves): on the raft leader,
// why it cannot resume the guest and which node is needed; on a node
// without a leader, that raft has no majority.
func (n *Node) Waiting() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.waiting
}

// ImageStatus describes this node's image and whether it could resume
// the guest from it now.
func (n *Node) ImageStatus() string {
	n.mu.Lock()
	v := n.viewLocked(n.liveView())
	n.mu.Unlock()
	if !v.Runnable {
		return "none"
	}
	img := Image{Generation: v.RunnableGen, Epoch: v.RunnableEpoch, Live: v.RunnableLive}.String()
	if r := IneligibleReason(v); r != "" {
		return img + "; cannot resume: " + r
	}
	return img + "; can resume"
}

// SetProtected records in raft whether the secondary is in sync, and
// returns once that is committed. Only the active primary may call it; the
// command carries its generation, so a deposed primary's call changes
// nothing. Release output without acknowledgements only after
// SetProtected(false) returned nil.
func (n *Node) SetProtected(ctx context.Context, protected bool) error {
	gen, ok := n.Active()
	if !ok {
		return fmt.Errorf("%w: set protected: this node is not the active primary", ErrNotLeader)
	}
	return n.applyCtx(ctx, cmdSetProtected, &protectedCmd{Generation: gen, Protected: protected})
}

// Switchover hands leadership, and with it the guest, to the node to (""
// means the secondary). It fences this node first: CanRelease is false from
// the call on. The driver should have shipped and reported the final epoch
// (ReportEpoch) before calling; Switchover commits the last reported epoch
// before transferring. It returns when the transfer succeeded or failed, or
// ctx ended (the transfer then goes on, bounded by raft's election timeout).
// After a failed transfer this node, if still leader, claims a new
// generation and becomes primary again.
func (n *Node) Switchover(ctx context.Context, to string) error {
	if n.closed.Load() {
		return ErrClosed
	}
	if n.raft.State() != raft.Leader {
		return fmt.Errorf("%w: switchover must be started on the leader", ErrNotLeader)
	}
	st := n.fsm.load()
	var target NodeInfo
	var ok bool
	if to == "" {
		target, ok = st.Secondary()
	} else {
		target, ok = st.Member(to)
	}
	if !ok || target.ID == n.cfg.ID || target.Role == RoleWitness {
		return fmt.Errorf("%w: switchover target %q is not a registered guest-capable peer", ErrConfig, to)
	}
	n.transferring.Add(1)
	n.step() // fence now, before anything else
	done := make(chan error, 1)
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		defer n.poke()
		defer n.transferring.Add(-1)
		err := n.flushEpoch(st.Generation)
		if err == nil {
			err = n.transferLeadership(target)
		}
		// Whatever happened, the old activation is gone: becoming primary
		// again takes a new claim and generation.
		n.mu.Lock()
		n.claimed = 0
		n.mu.Unlock()
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("failover: switchover to %s: %w", target.ID, err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("failover: switchover to %s: %w", target.ID, ctx.Err())
	}
}

func (n *Node) flushEpoch(gen uint64) error {
	n.mu.Lock()
	e := n.reportedEpoch
	n.mu.Unlock()
	if e <= n.fsm.load().Epoch {
		return nil
	}
	return n.apply(cmdEpoch, &epochCmd{Generation: gen, Epoch: e})
}

// apply commits a command and returns raft's or the FSM's error.
func (n *Node) apply(t commandType, body any) error {
	data, err := encodeCommand(t, body)
	if err != nil {
		return err
	}
	f := n.raft.Apply(data, n.cfg.ApplyTimeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
			return fmt.Errorf("%w: %s: %v", ErrNotLeader, t, err)
		}
		return fmt.Errorf("failover: %s: %w", t, err)
	}
	if err, ok := f.Response().(error); ok && err != nil {
		return err
	}
	return nil
}

// applyCtx is apply for callers with a context; the apply itself is bounded
// by ApplyTimeout, so the goroutine left behind on ctx end finishes soon.
func (n *Node) applyCtx(ctx context.Context, t commandType, body any) error {
	if n.closed.Load() {
		return ErrClosed
	}
	done := make(chan error, 1)
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		done <- n.apply(t, body)
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("failover: %s: %w", t, ctx.Err())
	}
}

// poke wakes the decision loop without blocking.
func (n *Node) poke() {
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

// tick is the decision loop's period: a fifth of the lease, so the Fenced
// event trails lease expiry by at most that.
func (n *Node) tick() time.Duration {
	return max(n.cfg.LeaderLeaseTimeout/5, 2*time.Millisecond)
}

func (n *Node) loop() {
	defer n.wg.Done()
	t := n.clock.NewTicker(n.tick())
	defer t.Stop()
	leaderCh := n.raft.LeaderCh()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C():
		case <-n.wake:
		case <-leaderCh:
		case o := <-n.observed:
			n.mu.Lock()
			switch d := o.Data.(type) {
			case raft.FailedHeartbeatObservation:
				n.unreachable[string(d.PeerID)] = true
			case raft.ResumedHeartbeatObservation:
				delete(n.unreachable, string(d.PeerID))
			}
			n.mu.Unlock()
		}
		n.step()
	}
}

// leaseLoop renews the leader lease by asking raft to confirm leadership
// with a majority every quarter lease.
func (n *Node) leaseLoop() {
	defer n.wg.Done()
	t := n.clock.NewTicker(max(n.cfg.LeaderLeaseTimeout/4, time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C():
		case <-n.kickLease:
		}
		if n.raft.State() != raft.Leader {
			continue
		}
		term := n.raft.CurrentTerm()
		start := n.clock.Now()
		// Bounded: raft answers every pending verification when it steps
		// down, at the latest after its own LeaderLeaseTimeout.
		if err := n.raft.VerifyLeader().Error(); err != nil || n.raft.CurrentTerm() != term {
			continue
		}
		prev := n.lease.Load()
		n.lease.Store(&lease{term: term, deadline: start.Add(n.cfg.LeaderLeaseTimeout)})
		if prev == nil || prev.term != term || !start.Before(prev.deadline) {
			n.poke() // a fresh lease may unblock a claim or activation
		}
	}
}

// step runs Decide once and carries out its actions.
func (n *Node) step() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed.Load() {
		return
	}
	now := n.clock.Now()
	v := n.liveView()
	if v.Leader && v.Term != n.leaderTerm {
		// A new leadership term: earlier claims and transfer rotation no
		// longer count, and the lease must be earned again.
		n.leaderTerm = v.Term
		n.claimed, n.claimedTerm, n.transfers = 0, 0, 0
		n.unreachable = map[string]bool{}
		select {
		case n.kickLease <- struct{}{}:
		default:
		}
	}
	v = n.viewLocked(v)
	acts := Decide(v, now)
	for _, a := range acts {
		n.execLocked(a, v, now)
	}
	n.noteWaitingLocked(v, acts, now)
}

// viewLocked completes the live view with the decision loop's bookkeeping.
// Preconditions: n.mu held.
func (n *Node) viewLocked(v View) View {
	if img := n.image; img != nil {
		v.Runnable, v.RunnableEpoch, v.RunnableGen, v.RunnableLive = true, img.Epoch, img.Generation, img.Live
		if n.claimTo != 0 && img.Generation == n.claimFrom {
			v.RunnableGen = n.claimTo
		}
		if img.Live {
			// Its own guest is the source of every epoch it acknowledged.
			v.RunnableEpoch = max(v.RunnableEpoch, n.reportedEpoch)
		}
	}
	v.Claimed, v.ClaimedTerm = n.claimed, n.claimedTerm
	v.Pending = n.pending
	v.LastTransfer, v.TransferAttempts = n.lastTransfer, n.transfers
	v.LastRegister, v.LastEpochApply = n.lastRegister, n.lastEpochApply
	v.ReportedEpoch, v.PeerHeartbeat, v.AnnouncedPeer = n.reportedEpoch, n.peerHeartbeat, n.announced
	v.Voters = n.voters
	v.Unreachable = n.unreachable
	v.Tuning = Tuning{DataTimeout: max(n.cfg.DataTimeout, 0), EpochInterval: n.cfg.EpochInterval, RetryInterval: n.cfg.RetryInterval}
	return v
}

// waitingLogAfter is how long a reason for nobody serving must hold before
// it is logged: elections and hand-overs pass through such states briefly.
const waitingLogAfter = time.Second

// noteWaitingLocked records why nobody serves (see Waiting) and logs it
// once it has held for waitingLogAfter, and again when it changes or ends.
// Preconditions: n.mu held.
func (n *Node) noteWaitingLocked(v View, acts []Action, now time.Time) {
	active := v.Active.Generation != 0
	for _, a := range acts {
		switch a.Kind {
		case ActFence:
			active = false
		case ActActivate:
			active = true
		}
	}
	w := ""
	switch {
	case active:
	case v.Leader:
		// Only the leader can run the guest: not active, nobody is. (A
		// leader that cannot resume keeps handing leadership on, so it is
		// often Transferring; a switchover's leader is still Eligible.)
		claimed := v.Claimed != 0 && v.ClaimedTerm == v.Term
		if r := IneligibleReason(v); r != "" && !v.Pending.Claim && !claimed {
			w = fmt.Sprintf("no primary: raft leader %s cannot resume the guest: %s; needed: %s", v.Self.ID, r, Needed(v.State))
			var down []string
			for _, p := range v.Voters {
				if v.Unreachable[p.ID] {
					down = append(down, p.ID)
				}
			}
			if len(down) > 0 {
				w += "; unreachable: " + strings.Join(down, ", ")
			}
		}
	default:
		st := v.State
		_, leader := n.raft.LeaderWithID()
		self := "this node can resume the guest if it becomes leader"
		if r := IneligibleReason(v); r != "" {
			self = "this node cannot: " + r
		}
		switch {
		case leader == "":
			w = fmt.Sprintf("no raft leader: a majority of the %d voters must be up and reachable", len(n.voters))
			if st.Generation > 0 {
				w += fmt.Sprintf(" (cluster at generation %d, committed epoch %d; needed to resume: %s; %s)", st.Generation, st.Epoch, Needed(st), self)
			}
		case st.Generation > 0 && string(leader) != st.Primary:
			// The primary runs the guest only while it leads raft.
			w = fmt.Sprintf("no primary: raft leader %s is not the cluster's primary %s (generation %d, committed epoch %d); needed to resume: %s; %s",
				leader, st.Primary, st.Generation, st.Epoch, Needed(st), self)
		}
	}
	if w != n.waiting {
		n.waiting, n.waitingSince = w, now
	}
	switch {
	case w != "" && w != n.waitingLogged && now.Sub(n.waitingSince) >= waitingLogAfter:
		n.waitingLogged = w
		n.log.Warn("the guest is not served", "why", w)
	case w == "" && n.waitingLogged != "":
		n.waitingLogged = ""
		n.log.Info("no longer waiting", "was", "the guest was not served")
	}
}

// execLocked carries out one action. Fence and activate are immediate;
// everything that talks to raft or the network runs on a worker, bounded by
// a timeout, so the loop never waits and a fence is never delayed.
// Preconditions: n.mu held.
func (n *Node) execLocked(a Action, v View, now time.Time) {
	switch a.Kind {
	case ActFence:
		n.active.Store(nil)
		n.emit(Event{Kind: EventFenced, Generation: a.Generation, Reason: a.Reason, At: now})
	case ActActivate:
		n.active.Store(&Activation{Generation: a.Generation, Term: v.Term})
		// From here the guest this node runs is the image that counts.
		n.image = &Image{Generation: a.Generation, Epoch: max(v.RunnableEpoch, a.Epoch), Live: true}
		n.claimFrom, n.claimTo = 0, 0
		peer, _ := v.State.Secondary()
		n.emit(Event{Kind: EventBecamePrimary, Generation: a.Generation, Epoch: a.Epoch, Peer: peer, At: now})
	case ActAnnouncePeer:
		n.announced = a.Target
		n.emit(Event{Kind: EventPeerChanged, Peer: a.Target, At: now})
	case ActClaim:
		n.pending.Claim = true
		term := v.Term
		img := n.image // the image this claim is made with
		n.worker(func() {
			err := n.apply(cmdPromote, &promoteCmd{ID: n.cfg.ID, Generation: a.Generation})
			n.mu.Lock()
			n.pending.Claim = false
			if err == nil && n.raft.CurrentTerm() == term {
				n.claimed, n.claimedTerm = a.Generation, term
			}
			if err == nil && img != nil && n.image != nil && n.image.Generation == img.Generation && v.RunnableGen == a.Generation-1 {
				// Nothing is released under the new generation before this
				// node activates it: the image it claimed with holds all
				// of it, should it lose leadership before activating.
				n.claimFrom, n.claimTo = img.Generation, a.Generation
			}
			n.mu.Unlock()
			if err != nil {
				n.log.Debug("claim failed", "gen", a.Generation, "err", err)
				return // retried on the next tick
			}
			n.poke()
		})
	case ActTransfer:
		n.pending.Transfer = true
		n.lastTransfer = now
		n.transfers++
		n.transferring.Add(1)
		n.worker(func() {
			err := n.transferLeadership(a.Target)
			n.transferring.Add(-1)
			n.mu.Lock()
			n.pending.Transfer = false
			n.mu.Unlock()
			if err != nil {
				n.log.Debug("leadership transfer failed", "to", a.Target.ID, "err", err)
			} else {
				n.log.Info("leadership transferred", "to", a.Target.ID, "reason", a.Reason)
			}
			n.poke()
		})
	case ActMarkUnprotected:
		n.pending.Protect = true
		n.worker(func() {
			err := n.apply(cmdSetProtected, &protectedCmd{Generation: a.Generation})
			n.mu.Lock()
			n.pending.Protect = false
			n.mu.Unlock()
			if err == nil {
				n.emit(Event{Kind: EventUnprotected, Generation: a.Generation, Reason: a.Reason})
			}
		})
	case ActApplyEpoch:
		n.pending.Epoch = true
		n.lastEpochApply = now
		n.worker(func() {
			err := n.apply(cmdEpoch, &epochCmd{Generation: a.Generation, Epoch: a.Epoch})
			n.mu.Lock()
			n.pending.Epoch = false
			n.mu.Unlock()
			if err != nil {
				n.log.Debug("epoch report failed", "epoch", a.Epoch, "err", err)
			}
		})
	case ActRegister:
		n.pending.Register = true
		n.lastRegister = now
		leader := v.Leader
		n.worker(func() {
			err := n.register(a.Target, leader)
			n.mu.Lock()
			n.pending.Register = false
			n.mu.Unlock()
			if err != nil {
				if errors.Is(err, ErrWrongCluster) || errors.Is(err, ErrInUse) {
					n.log.Error("registration refused", "err", err)
					n.emit(Event{Kind: EventRefused, Reason: err.Error()})
				} else {
					n.log.Debug("registration failed", "err", err)
				}
			}
		})
	}
}

// worker runs f on a goroutine Close waits for.
func (n *Node) worker(f func()) {
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		f()
	}()
}

// register puts info into the FSM: directly when leader, else through the
// leader's registration RPC.
func (n *Node) register(info NodeInfo, leader bool) error {
	req := registerRequest{ClusterID: n.cfg.ClusterID, Info: info}
	if leader {
		if err := n.checkVoter(info); err != nil {
			return err
		}
		return n.apply(cmdRegister, &registerCmd{ClusterID: req.ClusterID, Info: info})
	}
	addr, _ := n.raft.LeaderWithID()
	if addr == "" {
		return errors.New("failover: register: no known leader")
	}
	reply, err := n.stream.registerRemote(string(addr), req, n.cfg.ApplyTimeout+time.Second)
	if err != nil {
		return err
	}
	if reply.Err != "" {
		switch {
		case strings.Contains(reply.Err, ErrWrongCluster.Error()):
			return fmt.Errorf("%w: %s", ErrWrongCluster, reply.Err)
		case strings.Contains(reply.Err, ErrInUse.Error()):
			return fmt.Errorf("%w: %s", ErrInUse, reply.Err)
		}
		return fmt.Errorf("failover: register with leader %s: %s", addr, reply.Err)
	}
	return nil
}

// checkVoter refuses info whose ID is not a voter, or is a voter at another
// address (the ID is in use by another node).
func (n *Node) checkVoter(info NodeInfo) error {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return fmt.Errorf("failover: read configuration: %w", err)
	}
	for _, s := range f.Configuration().Servers {
		if string(s.ID) != info.ID {
			continue
		}
		if string(s.Address) != info.RaftAddr {
			return fmt.Errorf("%w: node id %s is a voter at %s, not %s", ErrInUse, info.ID, s.Address, info.RaftAddr)
		}
		return nil
	}
	return fmt.Errorf("%w: node id %s is not a voter of this cluster", ErrMembership, info.ID)
}

// wrongClusterReply is a registrant's answer when its cluster ID differs:
// it names neither ID (the leader logs them), so a stranger cannot learn
// the cluster's ID from a refusal.
var wrongClusterReply = ErrWrongCluster.Error() + ": wrong cluster (this node's cluster ID is not the leader's; the leader's log has the details)"

// handleRegister serves a follower's registration on the leader. The
// transport has already checked that the registrant registers itself
// (muxStream.checkRegistrant).
func (n *Node) handleRegister(req registerRequest) registerReply {
	if n.closed.Load() || !n.started.Load() {
		return registerReply{Err: ErrClosed.Error()}
	}
	if n.raft.State() != raft.Leader {
		addr, _ := n.raft.LeaderWithID()
		return registerReply{Err: ErrNotLeader.Error(), LeaderAddr: string(addr)}
	}
	if req.ClusterID != n.cfg.ClusterID {
		n.log.Warn("registration refused: wrong cluster", "registrant", req.Info.ID, "their_cluster", req.ClusterID, "our_cluster", n.cfg.ClusterID)
		return registerReply{Err: wrongClusterReply}
	}
	if err := n.checkVoter(req.Info); err != nil {
		return registerReply{Err: err.Error()}
	}
	if err := n.apply(cmdRegister, &registerCmd{ClusterID: req.ClusterID, Info: req.Info}); err != nil {
		if errors.Is(err, ErrWrongCluster) {
			n.log.Warn("registration refused", "registrant", req.Info.ID, "err", err)
			return registerReply{Err: wrongClusterReply}
		}
		return registerReply{Err: err.Error()}
	}
	return registerReply{}
}

// transferVoteWindow is how long after starting a leadership transfer this
// node honours the target's vote request with the LeadershipTransfer flag.
func (n *Node) transferVoteWindow() time.Duration {
	return max(4*n.cfg.ElectionTimeout, 2*time.Second)
}

// transferLeadership hands raft leadership to target. It first records the
// grant, so that this node, and only it, honours target's vote request
// that bypasses the vote check (see muxStream.admit).
func (n *Node) transferLeadership(target NodeInfo) error {
	n.transferGrant.Store(&transferGrant{to: target.ID, until: n.clock.Now().Add(n.transferVoteWindow())})
	return n.raft.LeadershipTransferToServer(raft.ServerID(target.ID), raft.ServerAddress(target.RaftAddr)).Error()
}

// transferGrant: this node started a leadership transfer to "to".
type transferGrant struct {
	to    string
	until time.Time
}

// leaderID implements raftPolicy.
func (n *Node) leaderID() string {
	if !n.started.Load() {
		return ""
	}
	_, id := n.raft.LeaderWithID()
	return string(id)
}

// transferVote implements raftPolicy.
func (n *Node) transferVote(candidate string) bool {
	g := n.transferGrant.Load()
	return g != nil && g.to == candidate && n.clock.Now().Before(g.until)
}

// slogWriter feeds hclog's lines (raft's logs) into slog.
type slogWriter struct{ log *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.log.Info(strings.TrimSpace(string(p)), "component", "raft")
	return len(p), nil
}

// WaitSynced waits until this node knows a leader and has applied
// everything the leader had committed when it last heard from it, so
// State() reflects the cluster (use it after Open before deciding whether to
// boot a guest). It returns ctx's error when ctx ends first.
func (n *Node) WaitSynced(ctx context.Context) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		if n.closed.Load() {
			return ErrClosed
		}
		if addr, _ := n.raft.LeaderWithID(); addr != "" {
			ci := n.raft.CommitIndex()
			if ci > 0 && n.raft.AppliedIndex() >= ci {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("failover: wait for sync: %w", ctx.Err())
		case <-t.C:
		}
	}
}
