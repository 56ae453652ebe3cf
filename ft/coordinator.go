package ft

import (
	"context"
	"net"
	"slices"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/clock"
)

// Coordinator is who decides which node runs the guest: the calls the
// Member driver makes of it, and nothing else. A raft trio
// (RaftCoordinator) and a pair without raft (PairCoordinator) are the two
// implementations; the driver is the same for both.
//
// Every method may be called from any goroutine. CanRelease is called
// before every release of output and must take no lock that I/O holds and
// do no I/O; SetProtected and Switchover may block (on the context).
type Coordinator interface {
	// ID names this node.
	ID() string
	// WaitSynced returns once State reflects the cluster's decisions
	// (before it, a restarted node may read an old generation), or ctx's
	// error if ctx ends first.
	WaitSynced(ctx context.Context) error
	// State is the coordinator's record: generation, primary, whether the
	// secondary is in sync, the last committed epoch, the members.
	State() failover.FSMState
	// Events tells the driver of promotions, fences, a changed secondary
	// and a recorded loss of protection. Events are hints; CanRelease and
	// State are the authority.
	Events() <-chan failover.Event
	// CanRelease says whether output produced under generation gen may
	// leave now.
	CanRelease(gen uint64) bool
	// SetProtected records whether the secondary holds every
	// acknowledged epoch, and returns once it is recorded.
	SetProtected(ctx context.Context, protected bool) error
	// ReportEpoch says the secondary acknowledged epoch; DataHeartbeat
	// that the data channel heard from it now.
	ReportEpoch(epoch uint64)
	DataHeartbeat()
	// SetImage and ClearImage are this node's claim: the guest image it
	// could resume (a live guest, or a committed epoch of a generation),
	// or none.
	SetImage(img failover.Image)
	ClearImage()
	// Secondary is the node a primary ships its epochs to.
	Secondary() (failover.NodeInfo, bool)
	// Switchover hands the guest to the secondary once the final epoch
	// is reported; on failure this node (if it still may) is made primary
	// again by an event.
	Switchover(ctx context.Context, to string) error
	// SecondaryName is the node the secondary at data address addr must
	// be (with TLS, its certificate must name it; "": any of the CA).
	SecondaryName(addr string) string
	// AdmitPrimary admits a data connection that says it comes from the
	// primary, or says why not. It returns within its own bound, or when
	// ctx ends.
	AdmitPrimary(ctx context.Context, conn net.Conn) error
}

// RaftCoordinator is the raft trio's Coordinator: a failover.Node, with
// the data port's peer checks derived from its membership.
type RaftCoordinator struct {
	*failover.Node
	// Clock paces AdmitPrimary's wait (nil: the real clock).
	Clock clock.Clock
}

var _ Coordinator = (*RaftCoordinator)(nil)

// AdmitPrimary admits a primary's data connection by failover's rule
// (failover.AdmitPrimary); while this node has applied no raft record
// yet (it is starting), any other voter may be the primary: it waits for
// the record rather than fail the primary's join, which then backs off
// for seconds.
func (c *RaftCoordinator) AdmitPrimary(ctx context.Context, conn net.Conn) error {
	voter := func(names []string) bool {
		for _, v := range c.Voters() {
			if v.ID != c.ID() && slices.Contains(names, v.ID) {
				return true
			}
		}
		return false
	}
	return failover.AdmitPrimary(ctx, c.Clock, conn, c.ID(), c.State, voter)
}

// SecondaryName is the node whose data address addr is: the primary's
// epoch loop expects the secondary's certificate to name it.
func (c *RaftCoordinator) SecondaryName(addr string) string {
	return failover.SecondaryName(c.State(), c.ID(), addr)
}

// ClusterView is the raft part of a member's status; gen is the
// generation the member releases output under.
func (c *RaftCoordinator) ClusterView(gen uint64) *api.ClusterView {
	return clusterView(c.Node, c.CanRelease(gen))
}
