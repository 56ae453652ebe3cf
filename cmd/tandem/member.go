package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/fsperm"
	"github.com/tandemvm/tandem/internal/netlimit"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

func init() {
	register("witness", "the third raft voter: decides, never runs the guest", cmdWitness)
	register("switchover", "hand the guest to the warm secondary with about one epoch of pause", cmdSwitchover)
}

// clusterFlags are the raft flags shared by primary, secondary and witness.
type clusterFlags struct {
	id, raft, data, peers, dataDir string
	dataAdvertise                  string
	heartbeat, election, lease     time.Duration
	dataTimeout                    time.Duration
	// tls and insecure are the node's trust (from its TLS flags): the
	// raft port's as well as the other channels'.
	tls      *trust.Identity
	insecure bool
}

func addClusterFlags(fs *flag.FlagSet, cf *clusterFlags, withData bool) {
	fs.StringVar(&cf.id, "id", "", "this node's id in the cluster")
	fs.StringVar(&cf.raft, "raft", "", "this node's raft address (default: its entry in --peers)")
	if withData {
		fs.StringVar(&cf.data, "data", "", "address the primary streams epochs to")
		fs.StringVar(&cf.dataAdvertise, "data-advertise", "", "the --data address as other nodes reach it, if not the same (NAT, a proxy)")
	}
	fs.StringVar(&cf.peers, "peers", "", "every voter: ID=HOST:PORT,ID=HOST:PORT,ID=HOST:PORT")
	fs.StringVar(&cf.dataDir, "data-dir", "", "raft log, snapshots and (secondary) the committed image")
	fs.DurationVar(&cf.heartbeat, "heartbeat-timeout", failover.DefaultHeartbeatTimeout, "raft heartbeat timeout (the same on every node)")
	fs.DurationVar(&cf.election, "election-timeout", failover.DefaultElectionTimeout, "raft election timeout (the same on every node)")
	fs.DurationVar(&cf.lease, "lease-timeout", failover.DefaultLeaderLeaseTimeout, "leader lease: a primary that cannot reach a majority this long stops releasing output")
	fs.DurationVar(&cf.dataTimeout, "data-timeout", failover.DefaultDataTimeout, "no acknowledgement from the secondary this long: unprotected")
}

// parsePeers reads ID=HOST:PORT,... into a map.
func parsePeers(s string) (map[string]string, error) {
	peers := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		id, addr, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || id == "" {
			return nil, usagef("--peers %q: want ID=HOST:PORT,ID=HOST:PORT,ID=HOST:PORT", s)
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, usagef("--peers: %s=%q: want HOST:PORT", id, addr)
		}
		if _, dup := peers[id]; dup {
			return nil, usagef("--peers: id %q appears twice", id)
		}
		peers[id] = addr
	}
	if len(peers) < 3 {
		return nil, usagef("--peers: %d voters; a cluster is a primary, a secondary and a witness (3)", len(peers))
	}
	return peers, nil
}

func (cf clusterFlags) config(role failover.Role, apiAddr, consoleAddr string, log *slog.Logger) (failover.Config, error) {
	if cf.id == "" || cf.peers == "" || cf.dataDir == "" {
		return failover.Config{}, usagef("--id, --peers and --data-dir are required")
	}
	peers, err := parsePeers(cf.peers)
	if err != nil {
		return failover.Config{}, err
	}
	if _, ok := peers[cf.id]; !ok {
		return failover.Config{}, usagef("--id %q is not in --peers", cf.id)
	}
	if role != failover.RoleWitness {
		if _, _, err := net.SplitHostPort(cf.data); err != nil {
			return failover.Config{}, usagef("--data %q: want HOST:PORT", cf.data)
		}
		if cf.dataAdvertise != "" {
			if _, _, err := net.SplitHostPort(cf.dataAdvertise); err != nil {
				return failover.Config{}, usagef("--data-advertise %q: want HOST:PORT", cf.dataAdvertise)
			}
		}
	}
	return failover.Config{
		ID: cf.id, Role: role, RaftAddr: cf.raft, DataAddr: orDefault(cf.dataAdvertise, cf.data), APIAddr: apiAddr, ConsoleAddr: consoleAddr,
		Peers: peers, DataDir: filepath.Join(cf.dataDir, "raft"),
		HeartbeatTimeout: cf.heartbeat, ElectionTimeout: cf.election, LeaderLeaseTimeout: cf.lease,
		DataTimeout: cf.dataTimeout, Logger: log.With("component", "raft"),
		TLS: cf.tls, Insecure: cf.insecure,
	}, nil
}

