package failover

import (
	"fmt"
	"time"
)

// Protection is the primary's protection state machine: which state the
// guest's protection is in, which epochs are in flight, how far output may
// be released, when a link is given up and when a switchover's final
// epoch is done. It is pure: the EpochLoop feeds it events (Step) and
// performs the actions it returns; it does no I/O, reads no clock (every
// event that needs the time carries it) and starts no goroutine, so the
// scripts in testdata/protection drive it step by step.
//
// States (Protection.State) and what moves them:
//
//	unprotected ──join-start──▶ joining
//	joining ──ack of a consistent epoch (verified, with Verify)──▶ protected
//	joining, protected ──link-down──▶ unprotected (release-held, backoff)
//	protected ──relink──▶ protected, until the link's end (link-down)
//	    brings unprotected; the join that follows re-syncs the secondary
//	joining, protected ──mismatch (or an ack's digest differs)──▶
//	    unprotected, the link diverged: nothing it acknowledges counts,
//	    relink; protection returns only through a fresh join
//	joining, protected ──tick past the ack deadline──▶ drop-link, then
//	    link-down as above
//	any ──fenced, or an ack saying Activated──▶ fenced: absorbing (discard
//	    output, end the link, pause the guest; final epochs refused)
//
// Held output follows from the state: the first pause on a link holds it
// (hold), acknowledged epochs release it up to their gate epoch
// (release), and entering any state but protected lets it out once the
// loss of protection is recorded (release-held). A fence discards it.
//
// Beside the state it keeps the link's epochs (last sent, highest
// acknowledged, when acknowledgements last moved), the flights (shipped
// consistent epochs waiting for their acknowledgement, each with the
// output-gate epoch it releases) and the final epoch of a switchover.
//
// Not safe for concurrent use: the EpochLoop steps it under its mutex and
// performs the actions after unlocking.
type Protection struct {
	cfg ProtectionConfig

	state string // StateUnprotected, StateJoining, StateProtected, StateFenced
	why   string
	addr  string // the current (or last) link's secondary

	// The current link. onLink: between join-start and link-down;
	// epochs: its catch-up is acknowledged and epochs are captured;
	// captured: an epoch's pause sealed output on it (output is held from
	// then on); diverged: its replica failed verification; dropped: the
	// ack deadline already dropped it.
	onLink, epochs, captured, diverged, dropped bool

	sent          uint64    // last stream epoch on the wire (catch-up included)
	acked         uint64    // highest epoch acknowledged
	ackAt         time.Time // when acked last moved (or the link started)
	outstandingAt time.Time // when sent last went past acked
	flights       map[uint64]Flight
	unshipped     int // captured, not yet registered as a flight

	committed uint64        // last acknowledged (and verified) consistent epoch
	retry     time.Duration // the last back-off; 0 starts afresh

	final         finalPhase
	finalDeadline time.Time
}

// ProtectionConfig is the tuning the state machine decides with.
type ProtectionConfig struct {
	// Verify: an acknowledgement's digest must equal the flight's.
	Verify bool
	// MaxInFlight bounds flights before a capture waits (back-pressure).
	MaxInFlight int
	// AckTimeout: while an epoch is outstanding, acknowledgements must
	// move within it or the link is dropped.
	AckTimeout time.Duration
	// FinalTimeout bounds the wait for a final epoch's acknowledgement.
	FinalTimeout time.Duration
}

// Flight is what the primary remembers of a shipped consistent epoch until
// the secondary acknowledges it.
type Flight struct {
	GateEpoch uint64    // the output-gate epoch its pause sealed
	Digest    string    // what the secondary's digest must be (Verify)
	PausedAt  time.Time // its pause, for the acknowledgement latency
}

type finalPhase int

const (
	finalNone     finalPhase = iota
	finalCapture             // accepted: the capture keeps the guest paused
	finalWaiting             // shipped: waiting for every flight's ack
	finalAcked               // done: the guest stays paused for the handover
	finalTimedOut            // not acknowledged in time
)

