package failover

import (
	"context"
	"errors"
	"fmt"
	"github.com/tandemvm/tandem/internal/clock"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/timing"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// EpochConfig configures a primary's epoch loop.
type EpochConfig struct {
	Guest  guest.Guest
	Config guest.Config
	// Interval is the epoch length; 0 means 25 ms.
	Interval time.Duration
	// FlushBudget bounds the disk flush at each pause; 0 means 5 ms. A
	// flush that misses it aborts that epoch's capture (the guest resumes
	// at once) and the next epoch tries again.
	FlushBudget time.Duration
	// MaxInFlight bounds epochs shipped but not yet acknowledged; 0 means
	// 4. See the back-pressure policy in the package doc.
	MaxInFlight int
	// Verify proves the replica matches, every epoch: the primary keeps a
	// digest of what it shipped (every page, as sent) and compares it,
	// with the machine state, against the secondary's digest of its
	// committed image; and at every pause it re-reads a rotating slice of
	// memory (VerifySlicePages) and checks it against what was shipped,
	// which catches a write the dirty log missed. A mismatch ends
	// protection at once and re-syncs the secondary from scratch (see
	// the package doc).
	Verify bool
	// VerifySlicePages is how many pages each pause re-reads; every page
	// is checked once every (guest pages / VerifySlicePages) epochs. 0
	// means DefaultVerifySlicePages.
	VerifySlicePages int
	Build            string
	// Generation, if set, gives the generation this primary runs under
	// now; each join's handshake carries it, so a primary that raft kept
	// in a new term is not refused as stale by its secondary.
	Generation func() uint64
	Stream     checkpoint.Options
	Timings    *timing.Recorder
	Log        *slog.Logger
	// Release receives output once it may leave (the console bridge).
	Release func([]byte)
	// Allow is the fencing check run before any output leaves; nil
	// means always.
	Allow func() bool
	// OnCommitted is told of every acknowledged epoch (raft records the
	// last committed epoch from here).
	OnCommitted func(epoch uint64)
	// OnProtected is told when protection starts or stops.
	OnProtected func(protected bool, why string)
	// Unprotect, if set, must succeed before output that was held for a
	// lost secondary is let out: with raft it records "unprotected" in
	// the cluster first, so the secondary can no longer take over from an
	// epoch older than output already released. While it fails the output
	// stays held.
	Unprotect func(ctx context.Context) error
	// TLS, if set, makes every connection to a secondary mutual TLS with
	// this identity (nil: plaintext).
	TLS *trust.Identity
	// SecondaryName, with TLS, gives the node the secondary at a data
	// address must be: its certificate has to name it. nil, or "": any
	// certificate of the cluster's CA.
	SecondaryName func(addr string) string
	// FirstEpoch is the last epoch number already used in this cluster;
	// the loop numbers its epochs after it, across reconnections, so
	// epoch numbers only ever grow (raft compares them).
	FirstEpoch uint64
	// AckTimeout bounds the wait for acknowledgement progress: while an
	// epoch (catch-up or protected) is sent and not acknowledged, some
	// acknowledgement must arrive within it, or the link is dropped and
	// the secondary retried with back-off (a secondary that accepts and
	// never answers must not keep the primary joining, or its output
	// held, for ever). 0 means DefaultAckTimeout.
	AckTimeout time.Duration
	// Clock drives the loop's timing: the epoch ticker, the back-off
	// between joins, the acknowledgement deadlines, the output gate's
	// delays, the pause stamps acknowledgement latency is measured from,
	// and the status's rates. nil means clock.Real.
	Clock clock.Clock
	// OnFenced, if set, is told once when the loop fences itself: the
	// secondary said it was activated and runs the guest (see Fence).
	OnFenced func(why string)
}

// DefaultAckTimeout is EpochConfig.AckTimeout's default.
const DefaultAckTimeout = 10 * time.Second

// EpochLoop is a primary's protection: it runs the guest's epochs, ships
// them to the secondary, and releases output as the secondary
// acknowledges. Without a secondary the guest runs unprotected and its
// output passes straight through. One goroutine calls Run; the other
// methods may be called from anywhere.
type EpochLoop struct {
	cfg  EpochConfig
	core *precopy.Core
	gate *OutputGate
	log  *slog.Logger
	clk  clock.Clock // cfg.Clock, never nil

	wake   chan struct{} // SetSecondary changed want
	relink chan string   // Relink's requests to drop the current link (why)
	// fencedCh is closed when the loop fences itself; fencedFlag is the
	// same, read by the output gate's fencing check on every release.
	fencedCh   chan struct{}
	fencedFlag atomic.Bool

	// mu guards the figures and state below.
	mu sync.Mutex
	// want is the secondary SetSecondary asked for, wantSeq counts the
	// requests; secondary is the one the current (or last) link went to,
	// and linkCancel ends that link (nil between links).
	want         string
	wantSeq      uint64
	linkCancel   context.CancelFunc
	linkAcked    uint64    // highest epoch the current link acknowledged
	linkAckAt    time.Time // when it last moved (or the link started)
	fenced       bool
	secondary    string
	state        string // unprotected, joining, protected
	why          string
	committed    uint64
	lastCommitAt time.Time
	shipped      uint64 // last stream epoch shipped
	gateEpochOf  map[uint64]flight
	pauses       []time.Duration // recent pauses, bounded
	ackLatency   []time.Duration // recent, bounded
	epochs       uint64          // consistent epochs captured
	acked        uint64          // consistent epochs acknowledged
	rawBytes     uint64          // page bytes captured, all epochs
	wireBytes    uint64          // stream bytes of consistent epochs
	flushAborts  uint64
	mismatches   uint64
	verified     uint64
	lastMismatch string
	// diverged: this link's replica failed verification; nothing it
	// acknowledges counts until a fresh join (re-sync from scratch).
	diverged           bool
	mismatchEpoch      uint64
	mismatchAt         time.Time
	mismatchResolution string
	startedEpochs      time.Time
	linkEpochs         uint64 // consistent epochs captured on the current link
	stalls             uint64 // captures delayed by back-pressure
	joins              uint64
	lastEpoch          uint64              // last stream epoch number used, across joins
	unshipped          int                 // captured epochs handed to the shipper, not yet registered
	sender             *precopy.LiveSender // the current link's sender (its Epoch is atomic)

	// vcursor is where the next verifying pause's slice starts, as a
	// position in the guest's pages taken region after region (capture
	// goroutine only); guestPages is the guest's page count (fixed).
	vcursor    uint64
	guestPages uint64

	final chan finalRequest // FinalEpoch's requests to the capture loop
}

// finalRequest asks the capture loop for a last epoch with the guest left
// paused (planned switchover).
type finalRequest struct {
	ctx  context.Context
	done chan error // unbuffered: a reply is taken or the requester is gone
}

// reply answers the request unless its requester has given up; it says
// whether the answer was taken.
func (r *finalRequest) reply(err error) bool {
	select {
	case r.done <- err:
		return true
	case <-r.ctx.Done():
		return false
	}
}

// flight is what the primary remembers of a shipped consistent epoch
// until the secondary acknowledges it.
type flight struct {
	gateEpoch uint64
	digest    string
	pausedAt  time.Time
}

// Protection states.
const (
	StateUnprotected = "unprotected"
	StateJoining     = "joining"
	StateProtected   = "protected"
	// StateFenced: the secondary was activated and runs the guest; this
	// loop released nothing since it heard so, and its guest is paused.
	StateFenced = "fenced"
)

const recentSamples = 2048

// DefaultVerifySlicePages is the slice of memory a verifying pause
// re-reads: 2 MiB. On memory without zero pages (the worst case:
// BenchmarkVerifySlice) it costs about 0.45 ms a pause on this project's
// machines, 1.25x a plain copy of the same bytes; zero pages are skipped
// at memory speed. It covers a 1 GiB guest every 512 epochs (12.8 s at
// 40 epochs/s).
const DefaultVerifySlicePages = 512

// NewEpochLoop prepares protection for a guest (not yet resumed or
// already running) and routes its console output through the output
// gate. The guest starts unprotected.
func NewEpochLoop(cfg EpochConfig) *EpochLoop {
	if cfg.Interval <= 0 {
		cfg.Interval = 25 * time.Millisecond
	}
	if cfg.FlushBudget <= 0 {
		cfg.FlushBudget = 5 * time.Millisecond
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 4
	}
	if cfg.VerifySlicePages <= 0 {
		cfg.VerifySlicePages = DefaultVerifySlicePages
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = DefaultAckTimeout
	}
	cfg.Clock = clock.Or(cfg.Clock)
	core := precopy.NewCore(cfg.Guest, cfg.Timings)
	core.Clock = cfg.Clock
	l := &EpochLoop{
		cfg: cfg, core: core, log: cfg.Log, clk: cfg.Clock,
		wake: make(chan struct{}, 1), relink: make(chan string, 1), state: StateUnprotected, why: "no secondary yet",
		gateEpochOf: map[uint64]flight{}, lastEpoch: cfg.FirstEpoch,
		final: make(chan finalRequest), fencedCh: make(chan struct{}),
	}
	allow := cfg.Allow
	l.gate = newOutputGate(1, cfg.Release, func() bool {
		return !l.fencedFlag.Load() && (allow == nil || allow())
	}, cfg.Clock)
	for _, r := range cfg.Guest.Regions() {
		l.guestPages += r.Pages()
	}
	l.gate.Hold(false)
	cfg.Guest.Console().SetOutput(l.gate.Write)
	return l
}

// Gate is the loop's output gate (fencing discards through it).
func (l *EpochLoop) Gate() *OutputGate { return l.gate }

// SetSecondary points protection at a secondary's data address; "" drops
// protection. The loop connects, syncs and starts epochs on its own, and
// reconnects after failures. A new address takes effect at once: a link
// to another secondary (protected, or still joining) is dropped and the
// new one joined; the same address again leaves a working link alone.
func (l *EpochLoop) SetSecondary(addr string) {
	l.mu.Lock()
	l.want = addr
	l.wantSeq++
	var cancel context.CancelFunc
	if l.linkCancel != nil && l.secondary != addr {
		cancel = l.linkCancel
	}
	l.mu.Unlock()
	if cancel != nil {
		l.log.Info("secondary changed: dropping the current link", "new", addr)
		cancel()
	}
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// Fenced reports whether the loop fenced itself, and why.
func (l *EpochLoop) Fenced() (bool, string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fenced, l.why
}

// fence is the secondary saying it was activated and runs the guest: from
// now on nothing leaves through the gate (held output is dropped, the
// fencing check refuses every release), the link ends, and Run pauses the
// guest and keeps it paused. There is no way back but a restart: the
// other node's guest is the one that runs.
func (l *EpochLoop) fence(why string) {
	l.fencedFlag.Store(true)
	l.gate.Discard()
	l.mu.Lock()
	if l.fenced {
		l.mu.Unlock()
		return
	}
	l.fenced = true
	old := l.state
	l.state, l.why = StateFenced, why
	cancel := l.linkCancel
	l.mu.Unlock()
	close(l.fencedCh)
	l.log.Error("FENCED: the secondary runs the guest now; no output leaves here and the guest is paused", "why", why)
	if cancel != nil {
		cancel()
	}
	if old == StateProtected && l.cfg.OnProtected != nil {
		l.cfg.OnProtected(false, why)
	}
}

// parkFenced pauses the guest of a fenced loop and waits for the end.
func (l *EpochLoop) parkFenced(ctx context.Context) {
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	if _, err := l.cfg.Guest.Pause(pctx); err != nil {
		l.log.Error("fenced: cannot pause the guest (nothing it says leaves)", "err", err)
	}
	cancel()
	_, why := l.Fenced()
	if l.cfg.OnFenced != nil {
		l.cfg.OnFenced(why)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case req := <-l.final:
			req.reply(errors.New("fenced: " + why))
		case <-l.wake:
		}
	}
}

// Relink drops a protected link and joins the secondary afresh, if the
// loop is protected now (otherwise it is already joining or without a
// secondary, and the join records protection when it completes). The
// cluster calls it when it has recorded "unprotected" behind the loop's
// back (no acknowledgement for the data timeout over a link that is
// silent, not broken): the held output must then go out, and protection
// may only be claimed again from an epoch whose pause follows that
// release, which a fresh join guarantees.
func (l *EpochLoop) Relink(why string) {
	l.mu.Lock()
	protected := l.state == StateProtected
	l.mu.Unlock()
	if !protected {
		return
	}
	select {
	case l.relink <- why:
	default: // one request pending is enough
	}
}

// Run runs epochs until ctx ends. It never leaves the guest paused,
// except fenced (the secondary was activated: see fence), when it pauses
// the guest and keeps it paused until ctx ends.
func (l *EpochLoop) Run(ctx context.Context) error {
	retry := time.Duration(0)
	for {
		if l.fencedFlag.Load() {
			l.parkFenced(ctx)
			return nil
		}
		l.mu.Lock()
		addr, seq := l.want, l.wantSeq
		l.mu.Unlock()
		if addr == "" {
			l.setState(StateUnprotected, "no secondary configured")
			select {
			case <-ctx.Done():
				return nil
			case <-l.wake:
			case req := <-l.final:
				req.reply(errors.New("not protected: no secondary to hand over to"))
			}
			continue
		}
		err := l.protect(ctx, addr)
		if ctx.Err() != nil {
			return nil
		}
		if l.fencedFlag.Load() {
			continue
		}
		changed := func() bool {
			l.mu.Lock()
			defer l.mu.Unlock()
			return l.wantSeq != seq
		}
		if changed() {
			retry = 0
			continue
		}
		// Lost the secondary: run unprotected, retry with back-off. A
		// link that got as far as protection starts the back-off afresh,
		// or a flapping link would leave every later rejoin 5 s late.
		l.mu.Lock()
		wasProtected := l.state == StateProtected
		l.mu.Unlock()
		if wasProtected {
			retry = 0
		}
		l.setState(StateUnprotected, err.Error())
		retry = min(max(2*retry, 200*time.Millisecond), 5*time.Second)
		ok, reset := l.backOff(ctx, retry, changed)
		if !ok {
			return nil
		}
		if reset {
			retry = 0
		}
	}
}

// backOff waits retry before the next join, releasing held output every
// 200 ms meanwhile (see releaseHeld) and refusing final-epoch requests.
// ok is false when ctx ended; reset is true when SetSecondary asked for
// another secondary (the back-off then starts afresh).
func (l *EpochLoop) backOff(ctx context.Context, retry time.Duration, changed func() bool) (ok, reset bool) {
	wait := l.clk.NewTimer(retry)
	defer wait.Stop()
	release := l.clk.NewTicker(200 * time.Millisecond)
	defer release.Stop()
	for {
		select {
		case <-ctx.Done():
			return false, false
		case <-l.wake:
			if changed() {
				return true, true
			}
		case <-wait.C():
			return true, false
		case <-release.C():
			l.releaseHeld()
		case req := <-l.final:
			req.reply(errors.New("not protected: no secondary to hand over to"))
		}
	}
}

func (l *EpochLoop) setState(s, why string) {
	l.mu.Lock()
	if l.fenced {
		l.mu.Unlock()
		return
	}
	old := l.state
	l.state, l.why = s, why
	l.mu.Unlock()
	if s != StateProtected {
		l.releaseHeld()
	}
	if old != s {
		if s == StateProtected {
			l.log.Info("protected", "secondary", l.secondaryAddr())
		} else {
			l.log.Warn("not protected", "state", s, "why", why)
		}
		if l.cfg.OnProtected != nil && (old == StateProtected) != (s == StateProtected) {
			l.cfg.OnProtected(s == StateProtected, why)
		}
	}
}

// releaseHeld lets held output out once nothing will acknowledge it:
// after Unprotect succeeded (fencing still applies in the gate), later
// output passes straight through. If Unprotect fails, output stays held
// and Run retries.
func (l *EpochLoop) releaseHeld() bool {
	if !l.gate.Holding() {
		return true
	}
	if l.cfg.Unprotect != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := l.cfg.Unprotect(ctx)
		cancel()
		if err != nil {
			l.log.Warn("holding output: cannot record the loss of protection", "err", err)
			return false
		}
	}
	l.gate.Hold(false)
	return true
}

