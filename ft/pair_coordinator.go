package ft

import (
	"context"
	"errors"
	"net"
	"sync"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/trust"
)

// ErrNoSwitchover: a pair without raft has nobody to hand the guest over
// through; its secondary is activated by hand (POST /activate).
var ErrNoSwitchover = errors.New("a pair without raft has no switchover: stop the primary, then activate the secondary")

// PairCoordinator is the Coordinator of a pair without raft: two nodes
// and an operator. The primary runs the guest it booted at once; the
// secondary runs it only when activated (POST /activate, which asks the
// driver directly). Nothing is recorded anywhere: output is released on
// the secondary's acknowledgements alone, and a primary learns that its
// secondary was activated from the secondary itself (the epoch loop
// fences itself on the refusal). Generations do not exist: always 0.
type PairCoordinator struct {
	primaryName string
	events      chan failover.Event

	// mu guards the fields below.
	mu       sync.Mutex
	primary  bool   // this node runs the guest it has (a pair primary)
	promoted bool   // told the driver so
	secAddr  string // the secondary's data address ("": none)
	secName  string // the node the secondary's certificate must name ("": any of the CA)
}

var _ Coordinator = (*PairCoordinator)(nil)

// NewPairPrimary is the coordinator of a pair's primary: it makes the
// driver primary as soon as it has a live guest, protected by the
// secondary at secAddr (""; none yet), whose certificate must name
// secName ("": any of the CA).
func NewPairPrimary(secAddr, secName string) *PairCoordinator {
	return &PairCoordinator{primary: true, secAddr: secAddr, secName: secName, events: make(chan failover.Event, 1)}
}

// NewPairSecondary is the coordinator of a pair's secondary, which admits
// data connections whose certificate names primaryName ("": any of the
// CA).
func NewPairSecondary(primaryName string) *PairCoordinator {
	return &PairCoordinator{primaryName: primaryName, events: make(chan failover.Event, 1)}
}

// ID names the node in logs: a pair has no node names.
func (p *PairCoordinator) ID() string { return "self" }

// WaitSynced returns at once: there is nothing to catch up with.
func (p *PairCoordinator) WaitSynced(context.Context) error { return nil }

// State is empty: generation 0, no recorded primary (so nothing ever
// supersedes this node's guest), never recorded protected.
func (p *PairCoordinator) State() failover.FSMState { return failover.FSMState{} }

// Events carries the primary's one promotion.
func (p *PairCoordinator) Events() <-chan failover.Event { return p.events }

// CanRelease is always true: the only fence of a pair is the epoch loop's
// own (its secondary said it was activated).
func (p *PairCoordinator) CanRelease(uint64) bool { return true }

// SetProtected records nothing.
func (p *PairCoordinator) SetProtected(context.Context, bool) error { return nil }

// ReportEpoch and DataHeartbeat record nothing.
func (p *PairCoordinator) ReportEpoch(uint64) {}
func (p *PairCoordinator) DataHeartbeat()     {}

// SetImage on a pair primary with a live guest makes it primary (once).
func (p *PairCoordinator) SetImage(img failover.Image) {
	p.mu.Lock()
	promote := p.primary && img.Live && !p.promoted
	p.promoted = p.promoted || promote
	p.mu.Unlock()
	if promote {
		p.events <- failover.Event{Kind: failover.EventBecamePrimary} // capacity 1, sent once
	}
}

// ClearImage records nothing.
func (p *PairCoordinator) ClearImage() {}

// Secondary is the data address given at start or by POST /protect.
func (p *PairCoordinator) Secondary() (failover.NodeInfo, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return failover.NodeInfo{ID: p.secName, DataAddr: p.secAddr}, p.secAddr != ""
}

// Switchover is refused: see ErrNoSwitchover.
func (p *PairCoordinator) Switchover(context.Context, string) error { return ErrNoSwitchover }

// SecondaryName is the name given at start or by the last POST /protect
// that gave one, whatever the address.
func (p *PairCoordinator) SecondaryName(string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.secName
}

// AdmitPrimary admits any certificate of the CA, or only one naming the
// configured primary.
func (p *PairCoordinator) AdmitPrimary(_ context.Context, conn net.Conn) error {
	if p.primaryName == "" {
		return nil
	}
	return trust.CheckPeer(conn, p.primaryName)
}

// setSecondary points the pair at a new secondary (POST /protect). A
// name of "" keeps the one given before: a check is never dropped by
// leaving it out. It returns the name now in force.
func (p *PairCoordinator) setSecondary(addr, name string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.secAddr = addr
	if name != "" {
		p.secName = name
	}
	return p.secName
}
