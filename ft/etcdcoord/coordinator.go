package etcdcoord

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/clock"
	"github.com/tandemvm/tandem/internal/trust"
)

// eventBuffer is the Events channel's capacity; the oldest event is
// dropped when the driver falls this far behind (events are hints).
const eventBuffer = 64

// leaseState is this node's etcd lease as measured here: granted as id,
// valid (as far as this node may assume) until deadline.
type leaseState struct {
	id       clientv3.LeaseID
	deadline time.Time     // start of the last answered grant or keepalive + TTL
	ttl      time.Duration // what the grant gave, at most maxLeaseTTL
}

// maxLeaseTTL bounds the TTL a grant may report (Config refuses a longer
// --etcd-lease): CanRelease trusts the deadline, so a wrong or hostile
// answer must not stretch it.
const maxLeaseTTL = time.Hour

// answeredTTL is an answer's TTL in seconds, bounded by limit (compared
// in seconds first: a huge answer would overflow a Duration).
func answeredTTL(seconds int64, limit time.Duration) time.Duration {
	if seconds > int64(limit/time.Second) {
		return limit
	}
	return time.Duration(seconds) * time.Second
}

// Coordinator is the etcd ft.Coordinator. All methods are safe for
// concurrent use.
type Coordinator struct {
	cfg      Config
	log      *slog.Logger
	clk      clock.Clock
	cli      *clientv3.Client
	leases   leaser // cli's, but for unit tests of renew
	keys     keys
	identity string // the cluster identity this node joined
	// watchFrom is the revision join read the prefix at, where the
	// watch starts (set before the loops start).
	watchFrom int64
	events    chan failover.Event
	requests  atomic.Uint64 // etcd requests sent (unary calls and stream messages)

	// Read without locks by CanRelease.
	snap         atomic.Pointer[snapshot]
	lease        atomic.Pointer[leaseState]
	active       atomic.Pointer[failover.Activation]
	transferring atomic.Int32
	closed       atomic.Bool

	// writeMu orders this node's writes of the record (writeState): held
	// across the etcd call, never taken with mu held.
	writeMu sync.Mutex
	// protSeq numbers the protection writes (SetProtected and the loop's
	// MarkUnprotected) as they are asked for; only the newest may change
	// the record's flag (writeProtected).
	protSeq atomic.Uint64

	// mu guards the decision loop's bookkeeping below. It is never held
	// across an etcd call.
	mu             sync.Mutex
	claimed        uint64 // generation this node's claim created, under term claimedTerm
	claimedTerm    uint64
	pending        failover.Pending
	campaigning    bool
	resigning      bool
	lastRegister   time.Time
	lastEpochApply time.Time
	reportedEpoch  uint64
	peerHeartbeat  time.Time
	announced      failover.NodeInfo
	image          *failover.Image
	// claims: what this node's claims did to its image's generation
	// (as failover.Node keeps it).
	claims         failover.ImageClaims
	standDownUntil time.Time // a switchover handed the lease away: no campaign before
	waiting        string    // why nobody serves, as this node sees it
	waitingSince   time.Time // when waiting last changed
	waitingLogged  string    // the reason last logged
	// unreadableLogged: the unreadable records last logged.
	unreadableLogged string

	wake chan struct{}
	stop chan struct{}
	// goMu guards stopping: once set, worker starts nothing, so wg.Wait
	// in Close is never raced by an Add.
	goMu      sync.Mutex
	stopping  bool
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// Open connects to etcd, checks that the prefix is this cluster's (or
// makes it so, on a fresh prefix) and reads it, then starts the lease and
// decision loops. While etcd cannot be reached it logs one line naming the
// endpoints and retries with backoff until ctx ends; a prefix of another
// cluster is refused (ErrWrongCluster, ErrInUse). It returns once this
// node's view is in sync: WaitSynced returns at once after it.
func Open(ctx context.Context, cfg Config) (*Coordinator, error) {
	c, err := newCoordinator(cfg)
	if err != nil {
		return nil, err
	}
	if err := c.join(ctx); err != nil {
		c.cli.Close()
		return nil, err
	}
	c.wg.Add(3)
	go c.leaseLoop()
	go c.watchLoop()
	go c.loop()
	return c, nil
}

// newCoordinator checks cfg and makes the etcd client (which connects
// lazily); it reads nothing and starts no loop.
func newCoordinator(cfg Config) (*Coordinator, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	tc, err := endpointsTLS(cfg)
	if err != nil {
		return nil, err
	}
	c := &Coordinator{cfg: cfg, log: cfg.Logger.With("coordinator", "etcd"), clk: cfg.Clock,
		keys: newKeys(cfg.Cluster), events: make(chan failover.Event, eventBuffer),
		wake: make(chan struct{}, 1), stop: make(chan struct{})}
	count := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		c.requests.Add(1)
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	countStream := func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		s, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return countingStream{ClientStream: s, n: &c.requests}, nil
	}
	c.cli, err = clientv3.New(clientv3.Config{Endpoints: cfg.Endpoints, TLS: tc, Logger: zap.NewNop(),
		DialKeepAliveTime: cfg.LeaseTTL, DialKeepAliveTimeout: cfg.CallTimeout,
		MaxCallRecvMsgSize: maxMessage,
		DialOptions: []grpc.DialOption{grpc.WithChainUnaryInterceptor(count), grpc.WithChainStreamInterceptor(countStream),
			// gRPC's default reconnect backoff grows to two minutes: after
			// an etcd outage a node would come back long after its lease
			// ran out. Retry at least every KeepAlive.
			grpc.WithConnectParams(grpc.ConnectParams{MinConnectTimeout: cfg.CallTimeout,
				Backoff: backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: cfg.KeepAlive}})}})
	if err != nil {
		return nil, fmt.Errorf("%w: --etcd-endpoints: %v", ErrConfig, err)
	}
	c.leases = c.cli
	return c, nil
}