func (l *EpochLoop) secondaryAddr() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.secondary
}

// protect connects to addr, brings it up to date and runs epochs until
// the link fails, ctx ends or the target changes.
func (l *EpochLoop) protect(ctx context.Context, addr string) error {
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	l.mu.Lock()
	if l.want != addr || l.fenced {
		l.mu.Unlock()
		return errors.New("the secondary changed before the join")
	}
	l.linkCancel = cancel
	defer func() {
		l.mu.Lock()
		l.linkCancel = nil
		l.mu.Unlock()
	}()
	l.secondary = addr
	l.joins++
	// Flights of a previous link will never be acknowledged (a new link
	// numbers its epochs afresh, and their output went out when
	// protection was lost): left here they would fill the in-flight
	// window and stall every epoch of the new link.
	clear(l.gateEpochOf)
	l.diverged = false
	l.mu.Unlock()
	select {
	case <-l.relink: // meant for a link that is gone
	default:
	}
	l.setState(StateJoining, "connecting to "+addr)

	hello := replica.Hello{Purpose: replica.PurposeReplicate, Kind: l.cfg.Guest.Kind(), Config: l.cfg.Config,
		Build: l.cfg.Build, Verify: l.cfg.Verify}
	if l.cfg.Generation != nil {
		hello.Generation = l.cfg.Generation()
	}
	var expect string
	if l.cfg.TLS != nil && l.cfg.SecondaryName != nil {
		expect = l.cfg.SecondaryName(addr)
	}
	dctx, dcancel := context.WithTimeout(lctx, 5*time.Second)
	link, err := replica.Dial(dctx, addr, hello, l.cfg.Guest.Regions(), replica.DialOptions{
		Stream: l.cfg.Stream, Timeout: 10 * time.Second, OnAck: l.onAck, TLS: l.cfg.TLS, Expect: expect,
	})
	dcancel()
	if err != nil {
		if errors.Is(err, replica.ErrPeerActivated) {
			l.fence(fmt.Sprintf("the secondary %s was activated and runs the guest (it refused this primary's join)", addr))
		}
		return err
	}
	defer link.Close()

	// Catch up while the guest runs: everything once, then what was
	// dirtied, until what is left fits an epoch or rounds stop helping.
	sender := &precopy.LiveSender{Core: l.core, Link: link, EpochPages: 4096}
	// shipped is the digest of what the secondary holds once it has
	// committed everything sent: the receiver's memory starts zero, and
	// every page sent (catch-up and epochs) is recorded as it went.
	var shipped *guest.MemHash
	if l.cfg.Verify {
		shipped = guest.NewMemHash()
		sender.OnSent = func(pages []checkpoint.Page) {
			for _, p := range pages {
				shipped.Update(p.Index, p.Data)
			}
		}
	}
	l.mu.Lock()
	sender.SetEpoch(l.lastEpoch)
	l.sender = sender
	l.linkAcked, l.linkAckAt = l.lastEpoch, l.clk.Now()
	l.mu.Unlock()
	var wd sync.WaitGroup
	wd.Add(1)
	go func() {
		defer wd.Done()
		l.watchAcks(lctx, addr, link, sender)
	}()
	defer func() {
		cancel()
		wd.Wait()
	}()
	defer func() {
		l.mu.Lock()
		l.lastEpoch = max(l.lastEpoch, sender.Epoch())
		l.mu.Unlock()
	}()
	if _, err := l.core.Sync(); err != nil {
		return err
	}
	l.core.Dirty.Clear()
	if _, err := sender.SendAll(lctx); err != nil {
		return fmt.Errorf("sync to %s: %w", addr, err)
	}
	for round := 1; round <= 30; round++ {
		if _, err := l.core.Sync(); err != nil {
			return err
		}
		if l.core.Dirty.Count() <= 2048 {
			break
		}
		if _, err := sender.SendDirty(lctx); err != nil {
			return fmt.Errorf("sync to %s: %w", addr, err)
		}
		if err := link.Err(); err != nil {
			return err
		}
	}
	// The catch-up counts only once the secondary has it: until then
	// output is not held (no epoch has sealed any), so a secondary that
	// never answers costs the guest nothing while the ack deadline runs.
	if err := sender.Drain(lctx); err != nil {
		return fmt.Errorf("sync to %s: %w", addr, err)
	}
	return l.runEpochs(ctx, lctx, link, sender, shipped)
}