// member is a primary or secondary of a raft trio. Which of the two it is
// changes with leadership: it runs the guest while raft makes it primary,
// and otherwise receives epochs into a committed image.
type member struct {
	n       *guestNode
	node    *failover.Node
	ef      epochFlags
	log     *slog.Logger
	dataDir string
	recv    *replica.Receiver
	gen     atomic.Uint64   // generation this node releases output under
	ctx     context.Context // ends when the member stops

	// protSem (capacity 1) orders this node's records of protection in
	// raft, and claimed, guarded by it, says a "protected" may be in
	// raft's log that raft's state here does not show yet: see
	// claimProtection and unprotect.
	protSem chan struct{}
	claimed bool

	// goMu guards stopping; wg counts the member's goroutines (spawn):
	// the data port's server, the raft event loop, start, watchBoot and
	// claimProtection. runMember stops them (ctx) and joins them.
	goMu     sync.Mutex
	stopping bool
	wg       sync.WaitGroup

	// mu guards the fields below.
	mu         sync.Mutex
	boot       guest.Guest // a fresh cluster's first guest, booted, not yet run, or a fenced primary's, kept paused
	bootCfg    guest.Config
	bootGen    uint64             // the generation boot ran under (0: never ran)
	sec        *replica.Secondary // receiving while not primary
	loop       *failover.EpochLoop
	loopCancel context.CancelFunc
	loopDone   chan struct{} // closed when loop.Run has returned
	lastEpoch  uint64
	switching  bool // a switchover is under way
}

func runMember(role failover.Role, cf clusterFlags, gf *guestFlags, ef epochFlags, rf receiveFlags, snapDir, apiAddr, consoleAddr string, allowFaults bool, nt nodeTrust) error {
	log := newLogger().With("node", cf.id)
	fcfg, err := cf.config(role, apiAddr, consoleAddr, log)
	if err != nil {
		return err
	}
	var kind string
	var gcfg guest.Config
	if gf != nil {
		if kind, gcfg, err = gf.config(); err != nil {
			return err
		}
	}
	if err := ef.validate(); err != nil {
		return err
	}
	n, err := newGuestNode(string(role), apiAddr, consoleAddr, log, nt)
	if err != nil {
		return err
	}
	n.allowFaults = allowFaults
	// The data directory holds the committed image and the disk copy.
	if err := fsperm.PrivateDir(cf.dataDir, log); err != nil {
		n.close()
		return fmt.Errorf("--data-dir: %w", err)
	}
	if err := n.setSnapshotDir(snapDir); err != nil {
		n.close()
		return err
	}
	fcfg.APIAddr, fcfg.ConsoleAddr = n.api.addr(), n.console.addr()
	dataLn, err := nt.listen(log, "--data", cf.data, "data", netlimit.DataCap)
	if err != nil {
		n.close()
		return err
	}
	_, statErr := os.Stat(fcfg.DataDir)
	fresh := errors.Is(statErr, os.ErrNotExist)
	node, err := failover.Open(fcfg)
	if err != nil {
		dataLn.Close()
		n.close()
		return err
	}
	m := &member{n: n, node: node, ef: ef, log: log, dataDir: cf.dataDir, protSem: make(chan struct{}, 1),
		recv: rf.apply(&replica.Receiver{NewGuest: emptyGuest, Build: version.Build(), Log: log, Timeout: 5 * time.Second}, cf.dataDir)}
	n.api.mux.HandleFunc("POST /switchover", m.handleSwitchover)
	n.cluster = m.clusterStatus
	ctx, cancel := context.WithCancel(context.Background())
	m.ctx = ctx
	// Primary connections reach whichever Secondary this node runs now;
	// while it is primary (or undecided) there is none and they are shut.
	m.spawn(func() {
		serveSecondary(ctx, dataLn, func() *replica.Secondary {
			m.mu.Lock()
			defer m.mu.Unlock()
			return m.sec
		}, m.checkPrimaryPeer, log)
	})
	m.spawn(func() { m.events(ctx) })
	m.spawn(func() { m.start(ctx, kind, gcfg, fresh) })

	waitForStop(n.api.quit, log)
	cancel()
	dataLn.Close()
	node.Close()
	// Once they are gone nothing starts or swaps a loop, a secondary or a
	// kept guest: what is read below stays.
	m.join()
	m.mu.Lock()
	if m.loopCancel != nil {
		m.loopCancel()
	}
	sec, boot, done := m.sec, m.boot, m.loopDone
	m.mu.Unlock()
	m.waitLoop(done) // the loop reads guest memory; n.close unmaps it
	if sec != nil {
		sec.Close()
	}
	if boot != nil {
		boot.Close()
	}
	n.close()
	return nil
}

