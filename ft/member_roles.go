package ft

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/tandemvm/tandem/internal/clock"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

// start waits for the coordinator to catch up, then decides (decide).
// It says what it waits for after a second, then every 5 s.
func (m *Member) start() {
	t0 := m.clk.Now()
	for wait := time.Second; ; wait = 5 * time.Second {
		wctx, cancel := context.WithTimeout(m.ctx, wait)
		err := m.coord.WaitSynced(wctx)
		cancel()
		if err == nil {
			break
		}
		if m.ctx.Err() != nil {
			return
		}
		what := "the cluster's record (a majority of voters must be up)"
		if d, ok := m.coord.(interface{ SyncState() string }); ok {
			what = d.SyncState()
		}
		m.log.Info("waiting for raft before taking a part (primary or secondary)", "waiting_for", what,
			"waited", clock.Since(m.clk, t0).Round(time.Millisecond).String())
	}
	m.decide()
}

// decide, once the coordinator has caught up, says whether this node
// boots the guest (the configured primary of a new cluster) or waits as
// secondary. Only a first start boots: a restarted node's view of raft
// can lag the leader's for a moment (it may still read generation 0), and
// a guest booted then would be a second, empty one.
func (m *Member) decide() {
	st := m.coord.State()
	if m.cfg.Boot != nil && st.Generation == 0 && m.cfg.Fresh {
		g, err := m.cfg.Boot()
		if err != nil {
			m.log.Error("cannot boot the guest", "err", err)
			return
		}
		m.mu.Lock()
		m.boot, m.bootCfg = g, m.cfg.BootConfig
		m.mu.Unlock()
		m.coord.SetImage(failover.Image{Live: true})
		m.log.Info("guest booted; waiting for the coordinator to make this node primary", "kind", g.Kind())
		m.spawn(m.watchBoot)
		return
	}
	if st.Primary == m.coord.ID() {
		// A normal restart of the node that was primary: the first-boot
		// role (tandem primary) no longer matters, and raft moves the
		// guest to the secondary. Not an error.
		m.log.Warn("restarted: the cluster still names this node primary, but its guest stopped with its process; the secondary takes over and this node serves it (tandem primary/secondary only matters on a cluster's first boot)",
			"generation", st.Generation)
	} else if m.cfg.Boot != nil {
		m.log.Info("restarted: serving as secondary (tandem primary/secondary only matters on a cluster's first boot)",
			"primary", st.Primary, "generation", st.Generation)
	}
	m.becomeSecondary("started as secondary")
}

// watchBootInterval is how often watchBoot reads the coordinator's state.
const watchBootInterval = 200 * time.Millisecond

// watchBoot drops the booted (or fenced and kept) guest once another node
// is primary in a newer generation than the guest ran under (this node's
// first view of raft was behind, or raft moved on without it): that
// node's image holds everything released, and this node serves as its
// secondary instead.
func (m *Member) watchBoot() {
	t := m.clk.NewTicker(watchBootInterval)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C():
		}
		st := m.coord.State()
		m.mu.Lock()
		boot, gen := m.boot, m.bootGen
		if boot == nil {
			m.mu.Unlock()
			return // it ran: this node became primary
		}
		if !supersedes(st, m.coord.ID(), gen) {
			m.mu.Unlock()
			continue
		}
		m.boot = nil
		m.mu.Unlock()
		boot.Close()
		m.coord.ClearImage()
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
func (m *Member) becomeSecondary(why string) {
	sec := replica.NewSecondary(m.cfg.Receiver, func() uint64 { return m.coord.State().Generation })
	if m.cfg.DataDir != "" {
		if store, err := replica.OpenStoreWith(filepath.Join(m.cfg.DataDir, "image"), m.log, replica.StoreOptions{FS: m.cfg.FS, BootID: m.cfg.BootID,
			Sync: m.cfg.Receiver.Sync, AcceptUnsynced: m.cfg.Receiver.AcceptUnsynced}); err != nil {
			m.log.Warn("secondary without a stored image", "err", err)
		} else {
			sec.Store = store
		}
	}
	sec.OnCommit = func(epoch uint64) {
		gen, _ := sec.Generation()
		m.mu.Lock()
		current := m.sec == sec // not activated meanwhile
		m.mu.Unlock()
		if current {
			m.coord.SetImage(failover.Image{Generation: gen, Epoch: epoch})
		}
	}
	if c, ok, err := sec.LoadStored(); err != nil {
		m.log.Warn("stored image unusable; waiting for a full sync", "err", err)
	} else if ok {
		gen, _ := sec.Generation()
		m.coord.SetImage(failover.Image{Generation: gen, Epoch: c.Epoch})
		// The coordinator decides whether it may ever be resumed: only if
		// it holds the committed generation and epoch (see
		// failover.IneligibleReason).
		st := m.coord.State()
		m.log.Info("stored image loaded", "epoch", c.Epoch, "generation", gen, "cluster_generation", st.Generation, "cluster_epoch", st.Epoch)
	}
	m.mu.Lock()
	m.sec = sec
	m.mu.Unlock()
	m.n.mu.Lock()
	m.n.role, m.n.sec, m.n.state = "secondary", sec, "standby"
	m.n.mu.Unlock()
	attrs := []any{"why", why}
	if m.cfg.Data != nil {
		// What it waits for: the primary's join (a full sync, unless the
		// stored image is of its stream).
		attrs = append(attrs, "waiting_for", fmt.Sprintf("the primary (%s) to connect to this node's data address %s and sync it", orNone(m.coord.State().Primary), m.cfg.Data.Addr()))
	}
	m.log.Info("secondary", attrs...)
}

