package failover

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/clock"
	"github.com/tandemvm/tandem/internal/timing"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// EpochConfig configures a primary's epoch loop.
type EpochConfig struct {
	Guest  guest.Guest
	Config guest.Config
	// Interval is the epoch length; 0 means 25 ms. With output-triggered
	// epochs it is the longest epoch (no output waiting).
	Interval time.Duration
	// Trigger says what ends an epoch: the clock alone, or held output
	// too (epoch_trigger.go); zero means DefaultTrigger.
	Trigger EpochTrigger
	// MaxOutputDelay is the objective for how long output waits for its
	// epoch's pause (triggered epochs): met unless the pause fraction,
	// the in-flight window or pipelined load (the interval) says
	// otherwise, and status names the bound then; 0 means
	// DefaultMaxOutputDelay. Validate: within [DefaultMinInterval,
	// Interval].
	MaxOutputDelay time.Duration
	// MaxPauseFraction bounds the share of time the guest spends paused
	// by epochs that end early for output; 0 means
	// DefaultMaxPauseFraction. Validate: within (0, 1]. A pause the guest
	// waited idle through, all of it (a guest that says so: idlePauser),
	// held no guest work and counts nothing.
	MaxPauseFraction float64
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
	// VerifySlicePages is how many pages each pause re-reads after an
	// epoch of Interval (a shorter, output-triggered epoch re-reads its
	// share); every page is checked once every (guest pages /
	// VerifySlicePages) intervals. 0 means DefaultVerifySlicePages.
	VerifySlicePages int
	Build            string
	// Generation, if set, gives the generation this primary runs under
	// now; each join's handshake carries it, so a primary that raft kept
	// in a new term is not refused as stale by its secondary.
	Generation func() uint64
	Stream     checkpoint.Options
	// Timings receives the epoch's phases (precopy's pause phases) and
	// each hop from capture to release as a named histogram: see the
	// Phase* constants in epoch_status.go.
	Timings *timing.Recorder
	Log     *slog.Logger
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
	// ReleaseFrame takes the guest's network frames once their epoch is
	// acknowledged (or at once while unprotected), one call per frame.
	// nil drops them. Like Release, it must not block for long.
	ReleaseFrame func(frame []byte)
	// ObserveOutput is told about the output the loop's gate releases
	// (the node's metrics); see OutputObserver.
	ObserveOutput OutputObserver
	// Insecure lets a plaintext loop (TLS nil) stream to a non-loopback
	// secondary; without it such a secondary is refused at each dial.
	Insecure bool
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
	// Throttle says when the loop slows a guest whose dirty bytes
	// outrun the link (epoch_throttle.go); the guest must implement
	// guest.Throttler, or nothing is throttled.
	Throttle ThrottlePolicy
}

// DefaultAckTimeout is EpochConfig.AckTimeout's default.
const DefaultAckTimeout = 10 * time.Second

// finalTimeout bounds a final epoch: its flush, and the wait for its
// acknowledgement (and every earlier epoch's).
const finalTimeout = 10 * time.Second