// spawn runs f on a goroutine the member owns (joined by join); once the
// member is stopping it runs nothing and returns false.
func (m *member) spawn(f func()) bool {
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
// goroutines (their context has ended and raft is closed: each returns
// within its own bound, the longest a fence's wait for its loop, 5 s).
const memberJoinTimeout = 10 * time.Second

// join stops spawn and waits (bounded) for the member's goroutines.
func (m *member) join() {
	m.goMu.Lock()
	m.stopping = true
	m.goMu.Unlock()
	joinWithin(m.wg.Wait, memberJoinTimeout, m.log, "member goroutines")
}

// primaryWait is how long a data connection whose certificate names a
// member that could be primary (not this node, not the witness) waits for
// this node's view of raft to name it primary: a new primary may dial
// before its promotion has reached here.
const primaryWait = 3 * time.Second

// checkPrimaryPeer admits a primary's data connection over TLS only if its
// certificate names the node raft says is primary. One naming another
// member that may become primary (not the witness, not this node) is
// given primaryWait for this node's raft state to catch up; anything else
// is refused at once. Plaintext connections (no TLS configured) pass:
// the secondary's generation check still applies to them.
func (m *member) checkPrimaryPeer(conn net.Conn) error {
	if _, isTLS := conn.(*tls.Conn); !isTLS {
		return nil
	}
	// A verified certificate that names no node (no CN, no DNS SAN) is
	// refused below like one naming a non-member: it must not pass as
	// plaintext.
	names := trust.PeerNames(conn)
	deadline := time.Now().Add(primaryWait)
	for {
		st := m.node.State()
		if st.Primary != "" && st.Primary != m.node.ID() && slices.Contains(names, st.Primary) {
			return nil
		}
		candidate := false
		for _, mem := range st.Members {
			if mem.Role != failover.RoleWitness && mem.ID != m.node.ID() && slices.Contains(names, mem.ID) {
				candidate = true
			}
		}
		if !candidate || time.Now().After(deadline) || m.ctx.Err() != nil {
			name, _ := trust.PeerName(conn)
			return fmt.Errorf("%w: a primary connection from %q, but the cluster's primary is %q (generation %d)", trust.ErrPeer, name, st.Primary, st.Generation)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// secondaryName is the node whose data address addr is: the primary's
// epoch loop expects the secondary's certificate to name it. An address
// no member registered gets the name of the member raft calls secondary.
func (m *member) secondaryName(addr string) string {
	st := m.node.State()
	for _, mem := range st.Members {
		if mem.DataAddr == addr && mem.Role != failover.RoleWitness && mem.ID != m.node.ID() {
			return mem.ID
		}
	}
	if sec, ok := st.Secondary(); ok {
		return sec.ID
	}
	return m.node.ID() + "'s secondary (unknown)" // names no certificate: refused
}

// start decides, once raft has caught up, whether this node boots the
// guest (the configured primary of a new cluster) or waits as secondary.
// Only a first start boots: a restarted node's view of raft can lag the
// leader's for a moment (it may still read generation 0), and a guest
// booted then would be a second, empty one.
func (m *member) start(ctx context.Context, kind string, cfg guest.Config, fresh bool) {
	for {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := m.node.WaitSynced(wctx)
		cancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return
		}
		m.log.Info("waiting for the cluster (a majority of voters) to form", "err", err)
	}
	st := m.node.State()
	if kind != "" && st.Generation == 0 && fresh {
		g, err := bootGuest(kind, cfg)
		if err != nil {
			m.log.Error("cannot boot the guest", "err", err)
			return
		}
		m.mu.Lock()
		m.boot, m.bootCfg = g, cfg
		m.mu.Unlock()
		m.node.SetImage(failover.Image{Live: true})
		m.log.Info("guest booted; waiting for raft to make this node primary", "kind", kind)
		m.watchBoot(ctx)
		return
	}
	if st.Primary == m.node.ID() {
		m.log.Error("the cluster names this node primary, but its guest was lost when it stopped; it cannot run again until the secondary takes over")
	}
	m.becomeSecondary("started as secondary")
}

// watchBoot drops the booted (or fenced and kept) guest once another node
// is primary in a newer generation than the guest ran under (this node's
// first view of raft was behind, or raft moved on without it): that
// node's image holds everything released, and this node serves as its
// secondary instead.
func (m *member) watchBoot(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
		st := m.node.State()
		m.mu.Lock()
		boot, gen := m.boot, m.bootGen
		if boot == nil {
			m.mu.Unlock()
			return // it ran: this node became primary
		}
		if !supersedes(st, m.node.ID(), gen) {
			m.mu.Unlock()
			continue
		}
		m.boot = nil
		m.mu.Unlock()
		boot.Close()
		m.node.ClearImage()
		m.becomeSecondary(fmt.Sprintf("the cluster has primary %s at generation %d, newer than this node's guest (generation %d)", st.Primary, st.Generation, gen))
		return
	}
}

// supersedes says whether, in state st, another node than self is primary
// in a generation newer than gen: a guest of gen is then history.
func supersedes(st failover.FSMState, self string, gen uint64) bool {
	return st.Generation > gen && st.Primary != "" && st.Primary != self
}

// becomeSecondary starts receiving epochs into a committed image (a kept
// one from the data directory if there is one).
func (m *member) becomeSecondary(why string) {
	sec := replica.NewSecondary(m.recv, func() uint64 { return m.node.State().Generation })
	if store, err := replica.OpenStoreWith(filepath.Join(m.dataDir, "image"), m.log, replica.StoreOptions{Sync: m.recv.Sync}); err != nil {
		m.log.Warn("secondary without a stored image", "err", err)
	} else {
		sec.Store = store
	}
	sec.OnCommit = func(epoch uint64) {
		gen, _ := sec.Generation()
		m.mu.Lock()
		current := m.sec == sec // not activated meanwhile
		m.mu.Unlock()
		if current {
			m.node.SetImage(failover.Image{Generation: gen, Epoch: epoch})
		}
	}
	if c, ok, err := sec.LoadStored(); err != nil {
		m.log.Warn("stored image unusable; waiting for a full sync", "err", err)
	} else if ok {
		gen, _ := sec.Generation()
		m.node.SetImage(failover.Image{Generation: gen, Epoch: c.Epoch})
		// Raft decides whether it may ever be resumed: only if it holds
		// the committed generation and epoch (see failover.IneligibleReason).
		st := m.node.State()
		m.log.Info("stored image loaded", "epoch", c.Epoch, "generation", gen, "cluster_generation", st.Generation, "cluster_epoch", st.Epoch)
	}
	m.mu.Lock()
	m.sec = sec
	m.mu.Unlock()
	m.n.mu.Lock()
	m.n.role, m.n.sec, m.n.state = "secondary", sec, "standby"
	m.n.mu.Unlock()
	m.log.Info("secondary", "why", why)
}

func (m *member) events(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-m.node.Events():
			switch ev.Kind {
			case failover.EventBecamePrimary:
				m.becomePrimary(ev)
			case failover.EventFenced:
				m.fence(ev.Reason)
			case failover.EventPeerChanged:
				m.mu.Lock()
				loop := m.loop
				m.mu.Unlock()
				if loop != nil && ev.Peer.DataAddr != "" {
					loop.SetSecondary(ev.Peer.DataAddr)
				}
			case failover.EventUnprotected:
				m.log.Warn("cluster marked unprotected", "generation", ev.Generation)
				// A silent (not broken) data link leaves the loop
				// protected, its output held and raft never told of a
				// re-protection: make it rejoin.
				m.mu.Lock()
				loop := m.loop
				m.mu.Unlock()
				if loop != nil {
					loop.Relink("the cluster recorded the loss of protection: " + ev.Reason)
				}
			case failover.EventRefused:
				m.log.Error("refused by the cluster", "reason", ev.Reason)
			}
		}
	}
}