// watchAcks drops the link when acknowledgements stop moving while
// something is outstanding for AckTimeout: a secondary that accepted the
// stream and never answers (or stopped answering) is retried afresh,
// with back-off, instead of keeping this primary joining, or its output
// held, for ever.
func (l *EpochLoop) watchAcks(ctx context.Context, addr string, link *replica.Link, sender *precopy.LiveSender) {
	limit := l.cfg.AckTimeout
	tick := l.clk.NewTicker(min(limit/10, 500*time.Millisecond))
	defer tick.Stop()
	idleAt := l.clk.Now() // when nothing was outstanding, last seen
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C():
		}
		now := l.clk.Now()
		l.mu.Lock()
		acked, at := l.linkAcked, l.linkAckAt
		l.mu.Unlock()
		sent := sender.Epoch()
		if sent <= acked {
			idleAt = now
			continue
		}
		if at.Before(idleAt) {
			at = idleAt
		}
		if now.Sub(at) > limit {
			err := fmt.Errorf("no acknowledgement from the secondary at %s for %v (epoch %d sent, %d acknowledged): link dropped, retrying",
				addr, limit.Round(time.Millisecond), sent, acked)
			l.log.Warn("secondary silent", "err", err)
			link.Fail(err)
			return
		}
	}
}

// job is one captured epoch on its way to the shipper.
type job struct {
	cp        *precopy.Capture
	gateEpoch uint64
	digest    string
}

