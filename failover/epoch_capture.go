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

// job is one captured epoch on its way to the shipper.
type job struct {
	cp         *precopy.Capture
	gateEpoch  uint64
	digest     string
	capturedAt time.Time     // on the loop's clock
	run        time.Duration // the guest's run time the epoch holds (throttle)
}

// pipeline is one link's capture side: the captures go to the shipper
// through ship, each in a buffer taken from free.
type pipeline struct {
	parent, ctx context.Context // the loop's; the link's
	link        *replica.Link
	sender      *precopy.LiveSender
	shipped     *guest.MemHash // what the secondary will hold (Verify), or nil
	ship        chan job
	free        chan []byte
	shipErr     chan error
	shipDead    bool        // shipErr was taken: the shipper has ended
	slice       verifySlice // the pause's re-read of memory (Verify)
	// byOutput: the next capture was triggered by held output, not by
	// the clock (triggered epochs).
	byOutput bool
	// stalled: the next capture waited for room (back-pressure).
	stalled bool
	// sleepers: awaitTrigger's short waits still sleeping (triggerTimer).
	sleepers sync.WaitGroup
	// sleeper is the latest short wait started and when it wakes (the
	// loop's goroutine only): a later wait that would wake no sooner
	// shares it (triggerTimer).
	sleeper struct {
		w  preciseWait
		at time.Time
	}
}

// runEpochs captures an epoch every interval (or, triggered, when
// NextPause says: see awaitTrigger) and ships it on another goroutine
// (pipelined), with bounded buffers: see the package doc.
func (l *EpochLoop) runEpochs(parent, ctx context.Context, link *replica.Link, sender *precopy.LiveSender, shipped *guest.MemHash) error {
	p := &pipeline{parent: parent, ctx: ctx, link: link, sender: sender, shipped: shipped,
		ship: make(chan job, 1), free: make(chan []byte, 3), shipErr: make(chan error, 1)}
	// Each slot owns its buffer: a capture copies its pages into the slot
	// it took, and the slot comes back only once the shipper is done with
	// those pages. The seeds are empty but not nil: a nil Buffer makes
	// Capture use the Core's one shared buffer, so every slot would alias
	// it and a capture taken while the shipper still encodes the previous
	// epoch would overwrite that epoch's pages under it (the secondary
	// then committed other pages' contents: a silent divergence, or a
	// checksum error and a reconnect when the overwrite raced the encoder).
	for i := 0; i < cap(p.free); i++ {
		p.free <- make([]byte, 0)
	}
	var shipWG sync.WaitGroup
	shipWG.Add(1)
	go func() {
		defer shipWG.Done()
		p.shipErr <- l.shipper(ctx, link, sender, p.ship, p.free)
	}()
	defer func() {
		close(p.ship)
		shipWG.Wait()
		p.sleepers.Wait()
		l.releaseThrottle()
	}()

	l.mu.Lock()
	l.startedEpochs = l.clk.Now()
	l.linkEpochs = 0
	l.mu.Unlock()
	if l.lastPauseAt.IsZero() {
		l.lastPauseAt = l.clk.Now()
	}
	if l.cfg.Trigger == TriggerOutput {
		return l.runTriggered(p)
	}
	tick := l.clk.NewTicker(l.cfg.Interval)
	defer tick.Stop()
	for {
		var final *finalRequest
		p.byOutput = false
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-p.shipErr:
			return err
		case why := <-l.relink:
			return errors.New(why)
		case <-tick.C():
		case req := <-l.final:
			if a, ok := findAction(l.step(ProtectionEvent{Kind: EvFinalRequested, Now: l.clk.Now()}), DoRefuseFinal); ok {
				req.reply(errors.New(a.Why))
				continue
			}
			final = &req
		}
		if err := l.epoch(p, final); err != nil {
			return err
		}
	}
}

// runTriggered is runEpochs's capture loop with output-triggered epochs:
// each epoch starts when awaitTrigger says.
func (l *EpochLoop) runTriggered(p *pipeline) error {
	tc := l.cfg.triggerConfig()
	l.nextTick = l.clk.Now().Add(tc.Interval)
	for {
		final, err := l.awaitTrigger(p, tc)
		if err != nil {
			return err
		}
		if err := l.epoch(p, final); err != nil {
			return err
		}
	}
}