// ProtectionEventKind names a protection event.
type ProtectionEventKind int

// Protection events. Fields of ProtectionEvent that an event uses are named beside it.
const (
	EvNoSecondary      ProtectionEventKind = iota // none configured
	EvSecondaryChanged                            // SetSecondary asked for another: the back-off starts afresh
	EvJoinStart                                   // Addr, Epoch (last epoch number used), Now
	EvJoinDone                                    // the catch-up is acknowledged; epochs begin
	EvLinkDown                                    // Why (the link's error), Unreached: the link ended
	EvSent                                        // Epoch (last stream epoch on the wire), Now
	EvPause                                       // an epoch's pause, before its output is sealed
	EvCaptured                                    // the epoch was captured and goes to the shipper
	EvCaptureFailed                               // the capture failed and resumed the guest: a final epoch it was is over
	EvShipping                                    // Epoch, Flight: registered before its end is sent
	EvAck                                         // Epoch, Digest, Why (secondary's error), Activated, Sent (last epoch sent), Now
	EvMismatch                                    // Epoch, Why (detail), Now: verification found a page the secondary lacks
	EvRelink                                      // Why: the cluster recorded "unprotected" behind the link
	EvFinalRequested                              // a switchover asks for a final epoch
	EvFinalShipped                                // Now: the final epoch was handed to the shipper
	EvFinalAbandoned                              // the final epoch's handover will not happen (timed out, link failed, requester gone)
	EvTick                                        // Now: deadlines (acknowledgement, final epoch)
	EvFenced                                      // Why: the secondary was activated and runs the guest
)

var eventNames = [...]string{"no-secondary", "secondary-changed", "join-start", "join-done", "link-down", "sent",
	"pause", "captured", "capture-failed", "shipping", "ack", "mismatch", "relink", "final-requested", "final-shipped",
	"final-abandoned", "tick", "fenced"}

func (k ProtectionEventKind) String() string {
	if int(k) < len(eventNames) {
		return eventNames[k]
	}
	return fmt.Sprintf("event(%d)", int(k))
}

// ProtectionEvent is one input to Protection.Step.
type ProtectionEvent struct {
	Kind      ProtectionEventKind
	Now       time.Time
	Addr      string
	Epoch     uint64
	Sent      uint64
	Digest    string
	Why       string
	Activated bool
	Flight    Flight
	// Unreached, on EvLinkDown: the join never reached the secondary
	// (its connection was refused or timed out), so nothing was spent on
	// it and it is retried soon (see linkDown).
	Unreached bool
}

// ProtectionActionKind names what the EpochLoop must do.
type ProtectionActionKind int

// Protection actions; fields of ProtectionAction used are named beside each.
const (
	DoState        ProtectionActionKind = iota // State, Why: the protection state changed (status, log)
	DoProtected                                // Protected, Why: tell the cluster (OnProtected)
	DoReleaseHeld                              // record the loss of protection (Unprotect), then let held output out
	DoHold                                     // from this pause on, output waits for its epoch
	DoRelease                                  // Epoch: release output up to this gate epoch
	DoAcked                                    // Epoch, PausedAt: a consistent epoch acknowledged (latency)
	DoVerified                                 // Epoch: its digest matched
	DoCommitted                                // Epoch: tell raft (OnCommitted)
	DoMismatch                                 // Epoch, Why: the replica diverged (incident)
	DoIgnored                                  // Epoch, Why: an acknowledgement that counts for nothing, loudly
	DoRelink                                   // Why: drop the link; the rejoin re-syncs the secondary
	DoDropLink                                 // Why: fail the link now (acknowledgements stopped)
	DoBackoff                                  // Delay: wait before the next join
	DoFence                                    // Why: discard held output, refuse every release, end the link
	DoPause                                    // pause the guest and keep it paused (fenced)
	DoResume                                   // resume the guest an abandoned final epoch left paused
	DoRefuseFinal                              // Why: answer a final-epoch request with this error
	DoCaptureFinal                             // capture the final epoch with the guest left paused
	DoFinalAcked                               // the final epoch and all before it are acknowledged
	DoFinalFailed                              // Why: the final epoch was not acknowledged in time (abandon it)
)