// becomePrimary runs the guest under generation ev.Generation: the booted
// guest of a new cluster, or the committed image of this secondary.
func (m *member) becomePrimary(ev failover.Event) {
	t0 := time.Now()
	m.gen.Store(ev.Generation)
	m.mu.Lock()
	if m.loop != nil {
		// The same node won a new term: carry on under the new generation.
		m.mu.Unlock()
		m.log.Info("still primary", "generation", ev.Generation)
		return
	}
	var g guest.Guest
	var cfg guest.Config
	first := max(ev.Epoch, m.lastEpoch)
	from := "booted guest"
	if m.boot != nil {
		if m.bootGen != 0 {
			from = fmt.Sprintf("its own guest of generation %d, kept paused since its fence (epoch %d)", m.bootGen, m.lastEpoch)
		}
		g, cfg, m.boot, m.bootGen = m.boot, m.bootCfg, nil, 0
	} else if m.sec != nil {
		sec := m.sec
		m.mu.Unlock()
		ag, h, c, err := sec.Activate()
		m.mu.Lock()
		if err != nil {
			m.mu.Unlock()
			m.log.Error("made primary but cannot activate the committed image", "err", err)
			m.node.ClearImage()
			return
		}
		g, cfg, first = ag, h.Config, max(first, c.Epoch)
		m.sec = nil
		from = fmt.Sprintf("committed epoch %d", c.Epoch)
	} else {
		m.mu.Unlock()
		m.log.Error("made primary without a guest to run")
		m.node.ClearImage()
		return
	}
	// Epochs of this run are numbered after first: a fence reports the
	// kept guest at least there, which is at least what raft committed.
	m.lastEpoch = first
	m.mu.Unlock()
	loop := m.startLoop(g, cfg, first)
	if _, err := g.Resume(); err != nil {
		m.log.Error("resume the guest", "err", err)
		return
	}
	m.n.setState("running")
	if sec, ok := m.node.Secondary(); ok && sec.DataAddr != "" {
		loop.SetSecondary(sec.DataAddr)
	}
	m.log.Info("PRIMARY: guest running", "generation", ev.Generation, "from", from, "took", time.Since(t0).String())
}