// runEpochs captures an epoch every interval and ships it on another
// goroutine (pipelined), with bounded buffers: see the package doc.
func (l *EpochLoop) runEpochs(parent, ctx context.Context, link *replica.Link, sender *precopy.LiveSender, shipped *guest.MemHash) error {
	ship := make(chan job, 1)
	// Each slot owns its buffer: a capture copies its pages into the slot
	// it took, and the slot comes back only once the shipper is done with
	// those pages. The seeds are empty but not nil: a nil Buffer makes
	// Capture use the Core's one shared buffer, so every slot would alias
	// it and a capture taken while the shipper still encodes the previous
	// epoch would overwrite that epoch's pages under it (the secondary
	// then committed other pages' contents: a silent divergence, or a
	// checksum error and a reconnect when the overwrite raced the encoder).
	free := make(chan []byte, 3)
	for i := 0; i < cap(free); i++ {
		free <- make([]byte, 0)
	}
	shipErr := make(chan error, 1)
	var shipWG sync.WaitGroup
	shipWG.Add(1)
	go func() {
		defer shipWG.Done()
		shipErr <- l.shipper(ctx, link, sender, ship, free)
	}()
	defer func() {
		close(ship)
		shipWG.Wait()
	}()

	var slice verifySlice
	first := true
	tick := l.clk.NewTicker(l.cfg.Interval)
	defer tick.Stop()
	l.mu.Lock()
	l.startedEpochs = l.clk.Now()
	l.linkEpochs = 0
	l.unshipped = 0
	l.mu.Unlock()
	for {
		var final *finalRequest
		// answer tells a waiting FinalEpoch how its request ended, once,
		// and passes err on: every return below goes through it.
		answer := func(err error) error {
			if final != nil {
				final.reply(err)
				final = nil
			}
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-shipErr:
			return err
		case why := <-l.relink:
			return errors.New(why)
		case <-tick.C():
		case req := <-l.final:
			if first {
				req.reply(errors.New("not protected yet: the secondary is still catching up"))
				continue
			}
			final = &req
		}
		if err := link.Err(); err != nil {
			return answer(err)
		}
		// Back-pressure: a slow secondary makes epochs longer, never
		// memory larger.
		var buf []byte
		waited := false
		for got := false; !got; {
			if l.inFlight() < l.cfg.MaxInFlight {
				select {
				case buf = <-free: // a slot; its buffer may still be nil
					got = true
					continue
				default:
				}
			}
			waited = true
			poll := l.clk.NewTimer(time.Millisecond)
			select {
			case <-ctx.Done():
				poll.Stop()
				return answer(ctx.Err())
			case err := <-shipErr:
				poll.Stop()
				return answer(err)
			case why := <-l.relink:
				poll.Stop()
				return answer(errors.New(why))
			case <-poll.C():
			}
			if err := link.Err(); err != nil {
				return answer(err)
			}
		}
		if waited {
			l.mu.Lock()
			l.stalls++
			l.mu.Unlock()
		}
		var j job
		flushBudget := l.cfg.FlushBudget
		if final != nil {
			// A handover must carry every disk write: wait for the
			// flush (bounded), the guest paused as for a migration's
			// completion.
			flushBudget = 10 * time.Second
		}
		cp, err := l.core.Capture(ctx, precopy.CaptureOptions{
			FlushBudget: flushBudget,
			KeepPaused:  final != nil,
			Buffer:      buf,
			WhilePaused: func(cp *precopy.Capture) error {
				if first {
					// From this pause on, output waits for its epoch.
					l.gate.Hold(true)
				}
				j.gateEpoch = l.gate.Seal()
				if shipped != nil {
					// Only the slice is read at the pause; the captured
					// pages are copies and are hashed after the resume.
					l.readSlice(&slice)
				}
				return nil
			},
		})
		if err != nil {
			free <- buf
			answer(err)
			if errors.Is(err, precopy.ErrFlushAborted) {
				l.mu.Lock()
				l.flushAborts++
				l.mu.Unlock()
				l.log.Warn("epoch capture aborted: flush missed its budget; guest resumed", "budget", l.cfg.FlushBudget)
				continue
			}
			return err
		}
		first = false
		j.cp = cp
		if shipped != nil {
			j.digest = l.verifyCapture(shipped, cp, &slice)
		}
		l.mu.Lock()
		l.epochs++
		l.linkEpochs++
		l.unshipped++
		l.rawBytes += uint64(len(cp.Pages)) * guest.PageSize
		l.pauses = appendBounded(l.pauses, cp.Breakdown.Total())
		l.mu.Unlock()
		select {
		case ship <- j:
		case err := <-shipErr:
			if final != nil {
				// The final capture left the guest paused and the
				// switchover waits for an answer: the link failed before
				// the epoch went out, so the guest runs on here (without
				// this it stayed paused while the loop retried).
				l.cfg.Guest.Resume()
			}
			return answer(err)
		case <-ctx.Done():
			if final != nil && parent.Err() == nil && !l.fencedFlag.Load() {
				// The link was dropped (a new secondary, no acks) with
				// the final capture's guest paused: it runs on here.
				l.cfg.Guest.Resume()
			}
			return answer(ctx.Err())
		}
		if final != nil {
			// Wait until the secondary holds everything, output
			// included, then stop capturing: the guest stays paused for
			// the new primary to take over from this epoch.
			err := l.waitAcked(ctx, link, shipErr, 10*time.Second)
			if err == nil {
				// The handover goes ahead only if its requester is still
				// there to take it: one that gave up would leave the
				// guest paused here with nobody to move raft on.
				if !final.reply(nil) {
					err = fmt.Errorf("the switchover's requester gave up: %w", context.Cause(final.ctx))
					l.log.Warn("final epoch acknowledged but nobody took the handover; the guest runs on here", "err", err)
				}
				final = nil
			}
			if err != nil {
				if !l.fencedFlag.Load() {
					l.cfg.Guest.Resume()
				}
				if answer(err); ctx.Err() != nil || link.Err() != nil {
					return err
				}
				continue
			}
			// Parked for the handover: only the loop's end (the node
			// fenced or stopped) moves it on, not a change of the
			// secondary, since the guest must stay paused for the new
			// primary.
			<-parent.Done()
			return parent.Err()
		}
	}
}

