package etcdcoord

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/tandemvm/tandem/failover"
)

// errSuperseded: a write's compare failed and the record shows the
// generation is no longer this node's, or this node no longer leads.
var errSuperseded = errors.New("etcd coordinator: superseded")

// leads is the compare every write of the record carries: the leader key
// is still the one this node created, so its lease is alive at etcd.
func (c *Coordinator) leads(term int64) clientv3.Cmp {
	return clientv3.Compare(clientv3.CreateRevision(c.keys.leader()), "=", term)
}

// claimLocked starts a worker that makes this node primary at
// a.Generation: a compare-and-set of the record on the revision Decide
// saw, while this node still holds the leader key of term v.Term. Its
// claim (the image it resumes) is written in the same transaction.
// Preconditions: c.mu held.
func (c *Coordinator) claimLocked(a failover.Action, v failover.View) {
	c.pending.Claim = true
	s := c.snap.Load()
	img := c.image
	term := int64(v.Term)
	next := s.state
	next.V = recordVersion
	if next.Primary != c.cfg.Self.ID {
		next.Protected = false // a new primary has no secondary in sync yet
	}
	next.Gen, next.Primary = a.Generation, c.cfg.Self.ID
	me := c.memberRecordLocked()
	covers := img != nil && v.RunnableGen == a.Generation-1
	c.worker(func() {
		c.writeMu.Lock()
		defer c.writeMu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.CallTimeout)
		defer cancel()
		resp, err := c.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(c.keys.state()), "=", s.stateRev), c.leads(term)).
			Then(clientv3.OpPut(c.keys.state(), encode(next)), clientv3.OpPut(c.keys.member(c.cfg.Self.ID), encode(me))).
			Else(clientv3.OpGet(c.keys.state())).
			Commit()
		if err == nil && !resp.Succeeded {
			// The record changed (or the leader key did): decide again
			// on the record etcd holds, not on the one refused, even if
			// the watch is behind.
			c.refreshState(resp)
		}
		c.mu.Lock()
		c.pending.Claim = false
		switch {
		case err == nil && resp.Succeeded:
			c.claimed, c.claimedTerm = a.Generation, uint64(term)
			if covers && c.image != nil && c.image.Generation == img.Generation {
				c.claims.Committed(img.Generation, a.Generation)
			}
			rev := resp.Header.Revision
			c.snap.Store(c.snap.Load().withState(next, rev))
			c.log.Info("claimed the primary role", "gen", a.Generation, "term", term, "image", img)
		case err != nil && covers:
			// The transaction may have committed after all: remember
			// the claim until the record tells.
			c.claims.Tentative(img.Generation, a.Generation)
			c.log.Info("claim outcome unknown", "gen", a.Generation, "err", err)
		default:
			c.log.Debug("claim refused", "gen", a.Generation, "err", err)
		}
		c.mu.Unlock()
		c.poke()
	})
}

// withState is s with the record written at revision rev by this node.
func (s *snapshot) withState(st stateRecord, rev int64) *snapshot {
	if rev < s.stateRev {
		return s
	}
	n := *s
	n.state, n.stateRev, n.rev = st, rev, max(s.rev, rev)
	return &n
}

// writeProtected records protected at gen as protection write seq (from
// protSeq). Neither the workers nor writeMu keep the callers' order, so a
// "protected" whose caller timed out could otherwise land after a later
// "unprotected" and leave the record saying protected while the
// secondary is behind: a write that is no longer the newest asked for
// leaves the flag as it is.
func (c *Coordinator) writeProtected(gen uint64, protected bool, seq uint64) error {
	return c.writeState(gen, func(s *stateRecord) {
		if c.protSeq.Load() == seq {
			s.Protected = protected
		}
	})
}

// writeState changes the record at generation gen with f: a transaction
// comparing the record's revision and this node's leadership, retried on
// a newer record of the same generation, refused once the generation or
// the leadership is gone. This node's writes are made one at a time
// (writeMu): its epoch records, every ~100 ms, otherwise kept beating its
// "protected" to the revision (TestEtcdFleetMassFailover with 25 ms
// epochs: "the record kept changing", and the pair stayed recorded
// unprotected). Bounded by CallTimeout per attempt.
func (c *Coordinator) writeState(gen uint64, f func(*stateRecord)) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	for range 4 {
		if c.closed.Load() {
			return ErrClosed
		}
		v := c.liveView(c.clk.Now())
		s := c.snap.Load()
		if !v.Leader || s.state.Gen != gen || s.state.Primary != c.cfg.Self.ID {
			return fmt.Errorf("%w: generation %d (record at %d, primary %q, leading %v)", errSuperseded, gen, s.state.Gen, s.state.Primary, v.Leader)
		}
		next := s.state
		next.V = recordVersion
		f(&next)
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.CallTimeout)
		resp, err := c.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(c.keys.state()), "=", s.stateRev), c.leads(int64(v.Term))).
			Then(clientv3.OpPut(c.keys.state(), encode(next))).
			Else(clientv3.OpGet(c.keys.state())).
			Commit()
		cancel()
		if err != nil {
			return err
		}
		if resp.Succeeded {
			c.update(func(cur *snapshot) *snapshot { return cur.withState(next, resp.Header.Revision) })
			return nil
		}
		c.refreshState(resp)
	}
	return fmt.Errorf("%w: the record kept changing", errSuperseded)
}

