package etcdcoord

import (
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/clock"
	"github.com/tandemvm/tandem/internal/trust"
)

// Errors. Each refusal wraps one of them.
var (
	// ErrConfig: a bad setting (named in the message).
	ErrConfig = errors.New("etcd coordinator: bad configuration")
	// ErrWrongCluster: the prefix belongs to another cluster, or this
	// node's data directory to another prefix.
	ErrWrongCluster = errors.New("etcd coordinator: the prefix belongs to another cluster")
	// ErrInUse: a third guest-capable node, or this ID held by a node
	// with another data directory.
	ErrInUse = errors.New("etcd coordinator: node id in use")
	// ErrClosed: the coordinator was closed.
	ErrClosed = errors.New("etcd coordinator: closed")
	// ErrNotPrimary: an operation only the active primary may do.
	ErrNotPrimary = errors.New("etcd coordinator: not the active primary")
)

// Defaults. The lease must outlast an etcd leader election: while etcd
// has no leader a keepalive gets no answer, and a primary whose last
// answered keepalive is more than lease - margin old fences itself. At
// etcd's default timings (100 ms ticks, 1 s election timeout, randomized
// up to 2 s) one election takes 1-2 s and a split vote needs a second
// one. A 5 s lease leaves 5 - 0.5 (margin) - 0.5 (keepalive period) = 4 s
// after the last keepalive that may have been answered: two worst-case
// elections. The 2 s lease used before left 1.5 s and a killed etcd
// leader fenced the primary in 2 of 3 runs. The price is RTO: the
// secondary takes over only once etcd expired the dead primary's lease,
// so a kill -9 costs about the lease (5 s rather than 2 s). An etcd with
// a shorter election timeout may run a shorter --etcd-lease (etcd raises
// a lease shorter than 1.5 election timeouts to that, rounded up to whole
// seconds; the coordinator uses the TTL etcd answers). A keepalive every
// half second renews it several times before the margin runs out, so
// one slow answer on a loaded etcd does not fence a healthy primary.
const (
	DefaultLeaseTTL    = 5 * time.Second
	DefaultMargin      = 500 * time.Millisecond
	DefaultKeepAlive   = 500 * time.Millisecond
	DefaultCallTimeout = time.Second
	DefaultTick        = 50 * time.Millisecond
)

// Config configures a Coordinator.
type Config struct {
	// Endpoints are the etcd client URLs (http:// or https://).
	Endpoints []string
	// Cluster names the protected guest; its keys are under
	// /tandem/<Cluster>/.
	Cluster string
	// Self is this node: ID, Role (primary or secondary: the configured
	// one boots a fresh cluster's guest), DataAddr, APIAddr, ConsoleAddr.
	Self failover.NodeInfo
	// IdentityFile keeps the cluster identity this node joined (created
	// on the first start, private). A node whose file names another
	// identity than the prefix holds is refused.
	IdentityFile string
	// TLS, if set, is this node's certificate and CA for etcd's client
	// port (mutual TLS; etcd's certificate must chain to the CA).
	TLS *trust.Identity
	// Insecure lets a plaintext client reach a non-loopback etcd.
	Insecure bool
	// LeaseTTL is the etcd lease's time to live (whole seconds, at least
	// 1 s); Margin how long before the locally measured end of the lease
	// this node stops releasing; KeepAlive how often it renews.
	LeaseTTL, Margin, KeepAlive time.Duration
	// CallTimeout bounds every etcd call.
	CallTimeout time.Duration
	// DataTimeout, EpochInterval, RetryInterval: as failover.Tuning (zero:
	// failover's defaults; a negative DataTimeout disables the mark).
	DataTimeout, EpochInterval, RetryInterval time.Duration
	// Tick is the decision loop's period.
	Tick   time.Duration
	Logger *slog.Logger
	Clock  clock.Clock
}

// validCluster is what a cluster name may be: one path segment of the key
// prefix.
var validCluster = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)

// withDefaults checks c and fills in defaults.
func (c Config) withDefaults() (Config, error) {
	switch {
	case len(c.Endpoints) == 0:
		return c, fmt.Errorf("%w: --etcd-endpoints is empty: want URL,URL,...", ErrConfig)
	case !validCluster.MatchString(c.Cluster) || c.Cluster == "." || c.Cluster == "..":
		return c, fmt.Errorf("%w: --cluster %q: want 1-64 of A-Z a-z 0-9 _ . -", ErrConfig, c.Cluster)
	case !validCluster.MatchString(c.Self.ID):
		return c, fmt.Errorf("%w: --id %q: want 1-64 of A-Z a-z 0-9 _ . -", ErrConfig, c.Self.ID)
	case c.Self.Role != failover.RolePrimary && c.Self.Role != failover.RoleSecondary:
		return c, fmt.Errorf("%w: role %q: want primary or secondary (etcd needs no witness)", ErrConfig, c.Self.Role)
	case c.IdentityFile == "":
		return c, fmt.Errorf("%w: no identity file (--data-dir)", ErrConfig)
	}
	if err := nodeOf(c.Self).check("--data"); err != nil {
		return c, fmt.Errorf("%w: %v", ErrConfig, err) // the peer would refuse the record
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.LeaseTTL, DefaultLeaseTTL)
	def(&c.Margin, DefaultMargin)
	def(&c.KeepAlive, DefaultKeepAlive)
	def(&c.CallTimeout, DefaultCallTimeout)
	def(&c.DataTimeout, failover.DefaultDataTimeout)
	def(&c.EpochInterval, failover.DefaultEpochInterval)
	def(&c.RetryInterval, failover.DefaultRetryInterval)
	def(&c.Tick, DefaultTick)
	switch {
	case c.LeaseTTL < time.Second || c.LeaseTTL%time.Second != 0 || c.LeaseTTL > time.Hour:
		return c, fmt.Errorf("%w: --etcd-lease %v: want whole seconds from 1s to 1h", ErrConfig, c.LeaseTTL)
	case c.Margin <= 0 || c.Margin >= c.LeaseTTL/2:
		return c, fmt.Errorf("%w: lease margin %v: want more than 0 and less than half the lease (%v)", ErrConfig, c.Margin, c.LeaseTTL)
	case c.KeepAlive <= 0 || c.KeepAlive > (c.LeaseTTL-c.Margin)/2:
		return c, fmt.Errorf("%w: keepalive interval %v: want more than 0 and at most half of lease minus margin (%v)", ErrConfig, c.KeepAlive, (c.LeaseTTL-c.Margin)/2)
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	c.Clock = clock.Or(c.Clock)
	return c, nil
}

// Check reports the first bad setting (ErrConfig, naming its flag)
// without connecting: what Open would refuse before it dials. The
// identity file is not checked (the caller fills it in).
func (c Config) Check() error {
	if c.IdentityFile == "" {
		c.IdentityFile = "unchecked"
	}
	c, err := c.withDefaults()
	if err == nil {
		_, err = endpointsTLS(c)
	}
	return err
}