func appendBounded(s []time.Duration, d time.Duration) []time.Duration {
	if len(s) >= recentSamples {
		copy(s, s[1:])
		s = s[:recentSamples-1]
	}
	return append(s, d)
}

// waitAcked waits until no shipped epoch waits for its acknowledgement.
func (l *EpochLoop) waitAcked(ctx context.Context, link *replica.Link, shipErr <-chan error, limit time.Duration) error {
	deadline := l.clk.Now().Add(limit)
	for {
		l.mu.Lock()
		idle := len(l.gateEpochOf) == 0 && l.unshipped == 0
		l.mu.Unlock()
		if idle {
			return nil
		}
		if l.clk.Now().After(deadline) {
			return fmt.Errorf("the secondary did not acknowledge the final epoch within %v", limit)
		}
		if err := link.Err(); err != nil {
			return err
		}
		poll := l.clk.NewTimer(time.Millisecond)
		select {
		case <-ctx.Done():
			poll.Stop()
			return ctx.Err()
		case err := <-shipErr:
			poll.Stop()
			return err
		case <-poll.C():
		}
	}
}

// FinalEpoch (planned switchover) captures one last epoch with the guest
// left paused, ships it and waits until the secondary has acknowledged it
// and its output is released. Afterwards the loop captures nothing more
// until it is stopped; on error the guest runs on and the loop with it.
//
// The request is tied to ctx: if ctx ends before the answer is taken, the
// loop resumes the guest and carries on (it never leaves the guest paused
// for a caller that has gone).
func (l *EpochLoop) FinalEpoch(ctx context.Context) error {
	req := finalRequest{ctx: ctx, done: make(chan error)}
	select {
	case l.final <- req:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (l *EpochLoop) inFlight() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.gateEpochOf)
}