// refreshState publishes the record a failed transaction's Else read
// (OpGet of state) returned, if newer than the one held.
func (c *Coordinator) refreshState(resp *clientv3.TxnResponse) {
	if len(resp.Responses) == 0 {
		return
	}
	if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) == 1 {
		c.update(func(cur *snapshot) *snapshot { return cur.with(c.keys, cur.rev, kvs, nil) })
	}
}

// memberRecordLocked is this node's record: its info and claim.
// Preconditions: c.mu held.
func (c *Coordinator) memberRecordLocked() memberRecord {
	return memberRecord{V: recordVersion, Node: nodeOf(c.cfg.Self), Identity: c.identity, Image: imageOf(c.image)}
}

// registerLocked starts a worker that writes this node's record, compared
// on the revision last seen of it (another process with this ID and
// another data directory is caught at Open; this keeps a record this
// node never saw from being overwritten blindly).
// Preconditions: c.mu held.
func (c *Coordinator) registerLocked(now time.Time) {
	c.pending.Register, c.lastRegister = true, now
	me := c.memberRecordLocked()
	prev := c.snap.Load().members[c.cfg.Self.ID].rev
	c.worker(func() {
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.CallTimeout)
		defer cancel()
		key := c.keys.member(c.cfg.Self.ID)
		resp, err := c.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", prev)).
			Then(clientv3.OpPut(key, encode(me))).
			Commit()
		c.mu.Lock()
		c.pending.Register = false
		c.mu.Unlock()
		if err == nil && resp.Succeeded {
			c.update(func(cur *snapshot) *snapshot {
				return cur.with(c.keys, cur.rev, []*mvccpb.KeyValue{{Key: []byte(key), Value: []byte(encode(me)), ModRevision: resp.Header.Revision}}, nil)
			})
		}
	})
}

// campaignLocked starts a worker that creates the leader key with lease
// lid if nobody holds it.
// Preconditions: c.mu held.
func (c *Coordinator) campaignLocked(lid clientv3.LeaseID) {
	c.campaigning = true
	c.worker(func() {
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.CallTimeout)
		defer cancel()
		resp, err := c.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(c.keys.leader()), "=", 0)).
			Then(clientv3.OpPut(c.keys.leader(), c.cfg.Self.ID, clientv3.WithLease(lid))).
			Commit()
		if err == nil && resp.Succeeded {
			rev := resp.Header.Revision
			c.log.Info("holds the etcd lease of the cluster", "term", rev, "lease", int64(lid))
			kv := &mvccpb.KeyValue{Key: []byte(c.keys.leader()), Value: []byte(c.cfg.Self.ID), CreateRevision: rev, ModRevision: rev, Lease: int64(lid)}
			c.update(func(cur *snapshot) *snapshot { return cur.with(c.keys, cur.rev, []*mvccpb.KeyValue{kv}, nil) })
		}
		c.mu.Lock()
		c.campaigning = false
		c.mu.Unlock()
		c.poke()
	})
}

// resignLocked starts a worker that deletes the leader key if it is
// still the one of term.
// Preconditions: c.mu held.
func (c *Coordinator) resignLocked(term uint64, why string) {
	c.resigning = true
	c.log.Info("gives up the etcd lease of the cluster", "term", term, "why", why)
	c.worker(func() {
		c.resign(term)
		c.mu.Lock()
		c.resigning = false
		c.mu.Unlock()
		c.poke()
	})
}

// resign deletes the leader key if it is still the one of term.
func (c *Coordinator) resign(term uint64) error {
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.CallTimeout)
	defer cancel()
	_, err := c.cli.Txn(ctx).If(c.leads(int64(term))).Then(clientv3.OpDelete(c.keys.leader())).Commit()
	return err
}
