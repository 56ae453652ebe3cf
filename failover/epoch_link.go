package failover

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// protect connects to addr, brings it up to date and runs epochs until
// the link fails, ctx ends or the target changes.
func (l *EpochLoop) protect(ctx context.Context, addr string) error {
	if !l.advised {
		// A protected guest's memory that it writes whole goes into
		// huge pages (the secondary's image does the same): at
		// 100,000 whole-page rewrites/s on synth the guest wrote 88-89k
		// pages/s protected and 1 in 100-300 acknowledgements took over
		// 25 ms, against 59-74k and 1 in 50 with 4 KiB pages (15 s
		// windows, 2026-12-01). Not for a guest that only runs or
		// migrates: advised so, a migration of the same guest took
		// 1.3-2.2 s against 0.7-0.9 s on that host, the destination
		// (same host) zeroing twice the memory. Likely that host's
		// doing: the source's 256 huge pages took free 2 MiB blocks
		// the host still backed, and free page reporting had handed
		// the others back, which the destination then touched first
		// (docs/PERFORMANCE.md); not proven.
		guest.AdviseWholeWrites(l.cfg.Guest)
		l.advised = true
	}
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	l.mu.Lock()
	if l.want != addr || l.prot.Fenced() {
		l.mu.Unlock()
		return errors.New("the secondary changed before the join")
	}
	l.linkCancel = cancel
	defer func() {
		l.mu.Lock()
		l.linkCancel, l.link = nil, nil
		l.mu.Unlock()
	}()
	l.joins++
	first := l.lastEpoch
	l.mu.Unlock()
	select {
	case <-l.relink: // meant for a link that is gone
	default:
	}
	l.step(ProtectionEvent{Kind: EvJoinStart, Addr: addr, Epoch: first, Now: l.clk.Now()})
	l.resyncStart(addr)
	defer l.resyncEnd(false) // a join cut short: no progress left shown

	acks, onAck := l.ackFeed(lctx)
	link, err := l.dial(lctx, addr, onAck)
	if err != nil {
		if errors.Is(err, replica.ErrPeerActivated) {
			l.fence(fmt.Sprintf("the secondary %s was activated and runs the guest (it refused this primary's join)", addr))
		}
		return err
	}
	l.mu.Lock()
	l.link = link
	l.mu.Unlock()

	sent := make(chan struct{}, 1)
	sender := &precopy.LiveSender{Core: l.core, Link: sentLink{Link: link, sent: sent}, EpochPages: 4096, OnPages: l.resyncPages}
	sender.SetEpoch(first)
	// shipped is the digest of what the secondary holds once it has
	// committed everything sent: the receiver's memory starts zero, and
	// every page sent (catch-up and epochs) is recorded as it went.
	// During the catch-up the Writer hands over each page's hash as its
	// epoch digest takes it, so no page is read again for this; the
	// epochs after it record their pages at the capture (verifyCapture),
	// which checks them against the pause's slice before they ship.
	var shipped *guest.MemHash
	if l.cfg.Verify {
		shipped = guest.NewMemHash()
		link.Writer().OnPageHash(shipped.UpdateHashed)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		l.ackLoop(lctx, link, sender, acks, sent)
	}()
	defer func() {
		cancel()
		wg.Wait()
		link.Close() // the reader has ended (bounded): acks holds all it will
		l.drainActivations(acks)
		l.mu.Lock()
		l.lastEpoch = max(l.lastEpoch, sender.Epoch())
		l.mu.Unlock()
	}()
	err = l.catchUp(lctx, addr, link, sender)
	// The epochs' pages go into shipped from the capture goroutine; the
	// shipping goroutine must not touch it any more.
	link.Writer().OnPageHash(nil)
	if err != nil {
		return err
	}
	l.resyncEnd(true)
	l.step(ProtectionEvent{Kind: EvJoinDone, Now: l.clk.Now()})
	return l.runEpochs(ctx, lctx, link, sender, shipped)
}

// ackFeed is the way acknowledgements come in: the link's reader calls
// onAck, which puts them on acks for ackLoop (started once the sender
// exists) to step into the machine. Once the link's context ends nothing
// is queued, but an activation notice still fences.
func (l *EpochLoop) ackFeed(ctx context.Context) (chan precopy.Ack, func(precopy.Ack)) {
	acks := make(chan precopy.Ack, 64)
	return acks, func(a precopy.Ack) {
		if ctx.Err() == nil {
			select {
			case acks <- a:
				return
			case <-ctx.Done():
			}
		}
		if a.Activated {
			l.stepAck(a, nil)
		}
	}
}

