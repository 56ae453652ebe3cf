package etcdcoord

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// join makes this node part of the cluster under the prefix: it adopts
// the prefix's identity (creating it on a fresh prefix), refuses another
// cluster's, and reads the prefix. While etcd cannot be reached it retries
// with backoff (one log line naming the endpoints, then one per minute).
func (c *Coordinator) join(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	var lastLog time.Time
	for {
		err := c.joinOnce(ctx)
		if err == nil || errors.Is(err, ErrWrongCluster) || errors.Is(err, ErrInUse) || errors.Is(err, ErrConfig) {
			return err
		}
		if now := time.Now(); now.Sub(lastLog) >= time.Minute {
			lastLog = now
			c.log.Warn("etcd unreachable; retrying with backoff (the guest does not run without an etcd lease)", "endpoints", c.endpointList(), "err", err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("etcd %s unreachable: %w", c.endpointList(), ctx.Err())
		case <-t.C:
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// joinOnce is one attempt of join.
func (c *Coordinator) joinOnce(ctx context.Context) error {
	stored, err := readIdentity(c.cfg.IdentityFile)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, c.cfg.CallTimeout)
	defer cancel()
	fresh := clusterRecord{V: recordVersion, Identity: stored, Name: c.cfg.Cluster}
	if fresh.Identity == "" {
		fresh.Identity = newIdentity()
	}
	// Create the owner record if the prefix has none, and read the prefix
	// in the same transaction.
	resp, err := c.cli.Txn(cctx).
		If(clientv3.Compare(clientv3.CreateRevision(c.keys.cluster()), "=", 0)).
		Then(clientv3.OpPut(c.keys.cluster(), encode(fresh))).
		Commit()
	if err != nil {
		return err
	}
	if resp.Succeeded && stored != "" {
		// The prefix was empty but this node's data directory had joined
		// a cluster before: etcd lost the record (or it was deleted).
		// Undo (unless another node wrote since), and refuse: starting
		// over would forget the generation.
		c.cli.Txn(cctx).If(clientv3.Compare(clientv3.ModRevision(c.keys.cluster()), "=", resp.Header.Revision)).
			Then(clientv3.OpDelete(c.keys.cluster())).Commit()
		return fmt.Errorf("%w: %s is empty but this node's data directory joined cluster %s there before: restore etcd's record or start this node with a fresh --data-dir", ErrWrongCluster, c.keys.prefix, stored)
	}
	snap, err := c.read(cctx)
	if err != nil {
		return err
	}
	if err := c.checkOwner(snap, stored); err != nil {
		return err
	}
	if stored == "" {
		if err := writeIdentity(c.cfg.IdentityFile, snap.cluster.Identity); err != nil {
			return err
		}
	}
	c.identity = snap.cluster.Identity
	c.snap.Store(snap)
	c.watchFrom = snap.rev
	return nil
}

// checkOwner refuses a prefix that is another cluster's: another identity
// than the one this node's data directory joined, a record of this node's
// ID made by another data directory, or two other guest nodes already.
func (c *Coordinator) checkOwner(s *snapshot, stored string) error {
	switch {
	case s.cluster == nil:
		return fmt.Errorf("%w: %s has no owner record (deleted while joining?)", ErrWrongCluster, c.keys.prefix)
	case s.cluster.Name != c.cfg.Cluster:
		return fmt.Errorf("%w: %s is owned by cluster %q", ErrWrongCluster, c.keys.prefix, s.cluster.Name)
	case stored != "" && s.cluster.Identity != stored:
		return fmt.Errorf("%w: %s belongs to cluster identity %s, this node's data directory to %s", ErrWrongCluster, c.keys.prefix, s.cluster.Identity, stored)
	}
	if m, ok := s.members[c.cfg.Self.ID]; ok && stored == "" && m.Identity != "" {
		return fmt.Errorf("%w: node %s is already registered under %s by another data directory (a second node with this --id?)", ErrInUse, c.cfg.Self.ID, c.keys.prefix)
	}
	var others []string
	for id := range s.members {
		if id != c.cfg.Self.ID {
			others = append(others, id)
		}
	}
	if len(others) >= 2 {
		return fmt.Errorf("%w: cluster %s already has its two nodes (%s); node %s is not one of them", ErrInUse, c.cfg.Cluster, strings.Join(others, ", "), c.cfg.Self.ID)
	}
	return nil
}

// read is the whole prefix, bounded by ctx.
func (c *Coordinator) read(ctx context.Context) (*snapshot, error) {
	resp, err := c.cli.Get(ctx, c.keys.prefix, clientv3.WithPrefix(), clientv3.WithLimit(64))
	if err != nil {
		return nil, err
	}
	if resp.More {
		return nil, fmt.Errorf("%w: %s holds more than 64 keys: not a Tandem cluster's", ErrWrongCluster, c.keys.prefix)
	}
	empty := &snapshot{members: map[string]memberRecord{}}
	return empty.with(c.keys, resp.Header.Revision, resp.Kvs, nil), nil
}

// watchLoop keeps the snapshot current: a watch of the prefix from the
// revision read, read again whenever the watch ends (an etcd member lost
// its leader, a compaction, a broken connection). The revision it goes on
// from is the watch's own (the last it delivered or read), never the
// snapshot's: this node's writes advance the snapshot's revision past
// events of other writers the watch has not delivered yet, and a watch
// restarted from there would skip them.
func (c *Coordinator) watchLoop() {
	defer c.wg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-c.stop
		cancel()
	}()
	rev := c.watchFrom
	for ctx.Err() == nil {
		wch := c.cli.Watch(clientv3.WithRequireLeader(ctx), c.keys.prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
		for resp := range wch {
			if resp.Err() != nil || resp.Canceled {
				break
			}
			c.applyEvents(resp.Header.Revision, resp.Events)
			rev = max(rev, resp.Header.Revision)
		}
		// Read the prefix again before the next watch (bounded), then
		// go on from there.
		for ctx.Err() == nil {
			rctx, rcancel := context.WithTimeout(ctx, c.cfg.CallTimeout)
			s, err := c.read(rctx)
			rcancel()
			if err == nil {
				c.update(func(*snapshot) *snapshot { return s })
				rev = s.rev
				break
			}
			c.log.Debug("etcd read failed", "err", err)
			sleepCtx(ctx, 200*time.Millisecond)
		}
	}
}

// applyEvents publishes the snapshot with a watch's events applied.
func (c *Coordinator) applyEvents(rev int64, evs []*clientv3.Event) {
	var puts []*mvccpb.KeyValue
	var dels []*mvccpb.KeyValue
	for _, ev := range evs {
		if ev.Type == clientv3.EventTypeDelete {
			dels = append(dels, ev.Kv)
		} else {
			puts = append(puts, ev.Kv)
		}
	}
	c.update(func(s *snapshot) *snapshot { return s.with(c.keys, max(rev, s.rev), puts, dels) })
}

// update publishes f(current snapshot) and wakes the decision loop.
func (c *Coordinator) update(f func(*snapshot) *snapshot) {
	c.mu.Lock()
	c.snap.Store(f(c.snap.Load()))
	c.mu.Unlock()
	c.poke()
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func newIdentity() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// readIdentity is the identity a data directory joined ("": none yet).
func readIdentity(path string) (string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrConfig, err)
	}
	id := strings.TrimSpace(string(b))
	if len(id) != 32 {
		return "", fmt.Errorf("%w: %s: not a cluster identity", ErrConfig, path)
	}
	return id, nil
}

// writeIdentity publishes the identity file atomically (temp file,
// fsync, rename, fsync of the directory).
func writeIdentity(path, id string) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	_, err = f.WriteString(id + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		var d *os.File
		if d, err = os.Open(filepath.Dir(path)); err == nil {
			err = d.Sync()
			d.Close()
		}
	}
	if err != nil {
		return fmt.Errorf("%w: write %s: %v", ErrConfig, path, err)
	}
	return nil
}