// awaitTrigger waits until NextPause says the next epoch starts (or a
// final epoch is asked for) and sets p.byOutput. It decides afresh on
// every change of its inputs, each a channel: output held in the open
// epoch (the gate's Arrivals), an acknowledgement (progress: the window
// and what is in flight), its timer; it never polls. A due pause with the
// window full returns at once: the capture waits for room in waitSlot,
// as with fixed epochs.
func (l *EpochLoop) awaitTrigger(p *pipeline, tc TriggerConfig) (*finalRequest, error) {
	for {
		now := l.clk.Now()
		in := l.triggerInput(now)
		in.UntilTick = max(l.nextTick.Sub(now), 0)
		d := NextPause(tc, in)
		l.mu.Lock()
		l.bound = d.Bound
		l.mu.Unlock()
		if d.After <= 0 {
			p.byOutput = d.ByOutput
			// The clock's next tick: the first after now (like a
			// ticker, ticks missed while a capture waited are dropped).
			for !l.nextTick.After(now) {
				l.nextTick = l.nextTick.Add(tc.Interval)
			}
			return nil, nil
		}
		wait := l.triggerTimer(p, d.After)
		select {
		case <-p.ctx.Done():
			wait.Stop()
			return nil, p.ctx.Err()
		case err := <-p.shipErr:
			wait.Stop()
			p.shipDead = true
			return nil, err
		case why := <-l.relink:
			wait.Stop()
			return nil, errors.New(why)
		case <-wait.C():
		case <-l.gate.Arrivals():
		case <-l.progress:
		case req := <-l.final:
			wait.Stop()
			if a, ok := findAction(l.step(ProtectionEvent{Kind: EvFinalRequested, Now: l.clk.Now()}), DoRefuseFinal); ok {
				req.reply(errors.New(a.Why))
				continue
			}
			p.byOutput = false
			return &req, nil
		}
		wait.Stop()
	}
}

// triggerInput gathers NextPause's figures at now.
func (l *EpochLoop) triggerInput(now time.Time) TriggerInput {
	o := l.gate.OpenHeld()
	in := TriggerInput{SinceLastPause: now.Sub(l.lastPauseAt), HeldBytes: o.Bytes}
	l.pauseAcct.fill(&in)
	if o.Bytes > 0 {
		in.HeldAge = max(now.Sub(o.Since), 0)
	}
	if !o.OverlapAt.IsZero() {
		in.Overlapped, in.OverlapAge = true, max(now.Sub(o.OverlapAt), 0)
	}
	l.mu.Lock()
	in.InFlight = l.prot.InFlight()
	in.WindowFull = !l.prot.MayCapture()
	l.mu.Unlock()
	return in
}

// notePause feeds a capture into the pause account NextPause's figures
// come from (pauseAccount) and into the status's counts. Capture
// goroutine only, but for the figures under mu.
func (l *EpochLoop) notePause(cp *precopy.Capture, byOutput bool) {
	ip, ok := l.cfg.Guest.(idlePauser)
	idle := ok && ip.IdleThroughPause()
	held := l.pauseAcct.note(l.cfg.triggerConfig(), cp.PausedAt, cp.Breakdown.Total(), cp.Breakdown.Copy, len(cp.Pages), idle)
	l.lastPauseAt = cp.PausedAt
	l.mu.Lock()
	if byOutput {
		l.epochsByOutput++
	} else {
		l.epochsByClock++
	}
	l.pauseLog = append(l.pauseLog, pauseSample{at: cp.PausedAt, d: cp.Breakdown.Total(), held: held})
	if cut := cp.PausedAt.Add(-pauseWindow); len(l.pauseLog) > 0 && l.pauseLog[0].at.Before(cut) {
		i := 0
		for i < len(l.pauseLog) && l.pauseLog[i].at.Before(cut) {
			i++
		}
		l.pauseLog = append(l.pauseLog[:0], l.pauseLog[i:]...)
	}
	l.mu.Unlock()
}

// pauseWindow is how far back the status's paused time per second looks.
const pauseWindow = time.Second

type pauseSample struct {
	at   time.Time
	d    time.Duration
	held time.Duration // of d, the time the guest had work it could not do (see idlePauser)
}

func findAction(acts []ProtectionAction, k ProtectionActionKind) (ProtectionAction, bool) {
	for _, a := range acts {
		if a.Kind == k {
			return a, true
		}
	}
	return ProtectionAction{}, false
}