// EpochLoop is a primary's protection: it runs the guest's epochs, ships
// them to the secondary, and releases output as the secondary
// acknowledges. Without a secondary the guest runs unprotected and its
// output passes straight through. One goroutine calls Run; the other
// methods may be called from anywhere.
//
// The loop is the I/O shell around Protection, the pure state machine
// that decides (protection.go): every observation (a join, an
// acknowledgement, a pause, a deadline) is stepped into it under mu and
// the actions it returns are performed after mu is released (perform,
// epoch_actions.go). Acknowledgements reach it on a channel, through the
// link's ack goroutine (epoch_link.go); captures and shipping are in
// epoch_capture.go, the replica's verification in epoch_verify.go, the
// figures in epoch_status.go.
type EpochLoop struct {
	cfg  EpochConfig
	core *precopy.Core
	gate *OutputGate
	log  *slog.Logger
	clk  clock.Clock // cfg.Clock, never nil

	wake   chan struct{} // SetSecondary changed want
	relink chan string   // the machine's requests to drop the current link (why)
	// progress is signalled (never blocking) after every acknowledgement
	// the machine took: the capture goroutine waits on it for room in
	// the in-flight window or for a final epoch's acknowledgement.
	progress chan struct{}
	// fencedCh is closed when the loop fences itself; fencedFlag is the
	// same, read by the output gate's fencing check on every release.
	fencedCh   chan struct{}
	fencedOnce sync.Once
	fencedFlag atomic.Bool

	// mu guards the state machine and the figures below.
	mu   sync.Mutex
	prot *Protection
	// want is the secondary SetSecondary asked for, wantSeq counts the
	// requests; linkCancel ends the current link and link is its
	// connection (both nil between links).
	want         string
	wantSeq      uint64
	linkCancel   context.CancelFunc
	link         *replica.Link
	lastCommitAt time.Time
	shipped      uint64          // last stream epoch shipped
	pauses       []time.Duration // recent pauses of protected epochs, bounded
	ackLatency   []time.Duration // recent, of protected epochs, bounded
	// protectedAt is when protection last began (zero while
	// unprotected); epochs paused before it are the join's, whose
	// longest pause and acknowledgement are kept apart.
	protectedAt              time.Time
	advised                  bool   // guest.AdviseWholeWrites done (loop goroutine)
	cacheBypasses            uint64 // delta-cache bypasses of every link's writer
	joinPauseMax, joinAckMax time.Duration
	joinSeen                 bool   // a join's figures exist (status null before)
	epochs                   uint64 // consistent epochs captured
	acked                    uint64 // consistent epochs acknowledged
	rawBytes                 uint64 // page bytes captured, all epochs
	wireBytes                uint64 // stream bytes of consistent epochs
	flushAborts              uint64
	mismatches               uint64
	verified                 uint64
	lastMismatch             string
	// The last mismatch: its epoch, when, and how it was resolved.
	mismatchEpoch      uint64
	mismatchAt         time.Time
	mismatchResolution string
	startedEpochs      time.Time
	linkEpochs         uint64 // consistent epochs captured on the current link
	stalls             uint64 // captures delayed by back-pressure
	joins              uint64
	lastEpoch          uint64 // last stream epoch number used, across joins
	// lastAckAt is when the current link's secondary last acknowledged
	// (zero: not on this link yet).
	lastAckAt time.Time
	// The join in progress (resyncAt zero: none) and the last one done.
	resync          resyncProgress
	lastResync      time.Duration
	lastResyncBytes uint64
	lastResyncDone  bool
	// stateLog quiets a repeated "not protected" (see logState).
	stateLog repeatLog

	// vcursor is where the next verifying pause's slice starts, as a
	// position in the guest's pages taken region after region (capture
	// goroutine only); guestPages is the guest's page count (fixed).
	vcursor    uint64
	guestPages uint64

	final chan finalRequest // FinalEpoch's requests to the capture loop
	// finalPausedAt (under mu) is when the last final epoch paused the
	// guest (FinalEpochPaused).
	finalPausedAt time.Time

	// Triggered epochs (capture goroutine only): the last pause's start
	// and the pause account NextPause's cost figures come from.
	lastPauseAt time.Time
	nextTick    time.Time // the clock's next pause
	pauseAcct   pauseAccount
	epochPeak   float64 // the largest recent epoch, pages (noteEpochSize)
	// Under mu: the bound of the last decision, the epochs triggered by
	// output and by the clock, the pauses of the last pauseWindow, and
	// when each epoch in flight was sent (its apply hop ends at the ack).
	bound          string
	epochsByOutput uint64
	epochsByClock  uint64
	pauseLog       []pauseSample
	sentAt         []sentStamp
	// thr is the throttle's window being gathered (under mu; the
	// capture goroutine decides), throttle the percent in force.
	thr      throttleState
	throttle int
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

// Protection states.
const (
	StateUnprotected = "unprotected"
	StateJoining     = "joining"
	StateProtected   = "protected"
	// StateFenced: the secondary was activated and runs the guest; this
	// loop released nothing since it heard so, and its guest is paused.
	StateFenced = "fenced"
)

// NewEpochLoop prepares protection for a guest (not yet resumed or
// already running) and routes its console output through the output
// gate. The guest starts unprotected.
func NewEpochLoop(cfg EpochConfig) *EpochLoop {
	if cfg.Interval <= 0 {
		cfg.Interval = defaultInterval
	}
	if cfg.Trigger == TriggerDefault {
		cfg.Trigger = defaultTrigger
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
		wake: make(chan struct{}, 1), relink: make(chan string, 1), progress: make(chan struct{}, 1),
		prot: NewProtection(ProtectionConfig{Verify: cfg.Verify, MaxInFlight: cfg.MaxInFlight,
			AckTimeout: cfg.AckTimeout, FinalTimeout: finalTimeout}),
		lastEpoch: cfg.FirstEpoch, final: make(chan finalRequest), fencedCh: make(chan struct{}),
	}
	allow := cfg.Allow
	l.gate = newOutputGate(1, cfg.Release, func() bool {
		return !l.fencedFlag.Load() && (allow == nil || allow())
	}, cfg.Clock)
	for _, r := range cfg.Guest.Regions() {
		l.guestPages += r.Pages()
	}
	l.gate.SetObserver(cfg.ObserveOutput)
	l.gate.Hold(false)
	cfg.Guest.Console().SetOutput(l.gate.Write)
	if nic := guest.NICOf(cfg.Guest); nic != nil {
		l.gate.SetFrameSink(cfg.ReleaseFrame)
		nic.SetTransmit(l.gate.WriteFrame)
	}
	return l
}

// Gate is the loop's output gate (fencing discards through it).
func (l *EpochLoop) Gate() *OutputGate { return l.gate }

// SetDirtyTap hands every page the loop's dirty syncs find to t (nil:
// stop): a migration of the protected guest takes its dirty pages there,
// since the loop alone reads the guest's dirty log (precopy.DirtyTap).
func (l *EpochLoop) SetDirtyTap(t *precopy.DirtyTap) { l.core.SetTap(t) }

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
	if l.linkCancel != nil && l.prot.Secondary() != addr {
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
	_, why := l.prot.State()
	return l.prot.Fenced(), why
}

// fence is the secondary saying it was activated and runs the guest: from
// now on nothing leaves through the gate (held output is dropped, the
// fencing check refuses every release), the link ends, and Run pauses the
// guest and keeps it paused. There is no way back but a restart: the
// other node's guest is the one that runs. The flag is set before the
// machine hears of it, so no release slips out in between.
func (l *EpochLoop) fence(why string) {
	l.fencedFlag.Store(true)
	l.gate.Discard()
	l.step(ProtectionEvent{Kind: EvFenced, Why: why, Now: l.clk.Now()})
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
			l.refuseFinal(req)
		case <-l.wake:
		}
	}
}