// dial connects to the secondary at addr and performs the handshake.
func (l *EpochLoop) dial(ctx context.Context, addr string, onAck func(precopy.Ack)) (*replica.Link, error) {
	hello := replica.Hello{Purpose: replica.PurposeReplicate, Kind: l.cfg.Guest.Kind(), Config: l.cfg.Config,
		Build: l.cfg.Build, Verify: l.cfg.Verify, Devices: guest.StateSectionsOf(l.cfg.Guest),
		Resident: replica.ResidentHint(l.cfg.Guest)}
	if l.cfg.Generation != nil {
		hello.Generation = l.cfg.Generation()
	}
	var expect string
	if l.cfg.TLS != nil && l.cfg.SecondaryName != nil {
		expect = l.cfg.SecondaryName(addr)
	}
	dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
	defer dcancel()
	return replica.Dial(dctx, addr, hello, l.cfg.Guest.Regions(), replica.DialOptions{
		Stream: l.cfg.Stream, Timeout: 10 * time.Second, OnAck: onAck, TLS: l.cfg.TLS, Expect: expect,
		Insecure: l.cfg.Insecure,
	})
}

// catchUp syncs the secondary while the guest runs: everything once,
// then what was dirtied, until what is left fits an epoch or rounds stop
// helping. The catch-up counts only once the secondary has it: until
// then output is not held (no epoch has sealed any), so a secondary that
// never answers costs the guest nothing while the ack deadline runs.
func (l *EpochLoop) catchUp(ctx context.Context, addr string, link *replica.Link, sender *precopy.LiveSender) error {
	if _, err := l.core.Sync(); err != nil {
		return err
	}
	l.core.Dirty.Clear()
	l.resyncPhase("full sync")
	if _, err := sender.SendAll(ctx); err != nil {
		return fmt.Errorf("sync to %s: %w", addr, err)
	}
	for round := 1; round <= 30; round++ {
		if _, err := l.core.Sync(); err != nil {
			return err
		}
		if l.core.Dirty.Count() <= 2048 {
			break
		}
		l.resyncPhase(fmt.Sprintf("dirty round %d", round))
		if _, err := sender.SendDirty(ctx); err != nil {
			return fmt.Errorf("sync to %s: %w", addr, err)
		}
		if err := link.Err(); err != nil {
			return err
		}
	}
	l.resyncPhase("draining")
	if err := sender.Drain(ctx); err != nil {
		return fmt.Errorf("sync to %s: %w", addr, err)
	}
	return nil
}

// sentLink tells the ack goroutine that an epoch went out (every epoch's
// end flushes the link): the acknowledgement deadline starts when
// something becomes outstanding, so it needs to hear of sends.
type sentLink struct {
	*replica.Link
	sent chan<- struct{}
}

func (s sentLink) Flush() error {
	err := s.Link.Flush()
	select {
	case s.sent <- struct{}{}:
	default: // one wake-up pending is enough
	}
	return err
}

// ackLoop is the link's ack goroutine: it steps every acknowledgement
// into the machine, tells it of sends, and wakes at the machine's
// acknowledgement deadline (the link is dropped when acknowledgements
// stop moving for AckTimeout while something is outstanding). It sleeps
// on channels and one timer, never polls. It ends with the link (ctx, or
// the reader's end), after taking every acknowledgement already queued.
func (l *EpochLoop) ackLoop(ctx context.Context, link *replica.Link, sender *precopy.LiveSender, acks <-chan precopy.Ack, sent <-chan struct{}) {
	for {
		l.mu.Lock()
		at, ok := l.prot.AckDeadline()
		l.mu.Unlock()
		var deadline <-chan time.Time
		var timer interface{ Stop() bool }
		if ok {
			t := l.clk.NewTimer(max(at.Sub(l.clk.Now()), 0))
			deadline, timer = t.C(), t
		}
		end := false
		select {
		case <-ctx.Done():
			end = true
		case <-link.Done():
			end = true
		case a := <-acks:
			l.stepAck(a, sender)
		case <-sent:
			l.step(ProtectionEvent{Kind: EvSent, Epoch: sender.Epoch(), Now: l.clk.Now()})
		case <-deadline:
			l.step(ProtectionEvent{Kind: EvTick, Now: l.clk.Now()})
		}
		if timer != nil {
			timer.Stop()
		}
		if end {
			for {
				select {
				case a := <-acks:
					l.stepAck(a, sender)
				default:
					return
				}
			}
		}
	}
}

// drainActivations processes what is left in acks once the link is
// closed and its reader gone: only an activation notice matters then (it
// fences).
func (l *EpochLoop) drainActivations(acks <-chan precopy.Ack) {
	for {
		select {
		case a := <-acks:
			if a.Activated {
				l.stepAck(a, nil)
			}
		default:
			return
		}
	}
}

// stepAck steps one acknowledgement and wakes the capture side.
func (l *EpochLoop) stepAck(a precopy.Ack, sender *precopy.LiveSender) {
	ev := ProtectionEvent{Kind: EvAck, Epoch: a.Epoch, Digest: a.Digest, Why: a.Error,
		Activated: a.Activated, Now: l.clk.Now()}
	if sender != nil {
		ev.Sent = sender.Epoch()
	}
	l.mu.Lock()
	l.lastAckAt = ev.Now
	l.mu.Unlock()
	if a.Activated {
		// As fence: the flag first, so no release slips out meanwhile.
		l.fencedFlag.Store(true)
		l.gate.Discard()
	}
	l.step(ev)
	select {
	case l.progress <- struct{}{}:
	default:
	}
}