// epoch captures one epoch and hands it to the shipper. With final it is
// a switchover's last epoch: the guest stays paused and epoch returns
// only once the handover is over (see handOver). An error ends the link.
func (l *EpochLoop) epoch(p *pipeline, final *finalRequest) error {
	// answer tells a waiting FinalEpoch how its request ended, once, and
	// passes err on.
	answer := func(err error) error {
		if final != nil {
			final.reply(err)
			final = nil
		}
		return err
	}
	if err := p.link.Err(); err != nil {
		return answer(err)
	}
	buf, err := l.waitSlot(p)
	if err != nil {
		return answer(err)
	}
	if final == nil {
		buf = l.growForPause(buf)
	}
	j, err := l.capture(p, buf, final != nil)
	if err != nil {
		p.free <- buf
		l.step(ProtectionEvent{Kind: EvCaptureFailed, Now: l.clk.Now()})
		answer(err)
		if errors.Is(err, precopy.ErrFlushAborted) {
			l.mu.Lock()
			l.flushAborts++
			l.mu.Unlock()
			l.log.Warn("epoch capture aborted: flush missed its budget; guest resumed", "budget", l.cfg.FlushBudget)
			return nil
		}
		return err
	}
	if final == nil {
		// Not during a handover: the guest stays paused for it, and the
		// throttle is the next primary's to decide.
		l.decideThrottle()
	}
	if len(p.ship) == cap(p.ship) {
		// The shipper still has the previous epoch queued: the guest
		// runs on while this one waits, back-pressure as much as a
		// full window is (the throttle counts it for the next epoch).
		p.stalled = true
	}
	select {
	case p.ship <- j:
	case err := <-p.shipErr:
		// The final capture left the guest paused and the switchover
		// waits for an answer: the link failed before the epoch went
		// out, so the guest runs on here.
		l.step(ProtectionEvent{Kind: EvFinalAbandoned, Now: l.clk.Now()})
		return answer(err)
	case <-p.ctx.Done():
		if p.parent.Err() == nil {
			// The link was dropped (a new secondary, no acks) with the
			// final capture's guest paused: it runs on here.
			l.step(ProtectionEvent{Kind: EvFinalAbandoned, Now: l.clk.Now()})
		}
		return answer(p.ctx.Err())
	}
	if final == nil {
		return nil
	}
	return l.handOver(p, final)
}

// growForPause grows buf, before the pause, to hold the epoch the guest's
// recent dirty rate predicts for the time it has run since the last
// pause (a quarter more). A capture that waited for room in the window
// holds a longer epoch than its buffer was reserved for after the last
// one (ReserveCapture), and growing it in the copy faults its fresh
// memory in with the guest stopped: at 100,000 pages/s a stall of a few
// hundred milliseconds made pauses of 150 to 240 ms. The rate counts
// distinct pages per epoch, so over a long stall it overstates a guest
// that rewrites a small set; the prediction is therefore capped at four
// times the largest recent epoch or growCapFloor, whichever is more, and
// at the guest's pages (past the cap the copy grows the buffer as
// before). Capture goroutine only.
func (l *EpochLoop) growForPause(buf []byte) []byte {
	rate := l.pauseAcct.dirtyRate
	since := l.clk.Now().Sub(l.lastPauseAt)
	if rate <= 0 || since <= 0 {
		return buf
	}
	limit := min(max(4*l.epochPeak, growCapFloor), float64(l.guestPages))
	return precopy.GrowCapture(buf, int(min(1.25*rate*since.Seconds(), limit)))
}

// growCapFloor is growForPause's cap for a guest whose epochs were all
// small: 16 MiB of pages (with three slots, what a wrong prediction can
// leave populated beyond what the epochs use is about 48 MiB).
const growCapFloor = 16 << 20 / guest.PageSize

// noteEpochSize keeps epochPeak, the largest recent epoch in pages
// (halving over about 35 epochs without a larger one). Capture
// goroutine only.
func (l *EpochLoop) noteEpochSize(pages int) {
	l.epochPeak = max(float64(pages), 0.98*l.epochPeak)
}