// refuseFinal answers a final-epoch request that comes while no epochs
// run (no secondary, backing off, fenced): the machine says why.
func (l *EpochLoop) refuseFinal(req finalRequest) {
	for _, a := range l.step(ProtectionEvent{Kind: EvFinalRequested, Now: l.clk.Now()}) {
		if a.Kind == DoRefuseFinal {
			req.reply(errors.New(a.Why))
			return
		}
	}
	req.reply(errors.New("not protected: no epochs running"))
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
	l.step(ProtectionEvent{Kind: EvRelink, Why: why, Now: l.clk.Now()})
}

// Run runs epochs until ctx ends. It never leaves the guest paused,
// except fenced (the secondary was activated: see fence), when it pauses
// the guest and keeps it paused until ctx ends.
func (l *EpochLoop) Run(ctx context.Context) error {
	for {
		if l.fencedFlag.Load() {
			l.parkFenced(ctx)
			return nil
		}
		l.mu.Lock()
		addr, seq := l.want, l.wantSeq
		l.mu.Unlock()
		if addr == "" {
			l.step(ProtectionEvent{Kind: EvNoSecondary, Now: l.clk.Now()})
			select {
			case <-ctx.Done():
				return nil
			case <-l.wake:
			case req := <-l.final:
				l.refuseFinal(req)
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
			l.step(ProtectionEvent{Kind: EvSecondaryChanged, Now: l.clk.Now()})
			continue
		}
		// Lost the secondary: run unprotected, retry with back-off (the
		// machine says how long).
		var retry time.Duration
		for _, a := range l.step(ProtectionEvent{Kind: EvLinkDown, Why: err.Error(), Unreached: unreached(err), Now: l.clk.Now()}) {
			if a.Kind == DoBackoff {
				retry = a.Delay
			}
		}
		ok, reset := l.backOff(ctx, retry, changed)
		if !ok {
			return nil
		}
		if reset {
			l.step(ProtectionEvent{Kind: EvSecondaryChanged, Now: l.clk.Now()})
		}
	}
}

// unreached says whether a join's error is its connection's: refused, or
// not answered in time (the secondary never saw the join).
func unreached(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
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
			l.refuseFinal(req)
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

// FinalEpochPaused is FinalEpoch, also returning when the guest paused
// for the final epoch: a caller timing the whole pause (a protected
// guest's post-copy switch) starts there, not after the epoch's ship and
// acknowledgement.
func (l *EpochLoop) FinalEpochPaused(ctx context.Context) (time.Time, error) {
	if err := l.FinalEpoch(ctx); err != nil {
		return time.Time{}, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.finalPausedAt, nil
}
