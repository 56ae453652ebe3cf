package failover

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"github.com/tandemvm/tandem/internal/clock"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/internal/vfs"
	"log/slog"
	"net"
	"slices"
	"sort"
	"strings"
	"time"
)

// Default timings. With these, a follower notices a dead leader after
// 300-600 ms, and failover (election, promotion, activation) completes
// under a second on a LAN. A 100 ms lease (with 200 ms heartbeats) fenced
// healthy primaries on a loaded 2-core machine: one late round of
// majority contact is enough to expire it.
const (
	DefaultHeartbeatTimeout   = 300 * time.Millisecond
	DefaultElectionTimeout    = 300 * time.Millisecond
	DefaultLeaderLeaseTimeout = 150 * time.Millisecond
	DefaultDataTimeout        = 500 * time.Millisecond
	DefaultEpochInterval      = 100 * time.Millisecond
	DefaultRetryInterval      = 100 * time.Millisecond
	DefaultApplyTimeout       = time.Second
)

// Config configures a Node.
type Config struct {
	// ID names this node; it must be a key of Peers.
	ID string
	// ClusterID names the trio. A data directory, or a peer, of another
	// cluster is refused. Empty: derived from Peers.
	ClusterID string
	// Role is this node's configured role. Exactly one node of a new
	// cluster should be RolePrimary; it becomes the first primary.
	Role Role
	// RaftAddr is the host:port this node listens on for raft and
	// registration, as the peers dial it. Empty: Peers[ID].
	RaftAddr string
	// DataAddr, APIAddr and ConsoleAddr are replicated to the other nodes
	// (empty for a witness). Failover never dials them.
	DataAddr, APIAddr, ConsoleAddr string
	// Peers maps every voter's ID, this node included, to its raft address.
	// At least three voters.
	Peers map[string]string
	// DataDir holds the raft log, snapshots and identity files.
	DataDir string
	// FS holds the identity files (nil: the real file system). raft.db
	// (raft-boltdb) and the snapshots (raft's file store) are always on
	// the real file system: they cannot go through internal/vfs, and
	// rely on their own fsyncs (docs/DURABILITY.md).
	FS vfs.FS

	// TLS, if set, makes the raft port mutual TLS against the cluster CA:
	// every raft and registration connection, in both directions, must
	// present a certificate of the CA naming a member (see
	// internal/trust). Nil: plaintext, which Open allows on a loopback
	// RaftAddr only unless Insecure.
	TLS      *trust.Identity
	Insecure bool

	// Raft timings; zero means the default. All nodes of a trio must use
	// the same values. ElectionTimeout must be at least HeartbeatTimeout.
	// A witness runs with half the HeartbeatTimeout and twice the
	// ElectionTimeout: it stops backing a dead leader first, so it is
	// already free to vote when the secondary asks, and its own candidacy
	// retries late, so the secondary normally wins. LeaderLeaseTimeout must
	// not exceed HeartbeatTimeout/2 (the witness's heartbeat timeout): no
	// voter may stop backing a leader before that leader's lease ends.
	HeartbeatTimeout, ElectionTimeout, LeaderLeaseTimeout time.Duration
	// DataTimeout: see Tuning. Zero means DefaultDataTimeout; negative
	// disables the automatic MarkUnprotected.
	DataTimeout time.Duration
	// EpochInterval, RetryInterval: see Tuning. Zero means the default.
	EpochInterval, RetryInterval time.Duration
	// ApplyTimeout bounds every raft apply. Zero means the default.
	ApplyTimeout time.Duration

	// Logger receives the node's and raft's logs. Nil discards them.
	Logger *slog.Logger
	// Clock is the time source for the lease, elections and Decide; nil
	// means clock.Real. Tests of Decide pass times directly.
	Clock clock.Clock
}