func orNone(s string) string {
	if s == "" {
		return "none yet"
	}
	return s
}

// errAlreadyPrimary refuses an activation of a node that runs the guest.
var errAlreadyPrimary = errors.New("this node already runs the guest")

// becomePrimary runs the guest under generation ev.Generation: the booted
// (or fenced and kept) guest, or the committed image of this secondary.
// It returns the epoch the guest resumed from.
func (m *Member) becomePrimary(ev failover.Event) (uint64, error) {
	t0 := m.clk.Now()
	m.gen.Store(ev.Generation)
	g, cfg, first, from, err := m.takeGuest(ev)
	if err != nil {
		if !errors.Is(err, errAlreadyPrimary) {
			m.log.Error("made primary without a guest to run", "err", err)
			m.coord.ClearImage()
		} else {
			m.log.Info("still primary", "generation", ev.Generation)
		}
		return 0, err
	}
	loop := m.startLoop(g, cfg, first)
	if _, err := g.Resume(); err != nil {
		m.log.Error("resume the guest", "err", err)
		return first, fmt.Errorf("resume: %w", err)
	}
	m.n.SetState("running")
	m.n.net.announce(guest.NICOf(g))
	if sec, ok := m.coord.Secondary(); ok && sec.DataAddr != "" {
		loop.SetSecondary(sec.DataAddr)
	}
	m.log.Info("PRIMARY: guest running", "generation", ev.Generation, "from", from, "took", clock.Since(m.clk, t0).String())
	return first, nil
}

// takeGuest takes the guest becomePrimary runs, and the last epoch number
// used before (the new loop numbers its epochs after it: a fence reports
// the kept guest at least there, which is at least what was committed).
func (m *Member) takeGuest(ev failover.Event) (g guest.Guest, cfg guest.Config, first uint64, from string, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.loop != nil {
		// The same node won a new term: carry on under the new generation.
		return nil, cfg, 0, "", errAlreadyPrimary
	}
	first = max(ev.Epoch, m.lastEpoch)
	switch {
	case m.boot != nil:
		from = "booted guest"
		if m.bootGen != 0 {
			from = fmt.Sprintf("its own guest of generation %d, kept paused since its fence (epoch %d)", m.bootGen, m.lastEpoch)
		}
		g, cfg, m.boot, m.bootGen = m.boot, m.bootCfg, nil, 0
	case m.sec != nil:
		sec := m.sec
		m.mu.Unlock()
		ag, h, c, aerr := sec.Activate()
		m.mu.Lock()
		if aerr != nil {
			return nil, cfg, 0, "", fmt.Errorf("cannot activate the committed image: %w", aerr)
		}
		g, cfg, first = ag, h.Config, max(first, c.Epoch)
		m.sec = nil
		if m.cfg.KeepActivated {
			m.activated = sec
		}
		from = fmt.Sprintf("committed epoch %d", c.Epoch)
	default:
		return nil, cfg, 0, "", errors.New("no guest to run")
	}
	m.lastEpoch = first
	return g, cfg, first, from, nil
}