// startLoop protects g with an epoch loop whose every release is checked
// against raft (generation and lease).
func (m *member) startLoop(g guest.Guest, cfg guest.Config, firstEpoch uint64) *failover.EpochLoop {
	node := m.node
	var loop *failover.EpochLoop
	loop = failover.NewEpochLoop(failover.EpochConfig{
		Guest: g, Config: cfg, Interval: m.ef.epoch, FlushBudget: m.ef.flushBudget, MaxInFlight: m.ef.inFlight,
		Verify: m.ef.verify, VerifySlicePages: m.ef.slicePages(), Build: version.Build(), Generation: m.gen.Load, Timings: m.n.api.timings, Log: m.log,
		Release: m.n.console.release,
		Allow:   func() bool { return node.CanRelease(m.gen.Load()) },
		TLS:     m.n.trust.id, SecondaryName: m.secondaryName,
		FirstEpoch: firstEpoch,
		AckTimeout: m.ef.ackTimeout,
		OnFenced: func(why string) {
			// Raft fences this node too (another node is primary in a
			// newer generation); the loop has already stopped releasing.
			m.log.Warn("the secondary says it runs the guest; epoch loop fenced, waiting for raft's fence", "why", why)
		},
		OnCommitted: func(epoch uint64) {
			node.DataHeartbeat()
			node.ReportEpoch(epoch)
		},
		OnProtected: func(protected bool, why string) {
			if protected {
				m.spawn(func() { m.claimProtection(loop) })
			}
		},
		Unprotect: m.unprotect,
	})
	m.n.observeDisk(g)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	m.mu.Lock()
	m.loop, m.loopCancel, m.loopDone = loop, cancel, done
	m.mu.Unlock()
	m.n.lockIdle()
	m.n.g, m.n.cfg, m.n.epochs, m.n.sec, m.n.role = g, cfg, loop, nil, "primary"
	m.n.mu.Unlock()
	go func() {
		defer close(done)
		loop.Run(ctx)
	}()
	return loop
}

