package failover

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/tandemvm/tandem/internal/clock"
	"github.com/tandemvm/tandem/internal/trust"
)

// PrimaryWait is how long a data connection whose certificate names a
// node that could be primary (not this node, not a witness) waits for
// this node's record to name it primary: a new primary may dial before
// its promotion has reached here.
const PrimaryWait = 3 * time.Second

// AdmitPrimary is the data port's check of a connection that says it
// comes from the primary, for every coordinator: over TLS, its
// certificate must name the node state's record calls primary; one
// naming another member that could become primary (or, while the record
// has no members yet, one that candidate accepts; nil: none) is given
// PrimaryWait for the record to catch up; anything else is refused.
// Plaintext connections pass: the secondary's generation check still
// applies to them.
func AdmitPrimary(ctx context.Context, clk clock.Clock, conn net.Conn, self string, state func() FSMState, candidate func(names []string) bool) error {
	if _, isTLS := conn.(*tls.Conn); !isTLS {
		return nil
	}
	clk = clock.Or(clk)
	// A verified certificate that names no node (no CN, no DNS SAN) is
	// refused below like one naming a non-member: it must not pass as
	// plaintext.
	names := trust.PeerNames(conn)
	deadline := clk.Now().Add(PrimaryWait)
	for {
		st := state()
		if st.Primary != "" && st.Primary != self && slices.Contains(names, st.Primary) {
			return nil
		}
		may := len(st.Members) == 0 && candidate != nil && candidate(names)
		for _, mem := range st.Members {
			may = may || (mem.Role != RoleWitness && mem.ID != self && slices.Contains(names, mem.ID))
		}
		if !may || clk.Now().After(deadline) || clock.Sleep(ctx, clk, 50*time.Millisecond) != nil {
			name, _ := trust.PeerName(conn)
			return fmt.Errorf("%w: a primary connection from %q, but the cluster's primary is %q (generation %d)", trust.ErrPeer, name, st.Primary, st.Generation)
		}
	}
}

// SecondaryName is the node whose data address addr is, in st (not this
// node, not a witness): a primary expects the secondary's certificate to
// name it. An address no member registered gets the record's secondary;
// with none, a name no certificate carries (refused).
func SecondaryName(st FSMState, self, addr string) string {
	for _, mem := range st.Members {
		if mem.DataAddr == addr && mem.Role != RoleWitness && mem.ID != self {
			return mem.ID
		}
	}
	if sec, ok := st.Secondary(); ok {
		return sec.ID
	}
	return self + "'s secondary (unknown)"
}
