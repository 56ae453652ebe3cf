package ft

import (
	"context"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/clock"
	"github.com/tandemvm/tandem/internal/vfs"
	"github.com/tandemvm/tandem/replica"
)

// MemberConfig configures a Member.
type MemberConfig struct {
	// Node is the guest node the member runs its guest on: status,
	// console, API. The member does not close it.
	Node *Node
	// Coordinator decides which node runs the guest. The member owns it
	// once started: Stop closes it if it has a Close method.
	Coordinator Coordinator
	Epochs      EpochSettings
	// Receiver builds the guest of a received image (a secondary's).
	Receiver *replica.Receiver
	// DataDir, if set, keeps the committed image in DataDir/image.
	DataDir string
	// FS holds DataDir (nil: the real file system); BootID names the
	// host's boot for the stored image (nil: Linux's boot ID). Tests
	// give a vfs.MemFS and its crash count, to cut the power of the
	// secondary's host (docs/DURABILITY.md).
	FS     vfs.FS
	BootID func() string
	// Data is the data port primaries stream epochs to (nil: none). Stop
	// closes it.
	Data net.Listener
	// Boot, if set, builds the guest this node runs first (with
	// BootConfig) when the coordinator's record is empty (generation 0)
	// and Fresh says this node never ran before: only a first start
	// boots (a restarted node's view can lag for a moment, and a guest
	// booted then would be a second, empty one).
	Boot       func() (guest.Guest, error)
	BootConfig guest.Config
	Fresh      bool
	// KeepActivated keeps an activated secondary answering on the data
	// port: a pair's old primary that joins again hears "activated" and
	// fences itself (a pair has no other fence). A raft member closes
	// those connections instead: raft fences the old primary.
	KeepActivated bool
	// Clock drives the member's and its epoch loops' timing (nil: real).
	Clock clock.Clock
	Log   *slog.Logger
}

// Member is the fault-tolerance driver of one node: it boots the guest
// (a fresh cluster's first primary), receives epochs into a committed
// image while another node is primary, runs the guest from that image
// (or its kept guest) when the coordinator makes it primary, protects it
// with an epoch loop whose every release the coordinator permits, stops
// at once when fenced (keeping the guest paused while no newer primary
// exists), and hands the guest over on a switchover.
//
// Locks: m.mu and the node's mu are never held together; protSem is taken
// before either and never while holding one.
type Member struct {
	n     *Node
	coord Coordinator
	cfg   MemberConfig
	log   *slog.Logger
	clk   clock.Clock
	gen   atomic.Uint64 // generation this node releases output under

	// ctx ends when the member stops; cancel ends it.
	ctx    context.Context
	cancel context.CancelFunc

	// protSem (capacity 1) orders this node's records of protection, and
	// claimed, guarded by it, says a "protected" may be recorded that the
	// coordinator's state here does not show yet: see claimProtection and
	// unprotect.
	protSem chan struct{}
	claimed bool

	// goMu guards stopping; wg counts the member's goroutines (spawn):
	// the data port's server, the event loop, start, watchBoot and
	// claimProtection. Stop ends them (ctx) and joins them.
	goMu     sync.Mutex
	stopping bool
	wg       sync.WaitGroup

	// mu guards the fields below.
	mu         sync.Mutex
	boot       guest.Guest // a fresh cluster's first guest, booted, not yet run, or a fenced primary's, kept paused
	bootCfg    guest.Config
	bootGen    uint64             // the generation boot ran under (0: never ran)
	sec        *replica.Secondary // receiving while not primary
	activated  *replica.Secondary // the secondary activated last (KeepActivated)
	loop       *failover.EpochLoop
	loopCancel context.CancelFunc
	loopDone   chan struct{} // closed when loop.Run has returned
	lastEpoch  uint64
	switching  bool // a switchover is under way
}

// clusterViewer is a coordinator with a record to show in status (the
// etcd coordinator's; the raft one's is set up with its metrics above).
type clusterViewer interface {
	ClusterView(gen uint64) *api.ClusterView
}

// NewMember builds a member; Start runs it.
func NewMember(cfg MemberConfig) *Member {
	ctx, cancel := context.WithCancel(context.Background())
	m := &Member{n: cfg.Node, coord: cfg.Coordinator, cfg: cfg, log: cfg.Log, clk: clock.Or(cfg.Clock),
		ctx: ctx, cancel: cancel, protSem: make(chan struct{}, 1)}
	if rc, ok := cfg.Coordinator.(*RaftCoordinator); ok && cfg.Node != nil {
		cfg.Node.mu.Lock()
		cfg.Node.raft = rc.Node // the role metrics and status read raft's record
		cfg.Node.cluster = func() *api.ClusterView { return rc.ClusterView(m.gen.Load()) }
		cfg.Node.mu.Unlock()
	} else if cv, ok := cfg.Coordinator.(clusterViewer); ok && cfg.Node != nil {
		cfg.Node.mu.Lock()
		cfg.Node.cluster = func() *api.ClusterView { return cv.ClusterView(m.gen.Load()) }
		cfg.Node.nodes = func(lag *int) []api.NodeView {
			// The record's members; reachability and quorum are etcd's
			// business, not shown here.
			nodes, _ := clusterNodes(cfg.Coordinator.State(), nil, cfg.Coordinator.ID(), "", nil, lag, contacts{})
			return nodes
		}
		cfg.Node.record = cfg.Coordinator.State
		cfg.Node.mu.Unlock()
	}
	return m
}