// withDefaults validates c and fills in defaults.
func (c Config) withDefaults() (Config, error) {
	if c.ID == "" {
		return c, fmt.Errorf("%w: empty node ID", ErrConfig)
	}
	if !c.Role.Valid() {
		return c, fmt.Errorf("%w: role %q (want primary, secondary or witness)", ErrConfig, c.Role)
	}
	if len(c.Peers) < 3 {
		return c, fmt.Errorf("%w: %d peers; a trio needs at least 3 voters", ErrConfig, len(c.Peers))
	}
	addrs := map[string]string{}
	for id, a := range c.Peers {
		if id == "" || a == "" {
			return c, fmt.Errorf("%w: peer %q with address %q", ErrConfig, id, a)
		}
		if other, dup := addrs[a]; dup {
			return c, fmt.Errorf("%w: peers %s and %s share raft address %s", ErrConfig, other, id, a)
		}
		addrs[a] = id
	}
	self, ok := c.Peers[c.ID]
	if !ok {
		return c, fmt.Errorf("%w: node ID %s is not among the peers", ErrConfig, c.ID)
	}
	if c.RaftAddr == "" {
		c.RaftAddr = self
	}
	if c.RaftAddr != self {
		return c, fmt.Errorf("%w: raft address %s, but peers list %s for %s", ErrConfig, c.RaftAddr, self, c.ID)
	}
	if c.DataDir == "" {
		return c, fmt.Errorf("%w: empty data dir", ErrConfig)
	}
	if err := trust.CheckListen(c.TLS, c.Insecure, "--raft", c.RaftAddr); err != nil {
		return c, err
	}
	if c.TLS != nil {
		if err := checkOwnCert(c.TLS, c.ID, c.Peers); err != nil {
			return c, err
		}
	}
	if c.ClusterID == "" {
		c.ClusterID = deriveClusterID(c.Peers)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.HeartbeatTimeout, DefaultHeartbeatTimeout)
	def(&c.ElectionTimeout, DefaultElectionTimeout)
	def(&c.LeaderLeaseTimeout, DefaultLeaderLeaseTimeout)
	def(&c.DataTimeout, DefaultDataTimeout)
	def(&c.EpochInterval, DefaultEpochInterval)
	def(&c.RetryInterval, DefaultRetryInterval)
	def(&c.ApplyTimeout, DefaultApplyTimeout)
	if c.LeaderLeaseTimeout > c.HeartbeatTimeout/2 {
		return c, fmt.Errorf("%w: leader lease %s exceeds half the heartbeat timeout %s (the witness's heartbeat timeout): the lease would outlive the followers' loyalty", ErrConfig, c.LeaderLeaseTimeout, c.HeartbeatTimeout)
	}
	if c.ElectionTimeout < c.HeartbeatTimeout {
		return c, fmt.Errorf("%w: election timeout %s below heartbeat timeout %s", ErrConfig, c.ElectionTimeout, c.HeartbeatTimeout)
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	c.Clock = clock.Or(c.Clock)
	return c, nil
}

// checkOwnCert refuses a certificate that would not name this node to its
// peers: it must name id, and no other member (peers refuse a certificate
// naming several members).
func checkOwnCert(id *trust.Identity, self string, peers map[string]string) error {
	certs := id.ServerTLS().Certificates
	if len(certs) == 0 || certs[0].Leaf == nil {
		return fmt.Errorf("%w: --tls-cert: no parsed certificate", ErrConfig)
	}
	leaf := certs[0].Leaf
	names := append([]string{leaf.Subject.CommonName}, leaf.DNSNames...)
	var members []string
	for _, n := range names {
		if _, ok := peers[n]; ok && !slices.Contains(members, n) {
			members = append(members, n)
		}
	}
	if len(members) != 1 || members[0] != self {
		return fmt.Errorf("%w: --tls-cert names %s (members among them: %v); node %s needs a certificate naming %s and no other member (tandem certs issue --name %s)",
			ErrConfig, strings.Join(names, ","), members, self, self, self)
	}
	return nil
}

// deriveClusterID names a cluster by its voters, so two trios configured
// with different peers never share data directories by accident.
func deriveClusterID(peers map[string]string) string {
	ids := make([]string, 0, len(peers))
	for id := range peers {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	h := sha256.New()
	for _, id := range ids {
		fmt.Fprintf(h, "%s=%s\n", id, peers[id])
	}
	return "peers-" + hex.EncodeToString(h.Sum(nil))[:16]
}

// ParsePeers reads --peers, ID=HOST:PORT,ID=HOST:PORT,..., into
// Config.Peers: three voters or more, no id twice.
func ParsePeers(s string) (map[string]string, error) {
	peers := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		id, addr, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || id == "" {
			return nil, fmt.Errorf("--peers %q: want ID=HOST:PORT,ID=HOST:PORT,ID=HOST:PORT", s)
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, fmt.Errorf("--peers: %s=%q: want HOST:PORT", id, addr)
		}
		if _, dup := peers[id]; dup {
			return nil, fmt.Errorf("--peers: id %q appears twice", id)
		}
		peers[id] = addr
	}
	if len(peers) < 3 {
		return nil, fmt.Errorf("--peers: %d voters; a cluster is a primary, a secondary and a witness (3)", len(peers))
	}
	return peers, nil
}
