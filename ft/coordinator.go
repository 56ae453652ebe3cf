package ft

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/clock"
	"github.com/tandemvm/tandem/internal/trust"
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

// primaryWait is how long a data connection whose certificate names a
// member that could be primary (not this node, not the witness) waits for
// this node's view of raft to name it primary: a new primary may dial
// before its promotion has reached here.
const primaryWait = 3 * time.Second

// AdmitPrimary admits a primary's data connection over TLS only if its
// certificate names the node raft says is primary. One naming another
// member that may become primary (not the witness, not this node; any
// other voter while this node has applied no record yet) is given
// primaryWait for this node's raft state to catch up; anything else is
// refused at once. Plaintext connections (no TLS configured) pass:
// the secondary's generation check still applies to them.
func (c *RaftCoordinator) AdmitPrimary(ctx context.Context, conn net.Conn) error {
	if _, isTLS := conn.(*tls.Conn); !isTLS {
		return nil
	}
	clk := clock.Or(c.Clock)
	// A verified certificate that names no node (no CN, no DNS SAN) is
	// refused below like one naming a non-member: it must not pass as
	// plaintext.
	names := trust.PeerNames(conn)
	deadline := clk.Now().Add(primaryWait)
	for {
		st := c.State()
		if st.Primary != "" && st.Primary != c.ID() && slices.Contains(names, st.Primary) {
			return nil
		}
		candidate := false
		for _, mem := range st.Members {
			if mem.Role != failover.RoleWitness && mem.ID != c.ID() && slices.Contains(names, mem.ID) {
				candidate = true
			}
		}
		if len(st.Members) == 0 {
			// This node has not applied raft's record yet (it is
			// starting): any other voter may be the primary; wait for
			// the record rather than fail the primary's join, which
			// then backs off for seconds.
			for _, v := range c.Voters() {
				if v.ID != c.ID() && slices.Contains(names, v.ID) {
					candidate = true
				}
			}
		}
		if !candidate || clk.Now().After(deadline) || clock.Sleep(ctx, clk, 50*time.Millisecond) != nil {
			name, _ := trust.PeerName(conn)
			return fmt.Errorf("%w: a primary connection from %q, but the cluster's primary is %q (generation %d)", trust.ErrPeer, name, st.Primary, st.Generation)
		}
	}
}

// SecondaryName is the node whose data address addr is: the primary's
// epoch loop expects the secondary's certificate to name it. An address
// no member registered gets the name of the member raft calls secondary.
func (c *RaftCoordinator) SecondaryName(addr string) string {
	st := c.State()
	for _, mem := range st.Members {
		if mem.DataAddr == addr && mem.Role != failover.RoleWitness && mem.ID != c.ID() {
			return mem.ID
		}
	}
	if sec, ok := st.Secondary(); ok {
		return sec.ID
	}
	return c.ID() + "'s secondary (unknown)" // names no certificate: refused
}

// ClusterView is the raft part of a member's status; gen is the
// generation the member releases output under.
func (c *RaftCoordinator) ClusterView(gen uint64) *api.ClusterView {
	return clusterView(c.Node, c.CanRelease(gen))
}