var actionNames = [...]string{"state", "protected", "release-held", "hold", "release", "acked", "verified",
	"committed", "mismatch", "ignored", "relink", "drop-link", "backoff", "fence", "pause", "resume",
	"refuse-final", "capture-final", "final-acked", "final-failed"}

func (k ProtectionActionKind) String() string {
	if int(k) < len(actionNames) {
		return actionNames[k]
	}
	return fmt.Sprintf("action(%d)", int(k))
}

// ProtectionAction is one output of Protection.Step, to be performed in order.
type ProtectionAction struct {
	Kind      ProtectionActionKind
	State     string
	Protected bool
	Epoch     uint64
	PausedAt  time.Time
	Delay     time.Duration
	Why       string
}

func (a ProtectionAction) String() string {
	switch a.Kind {
	case DoState:
		return fmt.Sprintf("state %s: %s", a.State, a.Why)
	case DoProtected:
		return fmt.Sprintf("protected %v: %s", a.Protected, a.Why)
	case DoRelease, DoAcked, DoVerified, DoCommitted:
		return fmt.Sprintf("%s %d", a.Kind, a.Epoch)
	case DoMismatch, DoIgnored:
		return fmt.Sprintf("%s %d: %s", a.Kind, a.Epoch, a.Why)
	case DoBackoff:
		return fmt.Sprintf("backoff %v", a.Delay)
	case DoRelink, DoDropLink, DoFence, DoRefuseFinal, DoFinalFailed:
		return fmt.Sprintf("%s: %s", a.Kind, a.Why)
	}
	return a.Kind.String()
}

// Retry back-off between joins: doubling from backoffMin to backoffMax;
// up to unreachedBackoffMax only while the secondary's address does not
// take the connection (a restarting node: its next attempt must not be
// seconds after it listens).
const (
	backoffMin          = 200 * time.Millisecond
	backoffMax          = 5 * time.Second
	unreachedBackoffMax = 500 * time.Millisecond
)

// resyncing starts the resolution of a mismatch not yet resolved.
const resyncing = "re-syncing the secondary from scratch"

// NewProtection returns the machine of a guest that starts unprotected.
func NewProtection(cfg ProtectionConfig) *Protection {
	return &Protection{cfg: cfg, state: StateUnprotected, why: "no secondary yet", flights: map[uint64]Flight{}}
}

// State is the protection state and why.
func (p *Protection) State() (state, why string) { return p.state, p.why }

// Fenced reports whether the machine is fenced (for ever).
func (p *Protection) Fenced() bool { return p.state == StateFenced }

// Secondary is the current (or last) link's secondary.
func (p *Protection) Secondary() string { return p.addr }

// Committed is the last acknowledged, verified consistent epoch.
func (p *Protection) Committed() uint64 { return p.committed }

// InFlight is how many consistent epochs wait for their acknowledgement.
func (p *Protection) InFlight() int { return len(p.flights) }

// MayCapture says whether the in-flight window has room for an epoch.
func (p *Protection) MayCapture() bool { return len(p.flights) < p.cfg.MaxInFlight }

// AckDeadline is when the link is dropped unless acknowledgements move;
// ok is false while nothing is outstanding (no deadline).
func (p *Protection) AckDeadline() (at time.Time, ok bool) {
	if !p.onLink || p.dropped || p.sent <= p.acked {
		return time.Time{}, false
	}
	base := p.ackAt
	if p.outstandingAt.After(base) {
		base = p.outstandingAt
	}
	return base.Add(p.cfg.AckTimeout), true
}

// FinalDeadline is when a final epoch's wait gives up; ok is false
// while no final epoch is awaited.
func (p *Protection) FinalDeadline() (time.Time, bool) {
	return p.finalDeadline, p.final == finalWaiting
}

