package etcdcoord

import (
	"context"
	"testing"
	"time"

	"github.com/tandemvm/tandem/failover"
)

// bareNode is a coordinator that joined the prefix but runs no loop: its
// snapshot changes only by its own calls, so a test can hold it stale.
func bareNode(t *testing.T, cfg Config) *Coordinator {
	t.Helper()
	c, err := newCoordinator(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.wg.Wait()
		c.cli.Close()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.joinOnce(ctx); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestFailedClaimRefreshesState: a claim made on a stale record (another
// writer moved it on, and this node's watch has not delivered it) is
// refused by etcd, and the refusal's read brings the node's snapshot to
// the record etcd holds: the next decision is made on it, not on the
// refused one again.
func TestFailedClaimRefreshesState(t *testing.T) {
	t.Parallel()
	ec, name := sharedEtcd(t)
	c := bareNode(t, nodeConfig(t, t.TempDir(), name, "b", failover.RoleSecondary, ec.Endpoints()))
	if st := c.snap.Load().state; st.Gen != 0 {
		t.Fatalf("fresh prefix holds %+v", st)
	}
	// Another writer records generation 3 behind the node's back.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	newer := stateRecord{V: recordVersion, Gen: 3, Primary: "a", Epoch: 40}
	put, err := c.cli.Put(ctx, c.keys.state(), encode(newer))
	if err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.image = &failover.Image{Generation: 0, Epoch: 1}
	c.claimLocked(failover.Action{Kind: failover.ActClaim, Generation: 1}, failover.View{Term: 1})
	c.mu.Unlock()
	c.wg.Wait()
	s := c.snap.Load()
	if s.state != newer || s.stateRev != put.Header.Revision {
		t.Fatalf("after the refused claim the node holds %+v at revision %d, want %+v at %d", s.state, s.stateRev, newer, put.Header.Revision)
	}
	if c.claimed != 0 || c.pending.Claim {
		t.Fatalf("refused claim recorded: claimed %d, pending %v", c.claimed, c.pending.Claim)
	}
	got, err := c.cli.Get(ctx, c.keys.state())
	if err != nil || len(got.Kvs) != 1 || got.Kvs[0].ModRevision != put.Header.Revision {
		t.Fatalf("the record was written over: %v %v", got, err)
	}
}

// TestWatchKeepsItsOwnRevision: this node's own write moves its snapshot
// to a revision past another writer's change that the watch has not
// delivered yet; the watch, started then, still delivers that change (it
// goes on from its own revision, not the snapshot's).
func TestWatchKeepsItsOwnRevision(t *testing.T) {
	t.Parallel()
	ec, name := sharedEtcd(t)
	c := bareNode(t, nodeConfig(t, t.TempDir(), name, "b", failover.RoleSecondary, ec.Endpoints()))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Another node registers (revision R1) ...
	other := memberRecord{V: recordVersion, Node: nodeRecord{ID: "a", Role: "primary", DataAddr: "127.0.0.1:7311"}}
	if _, err := c.cli.Put(ctx, c.keys.member("a"), encode(other)); err != nil {
		t.Fatal(err)
	}
	// ... then this node writes the record (R2 > R1) and publishes its
	// own write, as writeState does.
	st := stateRecord{V: recordVersion, Gen: 1, Primary: "b"}
	put, err := c.cli.Put(ctx, c.keys.state(), encode(st))
	if err != nil {
		t.Fatal(err)
	}
	c.update(func(s *snapshot) *snapshot { return s.withState(st, put.Header.Revision) })
	c.wg.Add(1)
	go c.watchLoop()
	defer func() {
		close(c.stop)
		c.wg.Wait()
	}()
	deadline := time.Now().Add(3 * time.Second)
	for {
		if _, ok := c.snap.Load().members["a"]; ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the watch never delivered a's registration, made before this node's own write")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