// testHookShip, if set (tests only), runs in the shipper before it encodes
// each captured epoch, so a test can make shipping slower than capturing
// or damage an epoch after its digest was taken.
var testHookShip func(gateEpoch uint64, cp *precopy.Capture)

// shipper encodes and sends captured epochs in order.
func (l *EpochLoop) shipper(ctx context.Context, link *replica.Link, sender *precopy.LiveSender, ship <-chan job, free chan<- []byte) error {
	w := link.Writer()
	for j := range ship {
		cp := j.cp
		if testHookShip != nil {
			testHookShip(j.gateEpoch, cp)
		}
		t0 := time.Now()
		wire0 := link.BytesSent()
		err := w.WritePages(cp.Pages)
		if err == nil && len(cp.Disk) > 0 {
			err = w.WriteDisk(cp.Disk)
		}
		if err == nil {
			err = w.WriteDevices(cp.State)
		}
		// Register the flight before the epoch can be acknowledged.
		epoch := sender.Epoch() + 1
		l.mu.Lock()
		l.gateEpochOf[epoch] = flight{gateEpoch: j.gateEpoch, digest: j.digest, pausedAt: cp.PausedAt}
		l.unshipped--
		l.mu.Unlock()
		if err == nil {
			_, err = sender.EndEpoch()
		}
		free <- cp.Buffer
		if l.cfg.Timings != nil {
			l.cfg.Timings.Observe("epoch_ship", t0, time.Since(t0))
		}
		if err != nil {
			return fmt.Errorf("ship epoch %d: %w", epoch, err)
		}
		l.mu.Lock()
		l.shipped = epoch
		l.wireBytes += link.BytesSent() - wire0
		l.mu.Unlock()
	}
	return nil
}