// Start serves the data port, follows the coordinator's events and
// decides the node's first part: when the coordinator is already in sync
// (a pair), before Start returns, so the first status a caller sees says
// where the node stands; otherwise once it is.
func (m *Member) Start() {
	if m.cfg.Data != nil {
		m.spawn(func() { serveSecondary(m.ctx, m.cfg.Data, m.dataTarget, m.coord.AdmitPrimary, m.log) })
	}
	m.spawn(m.events)
	now, cancel := context.WithCancel(m.ctx)
	cancel()
	if m.coord.WaitSynced(now) == nil {
		m.decide()
		return
	}
	m.spawn(m.start)
}

// dataTarget is the Secondary a primary's data connection reaches now:
// none while this node is primary (the connection is shut), except an
// activated one kept answering (KeepActivated).
func (m *Member) dataTarget() *replica.Secondary {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.sec != nil {
		return m.sec
	}
	return m.activated
}

// Stop ends the member: its goroutines (joined, bounded), the data port,
// the coordinator (closed if it has a Close), the epoch loop (waited for,
// bounded) and the guests and images it holds. The Node stays open, its
// guest detached from nothing: close it after.
func (m *Member) Stop() {
	m.cancel()
	if m.cfg.Data != nil {
		m.cfg.Data.Close()
	}
	if c, ok := m.coord.(io.Closer); ok {
		c.Close()
	}
	// Once they are gone nothing starts or swaps a loop, a secondary or a
	// kept guest: what is read below stays.
	m.join()
	m.mu.Lock()
	if m.loopCancel != nil {
		m.loopCancel()
	}
	sec, act, boot, done := m.sec, m.activated, m.boot, m.loopDone
	m.mu.Unlock()
	m.waitLoop(done) // the loop reads guest memory; n.Close unmaps it
	for _, s := range []*replica.Secondary{sec, act} {
		if s != nil {
			s.Close()
		}
	}
	if boot != nil {
		boot.Close()
	}
}

// spawn runs f on a goroutine the member owns (joined by join); once the
// member is stopping it runs nothing and returns false.
func (m *Member) spawn(f func()) bool {
	m.goMu.Lock()
	defer m.goMu.Unlock()
	if m.stopping {
		return false
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		f()
	}()
	return true
}

// memberJoinTimeout bounds how long a stopping member waits for its
// goroutines (their context has ended and the coordinator is closed:
// each returns within its own bound, the longest a fence's wait for its
// loop, 5 s).
const memberJoinTimeout = 10 * time.Second

// join stops spawn and waits (bounded) for the member's goroutines.
func (m *Member) join() {
	m.goMu.Lock()
	m.stopping = true
	m.goMu.Unlock()
	joinWithin(m.wg.Wait, memberJoinTimeout, m.log, "member goroutines")
}

// events follows the coordinator until the member stops.
func (m *Member) events() {
	for {
		select {
		case <-m.ctx.Done():
			return
		case ev := <-m.coord.Events():
			switch ev.Kind {
			case failover.EventBecamePrimary:
				m.becomePrimary(ev)
			case failover.EventFenced:
				m.fence(ev.Reason)
			case failover.EventPeerChanged:
				if loop := m.currentLoop(); loop != nil && ev.Peer.DataAddr != "" {
					loop.SetSecondary(ev.Peer.DataAddr)
				}
			case failover.EventUnprotected:
				m.log.Warn("cluster marked unprotected", "generation", ev.Generation)
				// A silent (not broken) data link leaves the loop
				// protected, its output held and the coordinator never
				// told of a re-protection: make it rejoin.
				if loop := m.currentLoop(); loop != nil {
					loop.Relink("the cluster recorded the loss of protection: " + ev.Reason)
				}
			case failover.EventRefused:
				m.log.Error("refused by the cluster", "reason", ev.Reason)
			}
		}
	}
}

// currentLoop is the epoch loop protecting this node's guest (nil: not
// primary).
func (m *Member) currentLoop() *failover.EpochLoop {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.loop
}

// waitLoop waits (bounded) until a cancelled loop's Run has returned: it
// reads guest memory until then, so the guest must not be closed before.
func (m *Member) waitLoop(done chan struct{}) bool {
	if done == nil {
		return true
	}
	t := m.clk.NewTimer(loopStopTimeout)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C():
		m.log.Error("epoch loop still running 5s after cancel; the guest is left open")
		return false
	}
}

// loopStopTimeout bounds waitLoop.
const loopStopTimeout = 5 * time.Second