// waitSlot waits for room in the in-flight window and a free capture
// buffer: back-pressure, so a slow secondary makes epochs longer, never
// memory larger. It wakes on acknowledgements (progress) and returned
// buffers, never polls, and is bounded by the link: acknowledgements that
// stop moving drop it at the ack deadline (ackLoop), and a shipper stuck
// on the wire fails at the link's I/O timeout.
func (l *EpochLoop) waitSlot(p *pipeline) ([]byte, error) {
	stalled := false
	for {
		l.mu.Lock()
		room := l.prot.MayCapture()
		l.mu.Unlock()
		var slots <-chan []byte // nil (never ready) while the window is full
		if room {
			slots = p.free
		}
		select {
		case buf := <-slots: // a slot; its buffer may still be empty
			return buf, nil
		default:
		}
		if !stalled {
			stalled, p.stalled = true, true
			l.mu.Lock()
			l.stalls++
			l.mu.Unlock()
		}
		select {
		case buf := <-slots:
			return buf, nil
		case <-l.progress: // an acknowledgement: the window may have room
		case <-p.ctx.Done():
			return nil, p.ctx.Err()
		case err := <-p.shipErr:
			p.shipDead = true
			return nil, err
		case why := <-l.relink:
			return nil, errors.New(why)
		case <-p.link.Done():
			return nil, p.link.Err()
		}
	}
}

// capture takes one epoch: the pause seals its output (held from the
// link's first pause on) and, verifying, re-reads a slice of memory; a
// final capture waits for the flush (bounded) and leaves the guest
// paused, as a migration's completion does, since a handover must carry
// every disk write.
func (l *EpochLoop) capture(p *pipeline, buf []byte, final bool) (job, error) {
	var j job
	flushBudget := l.cfg.FlushBudget
	if final {
		flushBudget = finalTimeout
	}
	var heldSince time.Time // the open epoch's oldest held output, observed after the resume
	cp, err := l.core.Capture(p.ctx, precopy.CaptureOptions{
		FlushBudget: flushBudget,
		KeepPaused:  final,
		Buffer:      buf,
		WhilePaused: func(cp *precopy.Capture) error {
			l.step(ProtectionEvent{Kind: EvPause, Now: cp.PausedAt})
			if final {
				l.mu.Lock()
				l.finalPausedAt = cp.PausedAt
				l.mu.Unlock()
			}
			if o := l.gate.OpenHeld(); o.Bytes > 0 {
				heldSince = o.Since
			}
			j.gateEpoch = l.gate.Seal()
			if p.shipped != nil {
				// Only the slice is read at the pause; the captured
				// pages are copies and are hashed after the resume.
				l.readSlice(&p.slice, l.slicePages(cp.PausedAt.Sub(l.lastPauseAt)))
			}
			return nil
		},
	})
	if err != nil {
		return j, err
	}
	j.cp = cp
	j.run = l.noteThrottleEpoch(cp.PausedAt.Sub(l.lastPauseAt), p.stalled)
	p.stalled = false
	if !heldSince.IsZero() {
		l.observe(PhaseOutputWait, heldSince, cp.PausedAt.Sub(heldSince))
	}
	if p.shipped != nil {
		j.digest = l.verifyCapture(p.shipped, cp, &p.slice)
	}
	now := l.clk.Now()
	l.observe(PhaseCapture, cp.PausedAt, now.Sub(cp.PausedAt))
	j.capturedAt = now
	l.step(ProtectionEvent{Kind: EvCaptured, Now: now})
	l.notePause(cp, p.byOutput)
	l.noteEpochSize(len(cp.Pages))
	l.mu.Lock()
	l.epochs++
	l.linkEpochs++
	l.rawBytes += uint64(len(cp.Pages)) * guest.PageSize
	if l.joining(cp.PausedAt) {
		l.joinPauseMax = max(l.joinPauseMax, cp.Breakdown.Total())
	} else {
		l.pauses = appendBounded(l.pauses, cp.Breakdown.Total())
	}
	l.mu.Unlock()
	l.observe(PhasePause, cp.PausedAt, cp.Breakdown.Total())
	return j, nil
}