// claimProtection records in raft that loop's secondary holds every
// acknowledged epoch, if loop is still this node's loop and protected when
// the record's turn comes. Records are ordered (protSem) and this one
// waits for raft's answer however long it takes: a "protected" whose
// apply was given up while still on its way to raft's log could land
// after the "unprotected" that let held output out, and the secondary
// would then take over from an epoch older than output already released.
// That lost writes in tandem drill (a lease-fenced primary, primary again
// in the same term, took its Unprotect fast path while the "protected" of
// its previous link was still uncommitted).
func (m *member) claimProtection(loop *failover.EpochLoop) {
	m.protSem <- struct{}{}
	defer func() { <-m.protSem }()
	m.mu.Lock()
	current := m.loop == loop
	m.mu.Unlock()
	if !current || !loop.Status().Protected {
		return
	}
	m.claimed = true
	if err := m.node.SetProtected(m.ctx, true); err != nil {
		m.log.Warn("cannot record protection in raft", "err", err)
	}
}

// unprotect records in raft that the secondary may miss output about to
// be released. It is skipped only when raft's state says unprotected and
// no "protected" of this node may still be on its way there.
func (m *member) unprotect(ctx context.Context) error {
	select {
	case m.protSem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("waiting for an earlier record of protection: %w", ctx.Err())
	}
	defer func() { <-m.protSem }()
	if !m.claimed && !m.node.State().Protected {
		return nil
	}
	if err := m.node.SetProtected(ctx, false); err != nil {
		return err
	}
	m.claimed = false
	return nil
}

// waitLoop waits (bounded) until a cancelled loop's Run has returned: it
// reads guest memory until then, so the guest must not be closed before.
func (m *member) waitLoop(done chan struct{}) bool {
	if done == nil {
		return true
	}
	select {
	case <-done:
		return true
	case <-time.After(5 * time.Second):
		m.log.Error("epoch loop still running 5s after cancel; the guest is left open")
		return false
	}
}

