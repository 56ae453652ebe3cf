package etcdcoord

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/etcdlab"
	"github.com/tandemvm/tandem/test/linkproxy"
)

// etcdLeaks are the goroutines a closed embedded etcd cluster leaves:
// its members' peer connections (etcd's rafthttp speaks HTTP/1.1 with
// keep-alive between members, and closing a member does not close the
// connections its peers opened to it; they sit idle on both ends). This
// package runs no HTTP server or client of its own (the coordinator talks
// gRPC), so every net/http connection goroutine left at the end is one of
// those.
func etcdLeaks() []goleak.Option {
	return []goleak.Option{
		goleak.IgnoreAnyFunction("net/http.(*conn).serve"),
		goleak.IgnoreAnyFunction("net/http.(*connReader).backgroundRead"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"),
	}
}

// startEtcd runs a 3-member etcd cluster for the test (fast elections:
// 50 ms ticks, 500 ms election timeout), stopped when the test ends.
func startEtcd(t *testing.T) *etcdlab.Cluster {
	t.Helper()
	return startEtcdTimed(t, 50, 500)
}

// startEtcdTimed is startEtcd with etcd's tick and election timeout (0,
// 0: etcd's defaults, 100 ms and 1 s).
func startEtcdTimed(t *testing.T, tickMs, electionMs uint) *etcdlab.Cluster {
	t.Helper()
	c, err := etcdlab.Start(etcdlab.Config{Members: 3, Dir: t.TempDir(), TickMs: tickMs, ElectionMs: electionMs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// shared is the etcd cluster most tests share, each under a cluster name
// of its own (a prefix): one start instead of one per test. TestMain
// closes it.
var shared struct {
	once sync.Once
	c    *etcdlab.Cluster
	dir  string
	err  error
	n    atomic.Int64
}

// sharedEtcd is the shared cluster and a fresh cluster name.
func sharedEtcd(t *testing.T) (*etcdlab.Cluster, string) {
	t.Helper()
	shared.once.Do(func() {
		if shared.dir, shared.err = os.MkdirTemp("", "etcdcoord-test-"); shared.err == nil {
			shared.c, shared.err = etcdlab.Start(etcdlab.Config{Members: 3, Dir: shared.dir, TickMs: 50, ElectionMs: 500})
		}
	})
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return shared.c, fmt.Sprintf("t%d", shared.n.Add(1))
}

// closeShared stops the shared cluster, if it was started.
func closeShared() {
	if shared.c != nil {
		shared.c.Close()
	}
	if shared.dir != "" {
		os.RemoveAll(shared.dir)
	}
}

// proxied puts a linkproxy in front of every endpoint: the node's path to
// etcd, which Partition black-holes.
type proxied struct{ ps []*linkproxy.Proxy }

func proxyEtcd(t *testing.T, c *etcdlab.Cluster) *proxied {
	t.Helper()
	p := &proxied{}
	for _, e := range c.Endpoints() {
		u, _ := url.Parse(e)
		px, err := linkproxy.Start("127.0.0.1:0", u.Host, linkproxy.Shape{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { px.Close() })
		p.ps = append(p.ps, px)
	}
	return p
}

func (p *proxied) endpoints() []string {
	var out []string
	for _, px := range p.ps {
		out = append(out, "http://"+px.Addr())
	}
	return out
}

func (p *proxied) partition(on bool) {
	for _, px := range p.ps {
		px.Partition(on)
	}
}

// testNode is one coordinator of a test and what it told its driver.
type testNode struct {
	*Coordinator
	mu     sync.Mutex
	events []failover.Event
	done   chan struct{}
}

// fastLease is the lease of the tests' nodes: their etcd elects a leader
// within 0.5-1 s (startEtcd), so a 2 s lease outlasts an election and
// the tests wait less for leases than with DefaultLeaseTTL, which is
// sized for etcd's default timings (TestEtcdLeaderLossKeepsPrimary).
const fastLease = 2 * time.Second

func nodeConfig(t *testing.T, dir, cluster, id string, role failover.Role, endpoints []string) Config {
	return Config{Endpoints: endpoints, Cluster: cluster, IdentityFile: filepath.Join(dir, id+".identity"), LeaseTTL: fastLease,
		Self:   failover.NodeInfo{ID: id, Role: role, DataAddr: "127.0.0.1:1" + fmt.Sprint(len(id)), APIAddr: "api-" + id},
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})).With("t", id)}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// openNode opens a coordinator and follows its events until it closes.
func openNode(t *testing.T, cfg Config) *testNode {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	n := &testNode{Coordinator: c, done: make(chan struct{})}
	go func() {
		defer close(n.done)
		for ev := range c.Events() {
			n.mu.Lock()
			n.events = append(n.events, ev)
			n.mu.Unlock()
		}
	}()
	t.Cleanup(n.close)
	return n
}

func (n *testNode) close() {
	n.Close()
	<-n.done
}

// crash stops the node as kill -9 would: no revoke, no resign; its lease
// runs out at etcd.
func (n *testNode) crash() {
	n.closeOnce.Do(func() {
		n.closed.Store(true)
		n.active.Store(nil)
		close(n.stop)
		n.goMu.Lock()
		n.stopping = true
		n.goMu.Unlock()
		n.wg.Wait()
		n.cli.Close()
		n.mu.Lock()
		close(n.Coordinator.events)
		n.mu.Unlock()
	})
	<-n.done
}

// primaryAt is the generation this node became primary at last (0: none).
func (n *testNode) primaryAt() uint64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	var g uint64
	for _, e := range n.events {
		switch e.Kind {
		case failover.EventBecamePrimary:
			g = e.Generation
		case failover.EventFenced:
			g = 0
		}
	}
	return g
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("not %s after %v", what, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// protectedPair starts a (booted guest) and b (secondary) on endpoints,
// waits until a is primary at generation 1, records it protected at epoch
// 5 and gives b the image of that epoch.
func protectedPair(t *testing.T, dir, cluster string, ea, eb []string) (a, b *testNode) {
	t.Helper()
	return protectedPairTuned(t, dir, cluster, ea, eb, func(*Config) {})
}

// protectedPairTuned is protectedPair with tune applied to both nodes'
// configurations.
func protectedPairTuned(t *testing.T, dir, cluster string, ea, eb []string, tune func(*Config)) (a, b *testNode) {
	t.Helper()
	ca, cb := nodeConfig(t, dir, cluster, "a", failover.RolePrimary, ea), nodeConfig(t, dir, cluster, "b", failover.RoleSecondary, eb)
	tune(&ca)
	tune(&cb)
	a = openNode(t, ca)
	a.SetImage(failover.Image{Live: true})
	waitFor(t, 10*time.Second, "a primary", func() bool { return a.primaryAt() == 1 })
	b = openNode(t, cb)
	waitFor(t, 5*time.Second, "b registered", func() bool { _, ok := a.Secondary(); return ok })
	// a hears its secondary over the data channel until the test ends
	// (else it records the loss of protection after DataTimeout).
	hbStop := make(chan struct{})
	hbDone := make(chan struct{})
	go func() { defer close(hbDone); heartbeats(a, hbStop) }()
	t.Cleanup(func() { close(hbStop); <-hbDone })
	a.DataHeartbeat()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.SetProtected(ctx, true); err != nil {
		t.Fatal(err)
	}
	a.ReportEpoch(5)
	a.DataHeartbeat()
	b.SetImage(failover.Image{Generation: 1, Epoch: 5})
	waitFor(t, 5*time.Second, "epoch 5 recorded", func() bool { st := b.State(); return st.Epoch == 5 && st.Protected })
	return a, b
}

// heartbeats keeps a's data-channel heartbeat fresh (a protected primary
// hears its secondary) until stop.
func heartbeats(n *testNode, stop <-chan struct{}) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			n.DataHeartbeat()
		}
	}
}

// overlapWatch samples a's and b's CanRelease of their generations every
// millisecond until stop and counts the samples in which both could
// release: a reply released twice.
func overlapWatch(a, b *testNode, genA, genB func() uint64, stop <-chan struct{}) (both chan int) {
	both = make(chan int, 1)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				both <- n
				return
			default:
			}
			if a.CanRelease(genA()) && b.CanRelease(genB()) {
				n++
			}
			time.Sleep(time.Millisecond)
		}
	}()
	return both
}
