package failover

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/tandemvm/tandem/internal/clock"
	"github.com/tandemvm/tandem/internal/trust"
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
	// claims: what this node's claims did to its image's generation.
	claims        ImageClaims
	waiting       string    // why nobody serves, as this node sees it
	waitingSince  time.Time // when waiting last changed
	waitingLogged string    // the reason last logged

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
	if err := n.answer(f); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
			return fmt.Errorf("%w: %s: %w", ErrNotLeader, t, err)
		}
		return fmt.Errorf("failover: %s: %w", t, err)
	}
	if err, ok := f.Response().(error); ok && err != nil {
		return err
	}
	return nil
}

// answer waits for raft's answer to f, or for Close. Raft never answers
// a future still queued when it shuts down (as with a leadership
// verification, UnansweredVerifyFunc), and Close waits for the goroutine
// of every apply: without this a Close racing an apply hung for good
// (found by ft.TestDriverCrashSweep). The waiter left on such a future
// is abandoned (UnansweredApplyFunc).
func (n *Node) answer(f raft.Future) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-n.stop:
		select {
		case err := <-done:
			return err
		default:
			return ErrClosed
		}
	}
}

// UnansweredApplyFunc names the goroutine answer leaves waiting on a
// raft future never answered (queued as raft shut down); test mains
// pass it to goleak with UnansweredVerifyFunc.
const UnansweredApplyFunc = "github.com/tandemvm/tandem/failover.(*Node).answer.func1"

// RaftTransferLeaks are the goroutines hashicorp/raft (1.7.3) leaves
// behind when it shuts down during a leadership transfer: the transfer
// blocks sending to the replication goroutine that has already stopped
// (raft.go, leadershipTransfer: triggerDeferErrorCh is sent to outside a
// select), and the leader loop's watcher waits on it. Nothing of Tandem's
// holds them; test mains pass them to goleak.
var RaftTransferLeaks = []string{
	"github.com/hashicorp/raft.(*Raft).leadershipTransfer",
	"github.com/hashicorp/raft.(*Raft).leaderLoop.func2",
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