// onAck runs on the link's reader for every acknowledgement.
func (l *EpochLoop) onAck(a precopy.Ack) {
	now := l.clk.Now()
	if a.Activated {
		l.fence("the secondary " + l.secondaryAddr() + " was activated and runs the guest")
		return
	}
	l.mu.Lock()
	if a.Epoch > l.linkAcked {
		l.linkAcked, l.linkAckAt = a.Epoch, now
	}
	if a.Error != "" {
		l.mu.Unlock()
		l.log.Error("secondary reported an error", "epoch", a.Epoch, "err", a.Error)
		return
	}
	if snd := l.sender; snd != nil && a.Epoch > snd.Epoch() {
		// An acknowledgement of an epoch never sent must not let held
		// output out: ignore it, loudly.
		l.mu.Unlock()
		l.log.Error("secondary acknowledged an epoch that was never sent; ignored", "epoch", a.Epoch, "last_sent", snd.Epoch())
		return
	}
	var release uint64
	var fl flight
	found := false
	for e, f := range l.gateEpochOf {
		if e <= a.Epoch {
			if f.gateEpoch > release {
				release = f.gateEpoch
			}
			if e == a.Epoch {
				fl, found = f, true
			}
			delete(l.gateEpochOf, e)
		}
	}
	if !found {
		l.mu.Unlock()
		return // a catch-up epoch: nothing to release
	}
	l.acked++
	l.ackLatency = appendBounded(l.ackLatency, now.Sub(fl.pausedAt))
	if l.cfg.Timings != nil {
		// As a named phase too, so a window's mean can be taken from
		// the metrics (status's quantiles cover the recent epochs).
		l.cfg.Timings.Observe(PhaseAck, fl.pausedAt, now.Sub(fl.pausedAt))
	}
	if l.diverged {
		// This link's replica is known to differ: what it acknowledges
		// protects nothing. The output stays held until the loop has
		// recorded the loss of protection (unprotected rules).
		l.mu.Unlock()
		return
	}
	if l.cfg.Verify && fl.digest != a.Digest {
		l.mu.Unlock()
		l.diverge(a.Epoch, fmt.Sprintf("epoch %d: primary digest %s, secondary %s", a.Epoch, fl.digest, a.Digest))
		return
	}
	if l.cfg.Verify {
		l.verified++
		if !l.mismatchAt.IsZero() && strings.HasPrefix(l.mismatchResolution, resyncing) {
			l.mismatchResolution = fmt.Sprintf("resolved %s: epoch %d verified after a full re-sync of the secondary (join %d)",
				now.UTC().Format(time.RFC3339Nano), a.Epoch, l.joins)
		}
	}
	l.committed = a.Epoch
	l.lastCommitAt = now
	state := l.state
	l.mu.Unlock()
	if release > 0 {
		l.gate.Release(release)
	}
	if state != StateProtected {
		why := "epoch " + fmt.Sprint(a.Epoch) + " acknowledged"
		if l.cfg.Verify {
			why += " and verified"
		}
		l.setState(StateProtected, why)
	}
	if l.cfg.OnCommitted != nil {
		l.cfg.OnCommitted(a.Epoch)
	}
}

// PhaseAck is an epoch's pause-to-acknowledgement time in the timings
// (tandem_phase_seconds{phase="epoch_ack"}).
const PhaseAck = "epoch_ack"


// diverge is a replica that does not match: an incident, not a log line.
// The link's secondary stops counting as a replica at once (status says
// unprotected, OnProtected tells the cluster, nothing it acknowledges
// releases output or reaches raft), and the loop drops the link: the
// rejoin builds a fresh image on the secondary from a full sync, and
// protection returns only with an epoch whose digest matches. Output
// held meanwhile follows the unprotected rules (released once the loss
// of protection is recorded).
func (l *EpochLoop) diverge(epoch uint64, detail string) {
	why := fmt.Sprintf("replica digest mismatch at epoch %d: %s", epoch, resyncing)
	l.mu.Lock()
	if l.diverged {
		l.mu.Unlock()
		return
	}
	l.diverged = true
	l.mismatches++
	l.lastMismatch, l.mismatchEpoch, l.mismatchAt, l.mismatchResolution = detail, epoch, l.clk.Now(), resyncing
	old := l.state
	l.state, l.why = StateUnprotected, why
	l.mu.Unlock()
	l.log.Error("REPLICA DIGEST MISMATCH: the secondary no longer counts as a replica; re-syncing it from scratch",
		"epoch", epoch, "detail", detail)
	if old == StateProtected && l.cfg.OnProtected != nil {
		l.cfg.OnProtected(false, why)
	}
	select {
	case l.relink <- why:
	default: // one request pending is enough
	}
}