// handOver waits until the secondary holds everything, output included,
// after a final epoch was handed to the shipper, and answers the
// switchover. Acknowledged and taken: the guest stays paused for the new
// primary to take over from this epoch, and only the loop's end (the
// node fenced or stopped) moves it on, not a change of the secondary.
// Otherwise the guest runs on here (never left paused for a handover
// nobody takes) and the loop with it, unless the link is gone.
func (l *EpochLoop) handOver(p *pipeline, final *finalRequest) error {
	l.step(ProtectionEvent{Kind: EvFinalShipped, Now: l.clk.Now()})
	err := l.waitFinal(p)
	if err == nil {
		if final.reply(nil) {
			<-p.parent.Done()
			return p.parent.Err()
		}
		err = fmt.Errorf("the switchover's requester gave up: %w", context.Cause(final.ctx))
		l.log.Warn("final epoch acknowledged but nobody took the handover; the guest runs on here", "err", err)
		l.step(ProtectionEvent{Kind: EvFinalAbandoned, Now: l.clk.Now()})
	} else {
		l.step(ProtectionEvent{Kind: EvFinalAbandoned, Now: l.clk.Now()})
		final.reply(err)
	}
	if p.ctx.Err() != nil || p.link.Err() != nil || p.shipDead {
		return err
	}
	return nil
}

// waitFinal waits until no captured epoch waits for its acknowledgement,
// or the machine's final deadline passes. It wakes on acknowledgements
// and the deadline, never polls.
func (l *EpochLoop) waitFinal(p *pipeline) error {
	for {
		l.mu.Lock()
		done, failure := l.prot.FinalDone()
		at, waiting := l.prot.FinalDeadline()
		l.mu.Unlock()
		switch {
		case done && failure == "":
			return nil
		case done:
			return errors.New(failure)
		case !waiting:
			return errors.New("the final epoch was abandoned")
		}
		if err := p.link.Err(); err != nil {
			return err
		}
		deadline := l.clk.NewTimer(max(at.Sub(l.clk.Now()), 0))
		select {
		case <-p.ctx.Done():
			deadline.Stop()
			return p.ctx.Err()
		case err := <-p.shipErr:
			deadline.Stop()
			p.shipDead = true
			return err
		case <-p.link.Done(): // Err says why, above
		case <-l.progress:
		case <-deadline.C():
			l.step(ProtectionEvent{Kind: EvTick, Now: l.clk.Now()})
		}
		deadline.Stop()
	}
}

// testHookShip, if set (tests only), runs in the shipper before it encodes
// each captured epoch, so a test can make shipping slower than capturing
// or damage an epoch after its digest was taken.
var testHookShip func(gateEpoch uint64, cp *precopy.Capture)

// shipper encodes and sends captured epochs in order.
func (l *EpochLoop) shipper(ctx context.Context, link *replica.Link, sender *precopy.LiveSender, ship <-chan job, free chan<- []byte) error {
	w := link.Writer()
	var bypasses uint64 // w's, counted into l.cacheBypasses
	for j := range ship {
		cp := j.cp
		if testHookShip != nil {
			testHookShip(j.gateEpoch, cp)
		}
		t0 := time.Now()
		l.observe(PhaseQueue, j.capturedAt, l.clk.Now().Sub(j.capturedAt))
		wire0 := link.BytesSent()
		err := w.WritePages(cp.Pages)
		if err == nil && len(cp.Disk) > 0 {
			err = w.WriteDisk(cp.Disk)
		}
		if err == nil {
			err = w.WriteDevices(cp.State)
		}
		t1 := time.Now()
		l.observe(PhaseEncode, t0, t1.Sub(t0))
		// Register the flight before the epoch can be acknowledged.
		epoch := sender.Epoch() + 1
		l.step(ProtectionEvent{Kind: EvShipping, Epoch: epoch, Now: l.clk.Now(),
			Flight: Flight{GateEpoch: j.gateEpoch, Digest: j.digest, PausedAt: cp.PausedAt}})
		if err == nil {
			_, err = sender.EndEpoch()
		}
		wire := link.BytesSent() - wire0
		if err == nil {
			l.noteSent(epoch, l.clk.Now(), wire)
		}
		l.observe(PhaseSend, t1, time.Since(t1))
		l.observe(PhaseShip, t0, time.Since(t0))
		if err == nil {
			free <- precopy.ReserveCapture(cp.Buffer, len(cp.Pages))
		} else {
			free <- cp.Buffer
		}
		if err != nil {
			return fmt.Errorf("ship epoch %d: %w", epoch, err)
		}
		l.mu.Lock()
		l.shipped = epoch
		l.cacheBypasses += w.CacheBypasses() - bypasses
		bypasses = w.CacheBypasses()
		l.wireBytes += wire
		l.thr.win.ShippedBytes += wire
		l.thr.win.ShippedRun += j.run
		l.mu.Unlock()
	}
	return nil
}
