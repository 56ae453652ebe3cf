package etcdcoord

import (
	"context"
	"log/slog"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/clock"
)

// slowLeases answers a grant or keepalive with ttl seconds, taking took
// of the fake clock (as a slow etcd round trip would).
type slowLeases struct {
	clk  *clock.Fake
	took time.Duration
	ttl  int64
	sent time.Time // when the last request left
}

func (l *slowLeases) Grant(_ context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error) {
	l.sent = l.clk.Now()
	l.clk.Advance(l.took)
	return &clientv3.LeaseGrantResponse{ID: 7, TTL: l.ttl}, nil
}

func (l *slowLeases) KeepAliveOnce(_ context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error) {
	l.sent = l.clk.Now()
	l.clk.Advance(l.took)
	return &clientv3.LeaseKeepAliveResponse{ID: id, TTL: l.ttl}, nil
}

// TestLeaseDeadlineFromSend: the lease deadline a grant or keepalive
// records is the moment the request left plus the TTL etcd answered (etcd
// counts from when it handled it, later), not the moment the answer came
// back; and CanRelease turns false exactly Margin before that deadline.
// It fails if the deadline is measured from the answer or the margin is
// dropped.
func TestLeaseDeadlineFromSend(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_000_000, 0))
	cfg, err := Config{Endpoints: []string{"http://127.0.0.1:2379"}, Cluster: "g", IdentityFile: "x",
		Self: failover.NodeInfo{ID: "a", Role: failover.RolePrimary, DataAddr: "127.0.0.1:7311"}, Clock: clk}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	fake := &slowLeases{clk: clk, took: 700 * time.Millisecond, ttl: int64(cfg.LeaseTTL / time.Second)}
	c := &Coordinator{cfg: cfg, clk: clk, log: slog.New(slog.DiscardHandler), keys: newKeys("g"), leases: fake,
		wake: make(chan struct{}, 1), events: make(chan failover.Event, eventBuffer)}
	ttl := time.Duration(fake.ttl) * time.Second
	c.renew(context.Background()) // a grant
	l := c.lease.Load()
	if l == nil || !l.deadline.Equal(fake.sent.Add(ttl)) {
		t.Fatalf("after a grant sent at %v: lease %+v, want deadline %v", fake.sent, l, fake.sent.Add(ttl))
	}
	// The node leads generation 1 with that lease.
	c.snap.Store(&snapshot{leader: "a", leaderRev: 9, leaderLease: int64(l.id),
		state: stateRecord{V: recordVersion, Gen: 1, Primary: "a"}, members: map[string]memberRecord{}})
	c.active.Store(&failover.Activation{Generation: 1, Term: 9})
	clk.Advance(time.Second)
	c.renew(context.Background()) // a keepalive, answered 700 ms after it left
	l = c.lease.Load()
	deadline := fake.sent.Add(ttl)
	if !l.deadline.Equal(deadline) {
		t.Fatalf("keepalive sent at %v, answered at %v: deadline %v, want send + TTL = %v", fake.sent, clk.Now(), l.deadline, deadline)
	}
	safe := deadline.Add(-cfg.Margin)
	clk.Advance(safe.Add(-time.Millisecond).Sub(clk.Now()))
	if !c.CanRelease(1) {
		t.Fatalf("CanRelease false %v before the lease's deadline less the margin", time.Millisecond)
	}
	clk.Advance(time.Millisecond) // now == deadline - margin
	if c.CanRelease(1) {
		t.Fatalf("CanRelease true at the deadline less the margin (%v); the margin is %v", safe, cfg.Margin)
	}
}

// TestLeaseTTLBounded: a keepalive that answers a longer TTL than the
// grant gave (a wrong or hostile answer) renews the granted TTL only, and
// a grant's TTL is bounded by maxLeaseTTL: CanRelease trusts the deadline.
func TestLeaseTTLBounded(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_000_000, 0))
	cfg, err := Config{Endpoints: []string{"http://127.0.0.1:2379"}, Cluster: "g", IdentityFile: "x",
		Self: failover.NodeInfo{ID: "a", Role: failover.RolePrimary, DataAddr: "127.0.0.1:7311"}, Clock: clk}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	fake := &slowLeases{clk: clk, ttl: 5}
	c := &Coordinator{cfg: cfg, clk: clk, log: slog.New(slog.DiscardHandler), keys: newKeys("g"), leases: fake,
		wake: make(chan struct{}, 1), events: make(chan failover.Event, eventBuffer)}
	c.renew(context.Background()) // granted 5 s
	fake.ttl = 1 << 40            // then a keepalive claims about 35,000 years
	c.renew(context.Background())
	if l := c.lease.Load(); l == nil || !l.deadline.Equal(fake.sent.Add(5*time.Second)) {
		t.Fatalf("after a keepalive answering TTL %d: lease %+v, want the granted 5 s from %v", fake.ttl, l, fake.sent)
	}
	c.lease.Store(nil)
	c.renew(context.Background()) // a grant answering the same
	if l := c.lease.Load(); l == nil || !l.deadline.Equal(fake.sent.Add(maxLeaseTTL)) {
		t.Fatalf("after a grant answering TTL %d: lease %+v, want at most %v", fake.ttl, l, maxLeaseTTL)
	}
}

// TestLapseNoStepSawKeepsGeneration: the lease's margin runs out and a
// keepalive renews the same lease before any decision step ran (what
// TestBriefCutKeepsTheLease hit under load): CanRelease was false in
// between, but etcd still held the lease, hence the leader key and the
// term, so no other node can have been primary. The node goes on at its
// generation, without a fence, and releases again.
func TestLapseNoStepSawKeepsGeneration(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_000_000, 0))
	cfg, err := Config{Endpoints: []string{"http://127.0.0.1:2379"}, Cluster: "g", IdentityFile: "x",
		Self: failover.NodeInfo{ID: "a", Role: failover.RolePrimary, DataAddr: "127.0.0.1:7311"}, Clock: clk}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	fake := &slowLeases{clk: clk, ttl: int64(cfg.LeaseTTL / time.Second)}
	c := &Coordinator{cfg: cfg, clk: clk, log: slog.New(slog.DiscardHandler), keys: newKeys("g"), leases: fake,
		wake: make(chan struct{}, 1), events: make(chan failover.Event, eventBuffer)}
	c.renew(context.Background())
	l := c.lease.Load()
	c.snap.Store(&snapshot{leader: "a", leaderRev: 9, leaderLease: int64(l.id),
		state:   stateRecord{V: recordVersion, Gen: 1, Primary: "a"},
		members: map[string]memberRecord{"a": {V: recordVersion, Node: nodeOf(cfg.Self)}}})
	c.active.Store(&failover.Activation{Generation: 1, Term: 9})
	c.image = &failover.Image{Generation: 1, Live: true}
	c.step()
	clk.Advance(l.deadline.Add(-cfg.Margin).Sub(clk.Now()))
	if c.CanRelease(1) {
		t.Fatal("CanRelease true once the margin ran out")
	}
	c.renew(context.Background()) // same lease, renewed before a step
	c.step()
	if len(c.events) != 0 {
		t.Fatalf("%d events after a lapse no step saw (first: %+v), want none", len(c.events), <-c.events)
	}
	if a := c.active.Load(); a == nil || a.Generation != 1 || !c.CanRelease(1) {
		t.Fatalf("after the renewal: active %+v, CanRelease(1) %v; want generation 1 releasing", a, c.CanRelease(1))
	}
}