// fence stops this node's guest at once: nothing more leaves it. The
// guest is kept, paused, as long as no other node is primary in a newer
// generation: it may be the newest copy there is (the cluster lost its
// majority, or its secondary), and it is resumed if raft makes this node
// primary again. Only once another node is primary is it dropped (here or
// by watchBoot), and the node becomes that primary's secondary. A stored
// image is never loaded while the guest is kept: it can only be older.
func (m *member) fence(reason string) {
	m.mu.Lock()
	loop, cancel, done := m.loop, m.loopCancel, m.loopDone
	m.loop, m.loopCancel, m.loopDone = nil, nil, nil
	m.mu.Unlock()
	if loop == nil {
		return
	}
	gen := m.gen.Load()
	loop.Gate().Discard()
	cancel()
	m.n.lockIdle()
	g, cfg := m.n.g, m.n.cfg
	m.n.g, m.n.epochs, m.n.state = nil, nil, "fenced"
	m.n.mu.Unlock()
	m.n.console.dropAll()
	// Closing the guest unmaps its memory: the loop must be gone first
	// (a capture or live sync in flight read unmapped pages: SIGSEGV,
	// found by tandem drill).
	stopped := m.waitLoop(done)
	m.mu.Lock()
	m.lastEpoch = max(m.lastEpoch, loop.Status().LastShippedEpoch)
	epoch := m.lastEpoch
	m.mu.Unlock()
	if g == nil || !stopped {
		m.node.ClearImage()
		m.log.Warn("FENCED: guest stopped, no output released from here", "reason", reason)
		m.becomeSecondary("fenced: " + reason)
		return
	}
	ctx, c := context.WithTimeout(context.Background(), time.Second)
	g.Pause(ctx)
	c()
	if st := m.node.State(); supersedes(st, m.node.ID(), gen) {
		g.Close()
		m.node.ClearImage()
		m.log.Warn("FENCED: guest stopped, no output released from here", "reason", reason,
			"primary", st.Primary, "generation", st.Generation)
		m.becomeSecondary("fenced: " + reason)
		return
	}
	m.mu.Lock()
	m.boot, m.bootCfg, m.bootGen = g, cfg, gen
	m.mu.Unlock()
	m.node.SetImage(failover.Image{Generation: gen, Epoch: epoch, Live: true})
	m.log.Warn("FENCED: guest paused and kept, no output released from here; it is resumed if raft makes this node primary again, dropped once another node is",
		"reason", reason, "generation", gen, "epoch", epoch)
	m.spawn(func() { m.watchBoot(m.ctx) })
}

// handleSwitchover hands the guest to the secondary: one last epoch with
// the guest paused, acknowledged, then raft leadership moves.
func (m *member) handleSwitchover(w http.ResponseWriter, r *http.Request) {
	m.mu.Lock()
	loop := m.loop
	m.mu.Unlock()
	if loop == nil {
		writeError(w, http.StatusConflict, api.CodeNotPrimary, errors.New("not the primary: switchover is asked of the primary's API"))
		return
	}
	if !loop.Status().Protected {
		writeError(w, http.StatusConflict, api.CodeNotProtected, errors.New("not protected: the secondary has no current image to take over"))
		return
	}
	m.mu.Lock()
	busy := m.switching
	m.switching = true
	m.mu.Unlock()
	if busy {
		writeError(w, http.StatusConflict, api.CodeBusy, errors.New("a switchover is already under way"))
		return
	}
	defer func() {
		m.mu.Lock()
		m.switching = false
		m.mu.Unlock()
	}()
	t0 := time.Now()
	// The handover is not tied to the request: a client that goes away
	// (its HTTP timeout, a closed connection) must not leave the guest
	// paused between the final epoch and the transfer. It finishes, or
	// rolls back with the guest running here, within its own deadline.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), switchoverTimeout)
	defer cancel()
	if err := loop.FinalEpoch(ctx); err != nil {
		writeError(w, http.StatusConflict, api.CodeInternal, fmt.Errorf("final epoch: %w", err))
		return
	}
	st := loop.Status()
	m.node.ReportEpoch(st.LastCommittedEpoch)
	if err := m.node.Switchover(ctx, ""); err != nil {
		// Still leader: raft claims a new generation and makes this node
		// primary again; the paused guest resumes with a new loop.
		m.restartAfterFailedHandover()
		writeError(w, http.StatusConflict, api.CodeInternal, fmt.Errorf("switchover: %w", err))
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"ok": true, "final_epoch": st.LastCommittedEpoch, "took_ms": time.Since(t0).Milliseconds()})
}