// FinalDone reports whether the final epoch's wait has ended, and if it
// failed, why ("" when it was acknowledged).
func (p *Protection) FinalDone() (done bool, failure string) {
	switch p.final {
	case finalAcked:
		return true, ""
	case finalTimedOut:
		return true, fmt.Sprintf("the secondary did not acknowledge the final epoch within %v", p.cfg.FinalTimeout)
	}
	return false, ""
}

// Step applies one event and returns what to do, in order.
func (p *Protection) Step(ev ProtectionEvent) []ProtectionAction {
	if p.state == StateFenced {
		return p.stepFenced(ev)
	}
	switch ev.Kind {
	case EvNoSecondary:
		p.endLink()
		return p.setState(nil, StateUnprotected, "no secondary configured")
	case EvSecondaryChanged:
		p.retry = 0
		return nil
	case EvJoinStart:
		p.endLink()
		p.onLink, p.addr = true, ev.Addr
		p.sent, p.acked, p.ackAt, p.outstandingAt = ev.Epoch, ev.Epoch, ev.Now, ev.Now
		return p.setState(nil, StateJoining, "connecting to "+ev.Addr)
	case EvJoinDone:
		if p.onLink {
			p.epochs = true
		}
		return nil
	case EvLinkDown:
		return p.linkDown(ev.Why, ev.Unreached)
	case EvSent:
		p.noteSent(ev.Epoch, ev.Now)
		return nil
	case EvPause:
		if !p.onLink || p.captured {
			return nil
		}
		p.captured = true
		return []ProtectionAction{{Kind: DoHold}}
	case EvCaptured:
		p.unshipped++
		return nil
	case EvCaptureFailed:
		if p.final == finalCapture {
			p.final = finalNone // the capture resumed the guest itself
		}
		return nil
	case EvShipping:
		p.unshipped = max(p.unshipped-1, 0)
		if p.onLink {
			p.flights[ev.Epoch] = ev.Flight
		}
		return nil
	case EvAck:
		return p.ack(ev)
	case EvMismatch:
		return p.diverge(ev.Epoch, ev.Why)
	case EvRelink:
		if p.state != StateProtected {
			return nil // joining or without a secondary: the join records protection
		}
		return []ProtectionAction{{Kind: DoRelink, Why: ev.Why}}
	case EvFinalRequested:
		return p.finalRequested()
	case EvFinalShipped:
		if p.final != finalCapture {
			return nil
		}
		p.final, p.finalDeadline = finalWaiting, ev.Now.Add(p.cfg.FinalTimeout)
		return p.checkFinal(nil)
	case EvFinalAbandoned:
		// Whatever stopped it (the wait timed out, the link failed, the
		// requester gave up), the guest a final capture left paused runs
		// on here: it is never left paused for a handover nobody takes.
		if p.final == finalNone {
			return nil
		}
		p.final = finalNone
		return []ProtectionAction{{Kind: DoResume}}
	case EvTick:
		return p.tick(ev.Now)
	case EvFenced:
		return p.fence(ev.Why)
	}
	return nil
}

// stepFenced: a fenced machine does nothing but refuse final epochs. The
// guest stays paused, nothing is released, no link is joined.
func (p *Protection) stepFenced(ev ProtectionEvent) []ProtectionAction {
	if ev.Kind == EvFinalRequested {
		return []ProtectionAction{{Kind: DoRefuseFinal, Why: "fenced: " + p.why}}
	}
	return nil
}

// setState moves to s. Any state but protected lets held output out once
// the loss of protection is recorded (DoReleaseHeld); the cluster hears
// only of changes into or out of protected.
func (p *Protection) setState(acts []ProtectionAction, s, why string) []ProtectionAction {
	old := p.state
	p.state, p.why = s, why
	if old != s {
		acts = append(acts, ProtectionAction{Kind: DoState, State: s, Why: why})
	}
	if s != StateProtected {
		acts = append(acts, ProtectionAction{Kind: DoReleaseHeld})
	}
	if (old == StateProtected) != (s == StateProtected) {
		acts = append(acts, ProtectionAction{Kind: DoProtected, Protected: s == StateProtected, Why: why})
	}
	return acts
}

