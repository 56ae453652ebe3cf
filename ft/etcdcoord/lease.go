package etcdcoord

import (
	"context"
	"errors"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// leaser is the part of etcd's lease API renew uses: clientv3.Lease,
// or a unit test's stand-in that answers at a moment of its choosing.
type leaser interface {
	Grant(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error)
	KeepAliveOnce(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error)
}

// leaseLoop holds this node's etcd lease: it grants one when it has
// none and renews it every KeepAlive. The deadline it records is measured
// from the start of the request etcd answered, so etcd's own end of the
// lease (counted from when it handled the request) is never earlier. A
// renewal that fails leaves the deadline as it was: it runs out here
// before it can run out at etcd. A lease etcd no longer knows is dropped
// at once (CanRelease turns false) and a new one granted.
func (c *Coordinator) leaseLoop() {
	defer c.wg.Done()
	t := c.clk.NewTicker(c.cfg.KeepAlive)
	defer t.Stop()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c.renew(ctx)
	for {
		select {
		case <-c.stop:
			return
		case <-t.C():
		}
		c.renew(ctx)
	}
}

// renew keeps the lease alive, or grants one, once; each call bounded by
// CallTimeout. A lease whose deadline passed here is still renewed if
// etcd holds it: a primary cut off for longer than its margin but less
// than the TTL keeps its leader key (and term) and claims the next
// generation on its own, instead of leaving the key to expire and the
// secondary to race it.
func (c *Coordinator) renew(ctx context.Context) {
	if cur := c.lease.Load(); cur != nil {
		cctx, cancel := context.WithTimeout(ctx, c.cfg.CallTimeout)
		start := c.clk.Now()
		resp, err := c.leases.KeepAliveOnce(cctx, cur.id)
		cancel()
		switch {
		case errors.Is(err, rpctypes.ErrLeaseNotFound) || (err == nil && resp.TTL <= 0):
			c.log.Warn("etcd lease lost: etcd no longer holds it", "lease", int64(cur.id))
			c.lease.CompareAndSwap(cur, nil)
			c.poke()
		case err != nil:
			c.log.Debug("etcd keepalive failed", "err", err)
			return
		default:
			// A keepalive renews the granted TTL, never more.
			c.lease.CompareAndSwap(cur, &leaseState{id: cur.id, ttl: cur.ttl, deadline: start.Add(answeredTTL(resp.TTL, cur.ttl))})
			if !start.Before(cur.deadline.Add(-c.cfg.Margin)) {
				c.poke() // valid again: the loop may lead again
			}
			return
		}
	}
	cctx, cancel := context.WithTimeout(ctx, c.cfg.CallTimeout)
	defer cancel()
	start := c.clk.Now()
	resp, err := c.leases.Grant(cctx, int64(c.cfg.LeaseTTL/time.Second))
	if err != nil {
		c.log.Debug("etcd lease grant failed", "err", err)
		return
	}
	ttl := answeredTTL(resp.TTL, maxLeaseTTL)
	c.lease.Store(&leaseState{id: resp.ID, ttl: ttl, deadline: start.Add(ttl)})
	c.poke()
}

// leaseValid is the lease this node may act on at now: held, and its
// deadline more than Margin away.
func (c *Coordinator) leaseValid(now time.Time) (clientv3.LeaseID, time.Time, bool) {
	l := c.lease.Load()
	if l == nil {
		return 0, time.Time{}, false
	}
	safe := l.deadline.Add(-c.cfg.Margin)
	return l.id, safe, now.Before(safe)
}