// countingStream counts the messages a stream sends (a keepalive, a watch
// request).
type countingStream struct {
	grpc.ClientStream
	n *atomic.Uint64
}

func (s countingStream) SendMsg(m any) error {
	s.n.Add(1)
	return s.ClientStream.SendMsg(m)
}

// endpointsTLS checks the endpoints against the TLS settings: https with
// TLS, http without (loopback only unless Insecure), and makes the TLS
// configuration.
func endpointsTLS(cfg Config) (*tls.Config, error) {
	for _, e := range cfg.Endpoints {
		u, err := url.Parse(e)
		if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
			return nil, fmt.Errorf("%w: --etcd-endpoints %q: want http://HOST:PORT or https://HOST:PORT", ErrConfig, e)
		}
		if _, _, err := net.SplitHostPort(u.Host); err != nil {
			return nil, fmt.Errorf("%w: --etcd-endpoints %q: want http://HOST:PORT or https://HOST:PORT", ErrConfig, e)
		}
		switch {
		case u.Scheme == "https" && cfg.TLS == nil:
			return nil, fmt.Errorf("%w: --etcd-endpoints %q is https: give --tls-ca, --tls-cert and --tls-key", ErrConfig, e)
		case u.Scheme == "http" && cfg.TLS != nil:
			return nil, fmt.Errorf("%w: --etcd-endpoints %q is plaintext while --tls-* are given: use https://", ErrConfig, e)
		}
		if err := trust.CheckDial(cfg.TLS, cfg.Insecure, "--etcd-endpoints", u.Host); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrConfig, err)
		}
	}
	// etcd is addressed by host name or IP, so its certificate must name
	// the endpoint's host (the client sets the TLS server name per
	// endpoint): a certificate of the CA issued for another host cannot
	// pose as etcd.
	return cfg.TLS.ServiceClientTLS(), nil
}

// Requests is how many requests this node has sent etcd (for load
// figures: unary calls plus messages on streams).
func (c *Coordinator) Requests() uint64 { return c.requests.Load() }

// Close fences this node (CanRelease turns false at once), stops its
// loops, gives up the leader key and the lease (bounded by CallTimeout:
// the secondary then takes over without waiting for the lease to run
// out), and closes the client.
func (c *Coordinator) Close() error {
	c.closeOnce.Do(func() {
		// Under mu: a step holds mu from its closed check to its
		// actions, so none activates this node after the fence below.
		c.mu.Lock()
		c.closed.Store(true)
		a := c.active.Swap(nil)
		c.mu.Unlock()
		if a != nil {
			c.emit(failover.Event{Kind: failover.EventFenced, Generation: a.Generation, Reason: "node closed"})
		}
		close(c.stop)
		c.goMu.Lock()
		c.stopping = true
		c.goMu.Unlock()
		c.wg.Wait()
		if l := c.lease.Load(); l != nil {
			ctx, cancel := context.WithTimeout(context.Background(), c.cfg.CallTimeout)
			if _, err := c.cli.Revoke(ctx, l.id); err != nil {
				c.log.Info("could not revoke the etcd lease; it runs out by itself", "err", err)
			}
			cancel()
		}
		c.cli.Close()
		c.mu.Lock()
		close(c.events)
		c.mu.Unlock()
	})
	return nil
}

func (c *Coordinator) emit(e failover.Event) {
	if e.At.IsZero() {
		e.At = c.clk.Now()
	}
	c.log.Info("failover event", "kind", e.Kind.String(), "gen", e.Generation, "peer", e.Peer.ID, "reason", e.Reason)
	for {
		select {
		case c.events <- e:
			return
		default:
		}
		select {
		case <-c.events:
		default:
		}
	}
}

// endpointList names the endpoints in a log line.
func (c *Coordinator) endpointList() string { return strings.Join(c.cfg.Endpoints, ",") }