// endLink forgets the link: its flights will never be acknowledged (a new
// link numbers its epochs afresh, and their output went out when
// protection was lost); left they would fill the in-flight window.
func (p *Protection) endLink() {
	p.onLink, p.epochs, p.captured, p.diverged, p.dropped = false, false, false, false, false
	clear(p.flights)
	p.unshipped = 0
	p.final, p.finalDeadline = finalNone, time.Time{}
}

// linkDown: run unprotected and retry with back-off. A link that got as
// far as protection starts the back-off afresh, or a flapping link would
// leave every later rejoin 5 s late. A join that never reached the
// secondary (unreached: connection refused or timed out) backs off to
// unreachedBackoffMax only: an attempt costs a dial, and the secondary
// is most likely a node restarting, which the old 5 s ceiling left
// unprotected for up to 5 s after it listened (issue 20: 2.7 to 12 s
// from a restart to protected).
func (p *Protection) linkDown(why string, unreached bool) []ProtectionAction {
	if p.state == StateProtected {
		p.retry = 0
	}
	p.endLink()
	acts := p.setState(nil, StateUnprotected, why)
	ceiling := backoffMax
	if unreached {
		ceiling = unreachedBackoffMax
	}
	p.retry = min(max(2*p.retry, backoffMin), ceiling)
	return append(acts, ProtectionAction{Kind: DoBackoff, Delay: p.retry})
}

func (p *Protection) noteSent(epoch uint64, now time.Time) {
	if !p.onLink || epoch <= p.sent {
		return
	}
	if p.sent <= p.acked {
		p.outstandingAt = now // something is outstanding from now
	}
	p.sent = epoch
}

// ack is one acknowledgement from the link's secondary.
func (p *Protection) ack(ev ProtectionEvent) []ProtectionAction {
	if ev.Activated {
		return p.fence("the secondary " + p.addr + " was activated and runs the guest")
	}
	if !p.onLink {
		return nil
	}
	p.noteSent(ev.Sent, ev.Now)
	if ev.Epoch > p.sent {
		// An acknowledgement of an epoch never sent must not let held
		// output out, nor count as progress (it would silence the
		// acknowledgement deadline of the epochs really outstanding).
		return []ProtectionAction{{Kind: DoIgnored, Epoch: ev.Epoch, Why: fmt.Sprintf("never sent (last sent %d)", p.sent)}}
	}
	if ev.Epoch > p.acked {
		p.acked, p.ackAt = ev.Epoch, ev.Now
	}
	if ev.Why != "" {
		// An answer all the same: it counts as progress (the secondary
		// is not silent), but releases nothing.
		return []ProtectionAction{{Kind: DoIgnored, Epoch: ev.Epoch, Why: "the secondary reported an error: " + ev.Why}}
	}
	var release uint64
	fl, found := Flight{}, false
	for e, f := range p.flights {
		if e <= ev.Epoch {
			release = max(release, f.GateEpoch)
			if e == ev.Epoch {
				fl, found = f, true
			}
			delete(p.flights, e)
		}
	}
	if !found {
		return p.checkFinal(nil) // a catch-up epoch, or a stale one: nothing to release
	}
	acts := []ProtectionAction{{Kind: DoAcked, Epoch: ev.Epoch, PausedAt: fl.PausedAt}}
	if p.diverged {
		// This link's replica is known to differ: what it acknowledges
		// protects nothing. Held output waits for the unprotected rules.
		return acts
	}
	if p.cfg.Verify && fl.Digest != ev.Digest {
		return append(acts, p.diverge(ev.Epoch, fmt.Sprintf("epoch %d: primary digest %s, secondary %s", ev.Epoch, fl.Digest, ev.Digest))...)
	}
	if p.cfg.Verify {
		acts = append(acts, ProtectionAction{Kind: DoVerified, Epoch: ev.Epoch})
	}
	p.committed = ev.Epoch
	if release > 0 {
		acts = append(acts, ProtectionAction{Kind: DoRelease, Epoch: release})
	}
	if p.state != StateProtected {
		why := fmt.Sprintf("epoch %d acknowledged", ev.Epoch)
		if p.cfg.Verify {
			why += " and verified"
		}
		acts = p.setState(acts, StateProtected, why)
	}
	acts = append(acts, ProtectionAction{Kind: DoCommitted, Epoch: ev.Epoch})
	return p.checkFinal(acts)
}