// switchoverTimeout bounds a switchover from the request to the transfer
// (or the rollback).
const switchoverTimeout = 20 * time.Second

func (m *member) restartAfterFailedHandover() {
	m.mu.Lock()
	loop, cancel, done := m.loop, m.loopCancel, m.loopDone
	m.mu.Unlock()
	if loop == nil {
		return
	}
	cancel()
	if !m.waitLoop(done) {
		return
	}
	m.n.mu.Lock()
	g, cfg := m.n.g, m.n.cfg
	m.n.mu.Unlock()
	m.mu.Lock()
	m.loop = nil
	m.lastEpoch = max(m.lastEpoch, loop.Status().LastShippedEpoch)
	first := m.lastEpoch
	m.mu.Unlock()
	loop = m.startLoop(g, cfg, first)
	g.Resume()
	if sec, ok := m.node.Secondary(); ok {
		loop.SetSecondary(sec.DataAddr)
	}
}

// clusterView is the raft part of a member's status.
type clusterView = api.ClusterView

func (m *member) clusterStatus() *api.ClusterView {
	st := m.node.State()
	leader, _ := m.node.Leader()
	cv := clusterView{ID: m.node.ID(), Generation: st.Generation, Primary: st.Primary, Leader: leader,
		Protected: st.Protected, Epoch: st.Epoch, CanRelease: m.node.CanRelease(m.gen.Load()),
		Image: m.node.ImageStatus(), Waiting: m.node.Waiting()}
	for _, mem := range st.Members {
		cv.Members = append(cv.Members, fmt.Sprintf("%s(%s) data=%s api=%s console=%s", mem.ID, mem.Role, mem.DataAddr, mem.APIAddr, mem.ConsoleAddr))
	}
	return &cv
}

func cmdWitness(args []string) error {
	fs := newFlagSet("witness")
	var cf clusterFlags
	addClusterFlags(fs, &cf, false)
	apiAddr := fs.String("api", "", "address of an HTTP API for status (optional)")
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	addInsecureFlag(fs, &tf)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	nt, err := tf.resolve("--api", *apiAddr)
	if err != nil {
		return err
	}
	cf.tls, cf.insecure = nt.id, nt.insecure
	log := newLogger().With("node", cf.id)
	fcfg, err := cf.config(failover.RoleWitness, *apiAddr, "", log)
	if err != nil {
		return err
	}
	if err := fsperm.PrivateDir(cf.dataDir, log); err != nil {
		return fmt.Errorf("--data-dir: %w", err)
	}
	node, err := failover.Open(fcfg)
	if err != nil {
		return err
	}
	defer node.Close()
	var quit <-chan struct{} // nil without an API: only a signal stops it
	if *apiAddr != "" {
		srv, err := newAPIServer(*apiAddr, log, nt)
		if err != nil {
			return err
		}
		srv.mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
			st := node.State()
			leader, _ := node.Leader()
			writeJSON(w, http.StatusOK, api.Status{Role: "witness", Build: version.Build(), Witness: &api.WitnessStatus{
				Generation: st.Generation, Primary: st.Primary, Leader: leader, Protected: st.Protected,
				LastCommittedEpoch: st.Epoch, Waiting: node.Waiting()}})
		})
		srv.start()
		defer srv.close()
		quit = srv.quit
	}
	log.Info("witness running", "raft", fcfg.Peers[cf.id], "tls", nt.tlsOn())
	waitForStop(quit, log)
	return nil
}

func cmdSwitchover(args []string) error {
	fs := newFlagSet("switchover")
	api := fs.String("api", "127.0.0.1:7070", "API address of the primary")
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	id, err := tf.load()
	if err != nil {
		return err
	}
	// The node may hold the request for its whole switchover timeout.
	out, err := newAPIClient(*api, id, switchoverTimeout+5*time.Second).Switchover(context.Background())
	if err != nil {
		return err
	}
	fmt.Printf("switched over: final epoch %v handed to the secondary in %v ms\n", out.FinalEpoch, out.TookMs)
	return nil
}