// startLoop protects g with an epoch loop whose every release the
// coordinator permits (generation and lease, with raft).
func (m *Member) startLoop(g guest.Guest, cfg guest.Config, firstEpoch uint64) *failover.EpochLoop {
	ef := m.cfg.Epochs
	var loop *failover.EpochLoop
	loop = failover.NewEpochLoop(failover.EpochConfig{
		Guest: g, Config: cfg, Interval: ef.Interval, FlushBudget: ef.FlushBudget, MaxInFlight: ef.MaxInFlight,
		Verify: ef.Verify, VerifySlicePages: ef.VerifySlicePages, Build: version.Build(), Generation: m.gen.Load,
		Timings: m.n.api.timings, Log: m.log, Clock: m.cfg.Clock,
		Release: m.n.console.release, ReleaseFrame: m.n.net.send, ObserveOutput: m.n.outMetrics.observer(),
		Allow: func() bool { return m.coord.CanRelease(m.gen.Load()) },
		TLS:   m.n.trust.ID, Insecure: m.n.trust.Insecure,
		FirstEpoch: firstEpoch, AckTimeout: ef.AckTimeout,
		Trigger: ef.Trigger, MaxOutputDelay: ef.MaxOutputDelay, MaxPauseFraction: ef.MaxPauseFraction,
		Throttle:      failover.ThrottlePolicy{Off: ef.NoThrottle},
		SecondaryName: m.coord.SecondaryName,
		OnFenced:      m.loopFenced,
		OnCommitted: func(epoch uint64) {
			m.coord.DataHeartbeat()
			m.coord.ReportEpoch(epoch)
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
	m.n.net.attach(guest.NICOf(g))
	go func() { // owned by the member: loopCancel stops it, waitLoop joins it
		defer close(done)
		loop.Run(ctx)
	}()
	return loop
}

// loopFenced is told by the epoch loop that it fenced itself: its
// secondary says it was activated and runs the guest. The loop has
// stopped releasing and paused the guest; the node says so and turns its
// console clients away. With raft, raft's own fence follows (another node
// is primary in a newer generation); a pair has no other fence, and the
// guest stays paused for good.
func (m *Member) loopFenced(why string) {
	m.countFence()
	m.n.setStateWhy("fenced", why)
	m.n.console.dropAll()
	m.log.Error("FENCED: the secondary says it runs the guest; the guest is paused and nothing it says leaves this node", "why", why)
}

// countFence counts a fence once per generation (the loop's own fence
// and the coordinator's that follows are one event).
func (m *Member) countFence() {
	if gen := m.gen.Load(); m.n.fencedGen.Swap(gen) != gen {
		m.n.fences.Add(1)
	}
}

// takeLoop detaches the epoch loop, its cancel and its done channel
// (nil if no loop runs), for the caller to stop.
func (m *Member) takeLoop() (*failover.EpochLoop, context.CancelFunc, chan struct{}) {
	m.mu.Lock()
	defer m.mu.Unlock()
	loop, cancel, done := m.loop, m.loopCancel, m.loopDone
	m.loop, m.loopCancel, m.loopDone = nil, nil, nil
	return loop, cancel, done
}

// fence stops this node's guest at once: nothing more leaves it. The
// guest is kept, paused, as long as no other node is primary in a newer
// generation: it may be the newest copy there is (the cluster lost its
// majority, or its secondary), and it is resumed if raft makes this node
// primary again. Only once another node is primary is it dropped (here or
// by watchBoot), and the node becomes that primary's secondary. A stored
// image is never loaded while the guest is kept: it can only be older.
func (m *Member) fence(reason string) {
	loop, cancel, done := m.takeLoop()
	if loop == nil {
		return
	}
	m.countFence()
	gen := m.gen.Load()
	loop.Gate().Discard()
	cancel()
	m.n.lockIdle()
	g, cfg := m.n.g, m.n.cfg
	m.n.g, m.n.epochs, m.n.state, m.n.stateReason = nil, nil, "fenced", reason
	m.n.net.attach(nil)
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
		m.coord.ClearImage()
		m.log.Warn("FENCED: guest stopped, no output released from here", "reason", reason)
		m.becomeSecondary("fenced: " + reason)
		return
	}
	ctx, c := context.WithTimeout(context.Background(), time.Second)
	g.Pause(ctx)
	c()
	if st := m.coord.State(); supersedes(st, m.coord.ID(), gen) {
		g.Close()
		m.coord.ClearImage()
		m.log.Warn("FENCED: guest stopped, no output released from here", "reason", reason,
			"primary", st.Primary, "generation", st.Generation)
		m.becomeSecondary("fenced: " + reason)
		return
	}
	m.mu.Lock()
	m.boot, m.bootCfg, m.bootGen = g, cfg, gen
	m.mu.Unlock()
	m.coord.SetImage(failover.Image{Generation: gen, Epoch: epoch, Live: true})
	m.log.Warn("FENCED: guest paused and kept, no output released from here; it is resumed if the coordinator makes this node primary again, dropped once another node is",
		"reason", reason, "generation", gen, "epoch", epoch)
	m.spawn(m.watchBoot)
}