// verifySlice is one pause's re-read of memory: page indices and their
// hashes as the paused guest held them.
type verifySlice struct {
	index []uint64
	hash  []uint64
}

// readSlice hashes the next VerifySlicePages pages of the paused guest,
// rotating through all of memory. Called with the guest paused.
func (l *EpochLoop) readSlice(vs *verifySlice) {
	vs.index, vs.hash = vs.index[:0], vs.hash[:0]
	regions, total := l.cfg.Guest.Regions(), l.guestPages
	if total == 0 {
		return
	}
	pos := l.vcursor % total
	for left := min(uint64(l.cfg.VerifySlicePages), total); left > 0; {
		off := pos
		var r guest.Region
		for _, r = range regions {
			if off < r.Pages() {
				break
			}
			off -= r.Pages()
		}
		run := min(left, r.Pages()-off)
		for p := off; p < off+run; p++ {
			idx := r.FirstPage() + p
			vs.index = append(vs.index, idx)
			vs.hash = append(vs.hash, guest.PageHash(idx, r.Mem[p<<guest.PageShift:(p+1)<<guest.PageShift]))
		}
		left -= run
		pos = (pos + run) % total
	}
	l.vcursor = pos
}

// verifyCapture records a capture's pages in the digest of what was
// shipped, checks the pause's slice against it, and returns the epoch's
// digest (memory as shipped, plus the captured machine state). A slice
// page that differs was written without the dirty log noticing: the
// secondary never got that write, so the replica has diverged.
func (l *EpochLoop) verifyCapture(shipped *guest.MemHash, cp *precopy.Capture, vs *verifySlice) string {
	for _, p := range cp.Pages {
		shipped.Update(p.Index, p.Data)
	}
	for i, idx := range vs.index {
		if shipped.Page(idx) != vs.hash[i] {
			l.mu.Lock()
			last := l.shipped
			l.mu.Unlock()
			l.diverge(last, fmt.Sprintf("page %d differs from what was shipped: a write escaped dirty tracking (found by the rotating check after epoch %d)", idx, last))
			break
		}
	}
	return guest.CombineDigest(shipped.Sum(), cp.State).String()
}

// EpochStatus is the primary's protection figures; JSON names are part of
// `tandem status --json`, kept in package api.
type EpochStatus = api.EpochStatus

// Status returns the figures now.
func (l *EpochLoop) Status() EpochStatus {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := EpochStatus{
		Protected: l.state == StateProtected, Protection: l.state, ProtectionReason: l.why, Secondary: l.secondary,
		LastCommittedEpoch: l.committed, LastShippedEpoch: l.shipped, SecondaryLag: len(l.gateEpochOf),
		Epochs: l.epochs, AckedEpochs: l.acked, EpochRawBytes: l.rawBytes, EpochWireBytes: l.wireBytes,
		FlushAborts: l.flushAborts, BackpressureStalls: l.stalls, VerifyEpochs: l.cfg.Verify,
		VerifiedEpochs: l.verified, DigestMismatches: l.mismatches, LastMismatch: l.lastMismatch, Joins: l.joins,
		LastMismatchEpoch: l.mismatchEpoch, LastMismatchResolution: l.mismatchResolution,
		QueuePolicy: fmt.Sprintf("at most %d epochs unacknowledged and 1 queued for shipping; a slow secondary lengthens epochs", l.cfg.MaxInFlight),
	}
	if !l.mismatchAt.IsZero() {
		st.LastMismatchAt = l.mismatchAt.UTC().Format(time.RFC3339Nano)
	}
	if l.cfg.Verify {
		st.VerifySlicePages = l.cfg.VerifySlicePages
		st.VerifyCycleEpochs = (l.guestPages + uint64(l.cfg.VerifySlicePages) - 1) / uint64(l.cfg.VerifySlicePages)
	}
	if l.epochs > 0 {
		st.EpochRawBytesAvg = l.rawBytes / l.epochs
		st.EpochWireBytesAvg = l.wireBytes / l.epochs
	}
	if l.rawBytes > 0 {
		st.WireRatio = float64(l.wireBytes) / float64(l.rawBytes)
	}
	if !l.startedEpochs.IsZero() && l.state != StateUnprotected {
		if secs := clock.Since(l.clk, l.startedEpochs).Seconds(); secs > 0 {
			st.EpochsPerSecond = float64(l.linkEpochs) / secs
		}
	}
	st.PauseP50Ms, st.PauseP99Ms, st.PauseMaxMs = quantiles(l.pauses)
	st.AckLatencyP50Ms, st.AckLatencyP99Ms, _ = quantiles(l.ackLatency)
	st.OutputDelayP50Ms, st.OutputDelayP99Ms, _ = quantiles(l.gate.Delays())
	st.OutputHeldBytes = l.gate.Held()
	return st
}

// quantiles returns p50, p99 and max in milliseconds.
func quantiles(ds []time.Duration) (p50, p99, mx float64) {
	if len(ds) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) float64 {
		i := min(len(s)-1, int(q*float64(len(s))))
		return float64(s[i].Microseconds()) / 1000
	}
	return at(0.5), at(0.99), float64(s[len(s)-1].Microseconds()) / 1000
}