// diverge is a replica that does not match: an incident. The link's
// secondary stops counting as a replica at once (unprotected; nothing it
// acknowledges releases output or reaches raft) and the link is dropped:
// the rejoin builds a fresh image on the secondary from a full sync.
// Held output is let out only by the link's end (unprotected rules).
func (p *Protection) diverge(epoch uint64, detail string) []ProtectionAction {
	if p.diverged || !p.onLink {
		return nil
	}
	p.diverged = true
	why := fmt.Sprintf("replica digest mismatch at epoch %d: %s", epoch, resyncing)
	acts := []ProtectionAction{{Kind: DoMismatch, Epoch: epoch, Why: detail}}
	old := p.state
	p.state, p.why = StateUnprotected, why
	acts = append(acts, ProtectionAction{Kind: DoState, State: StateUnprotected, Why: why})
	if old == StateProtected {
		acts = append(acts, ProtectionAction{Kind: DoProtected, Protected: false, Why: why})
	}
	return append(acts, ProtectionAction{Kind: DoRelink, Why: why})
}

func (p *Protection) finalRequested() []ProtectionAction {
	switch {
	case !p.onLink:
		return []ProtectionAction{{Kind: DoRefuseFinal, Why: "not protected: no secondary to hand over to"}}
	case !p.epochs || !p.captured:
		return []ProtectionAction{{Kind: DoRefuseFinal, Why: "not protected yet: the secondary is still catching up"}}
	case p.final != finalNone:
		return []ProtectionAction{{Kind: DoRefuseFinal, Why: "a final epoch is already under way"}}
	}
	p.final = finalCapture
	return []ProtectionAction{{Kind: DoCaptureFinal}}
}

// checkFinal ends a final epoch's wait once nothing captured waits for
// its acknowledgement.
func (p *Protection) checkFinal(acts []ProtectionAction) []ProtectionAction {
	if p.final == finalWaiting && len(p.flights) == 0 && p.unshipped == 0 {
		p.final = finalAcked
		acts = append(acts, ProtectionAction{Kind: DoFinalAcked})
	}
	return acts
}

// tick checks the deadlines at now.
func (p *Protection) tick(now time.Time) []ProtectionAction {
	var acts []ProtectionAction
	if at, ok := p.AckDeadline(); ok && !now.Before(at) {
		p.dropped = true
		acts = append(acts, ProtectionAction{Kind: DoDropLink, Why: fmt.Sprintf(
			"no acknowledgement from the secondary at %s for %v (epoch %d sent, %d acknowledged): link dropped, retrying",
			p.addr, p.cfg.AckTimeout.Round(time.Millisecond), p.sent, p.acked)})
	}
	if p.final == finalWaiting && !now.Before(p.finalDeadline) {
		p.final = finalTimedOut
		_, why := p.FinalDone()
		acts = append(acts, ProtectionAction{Kind: DoFinalFailed, Why: why})
	}
	return acts
}

// fence: the secondary says it was activated and runs the guest. From now
// on nothing leaves (held output is discarded, every release refused),
// the link ends and the guest is paused and kept paused. There is no way
// back but a restart: the other node's guest is the one that runs.
func (p *Protection) fence(why string) []ProtectionAction {
	old := p.state
	p.endLink()
	p.state, p.why = StateFenced, why
	acts := []ProtectionAction{{Kind: DoState, State: StateFenced, Why: why}, {Kind: DoFence, Why: why}}
	if old == StateProtected {
		acts = append(acts, ProtectionAction{Kind: DoProtected, Protected: false, Why: why})
	}
	return append(acts, ProtectionAction{Kind: DoPause})
}
