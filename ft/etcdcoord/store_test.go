package etcdcoord

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/tandemvm/tandem/failover"
)

// TestUnreadableStateStopsClaims: a state record etcd holds but the nodes
// cannot read (not JSON) fences the primary at once, is shown in status
// (waiting_reason) and keeps both nodes from claiming for longer than a
// lease (it must not read as a fresh cluster at generation 0); a valid
// record written back lets a node serve again.
func TestUnreadableStateStopsClaims(t *testing.T) {
	t.Parallel()
	ec, name := sharedEtcd(t)
	a, b := protectedPair(t, t.TempDir(), name, ec.Endpoints(), ec.Endpoints())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	bad, err := a.cli.Put(ctx, a.keys.state(), "{not a record")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "a fenced", func() bool { return a.primaryAt() == 0 && !a.CanRelease(1) })
	end := time.Now().Add(fastLease + 2*time.Second)
	for time.Now().Before(end) {
		if a.primaryAt() != 0 || b.primaryAt() != 0 {
			t.Fatalf("a node became primary on an unreadable record: a at %d, b at %d", a.primaryAt(), b.primaryAt())
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, n := range []*testNode{a, b} {
		if w := n.ClusterView(1).Waiting; !strings.Contains(w, "cannot be read") {
			t.Errorf("%s's status waiting_reason %q does not name the unreadable record", n.ID(), w)
		}
	}
	got, err := a.cli.Get(ctx, a.keys.state())
	if err != nil || len(got.Kvs) != 1 || got.Kvs[0].ModRevision != bad.Header.Revision {
		t.Fatalf("the unreadable record was written over: %v %v", got, err)
	}
	good := stateRecord{V: recordVersion, Gen: 1, Primary: "a", Protected: true, Epoch: 5}
	if _, err := a.cli.Put(ctx, a.keys.state(), encode(good)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "a primary again", func() bool { return a.primaryAt() != 0 && a.CanRelease(a.primaryAt()) })
	if w := a.ClusterView(a.primaryAt()).Waiting; w != "" {
		t.Errorf("a serves but waiting_reason %q", w)
	}
}

// TestMemberRecordChecked: a member record whose role or data address
// this node would act on wrongly is kept out and named as unreadable.
func TestMemberRecordChecked(t *testing.T) {
	for _, tc := range []struct {
		n    nodeRecord
		want string
	}{
		{nodeRecord{ID: "a", Role: "primary", DataAddr: "127.0.0.1:7311"}, ""},
		{nodeRecord{ID: "a", Role: "secondary", DataAddr: "[::1]:7311"}, ""},
		{nodeRecord{ID: "a", Role: "witness", DataAddr: "127.0.0.1:7311"}, "role"},
		{nodeRecord{ID: "a", Role: "primary", DataAddr: "127.0.0.1"}, "HOST:PORT"},
		{nodeRecord{ID: "a", Role: "primary", DataAddr: ":7311"}, "HOST:PORT"},
		{nodeRecord{ID: "a", Role: "primary", DataAddr: "h:70000"}, "port"},
		{nodeRecord{ID: "a", Role: "primary", DataAddr: strings.Repeat("h", 300) + ":1"}, "HOST:PORT"},
	} {
		err := tc.n.check("k")
		if (err == nil) != (tc.want == "") || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: %v, want %q", tc.n, err, tc.want)
		}
	}
	k := newKeys("g")
	s := (&snapshot{members: map[string]memberRecord{}}).with(k, 1, nil, nil)
	m := memberRecord{V: recordVersion, Node: nodeRecord{ID: "b", Role: "secondary", DataAddr: "nowhere"}}
	s.put(k, kvOf(k.member("b"), encode(m), 2))
	if _, ok := s.members["b"]; ok || !strings.Contains(s.unreadable(), "HOST:PORT") {
		t.Fatalf("bad member record kept: %v, unreadable %q", s.members, s.unreadable())
	}
	m.Node.DataAddr = "127.0.0.1:7312"
	s.put(k, kvOf(k.member("b"), encode(m), 3))
	if _, ok := s.members["b"]; !ok || s.unreadable() != "" {
		t.Fatalf("good member record not taken: %v, unreadable %q", s.members, s.unreadable())
	}
	// Two nodes at most: a third record from the watch is kept out.
	for i, id := range []string{"a", "c"} {
		m.Node.ID, m.Node.DataAddr = id, fmt.Sprintf("127.0.0.1:%d", 7320+i)
		s.put(k, kvOf(k.member(id), encode(m), int64(4+i)))
	}
	if _, ok := s.members["c"]; ok || len(s.members) != 2 || !strings.Contains(s.unreadable(), "third node") {
		t.Fatalf("a third member taken: %v, unreadable %q", s.members, s.unreadable())
	}
}

func kvOf(key, value string, rev int64) *mvccpb.KeyValue {
	return &mvccpb.KeyValue{Key: []byte(key), Value: []byte(value), CreateRevision: rev, ModRevision: rev}
}

// TestUnreadableStateNoFreshBoot: a primary-role node that would boot a
// fresh guest (generation 0 image) on a prefix whose state record is
// unreadable does not take it for a fresh cluster: it neither claims
// generation 1 nor writes over the record.
func TestUnreadableStateNoFreshBoot(t *testing.T) {
	t.Parallel()
	ec, name := sharedEtcd(t)
	dir := t.TempDir()
	a := openNode(t, nodeConfig(t, dir, name, "a", failover.RolePrimary, ec.Endpoints()))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	bad, err := a.cli.Put(ctx, a.keys.state(), `{"v":2,"gen":7}`)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "the bad record seen", func() bool { return a.snap.Load().stateUnreadable(a.keys) != "" })
	a.SetImage(failover.Image{Live: true})
	time.Sleep(fastLease)
	if g := a.primaryAt(); g != 0 {
		t.Fatalf("a became primary at generation %d on an unreadable record", g)
	}
	got, err := a.cli.Get(ctx, a.keys.state())
	if err != nil || len(got.Kvs) != 1 || got.Kvs[0].ModRevision != bad.Header.Revision {
		t.Fatalf("the unreadable record was written over: %v %v", got, err)
	}
	if w := a.ClusterView(0).Waiting; !strings.Contains(w, "record version 2") {
		t.Errorf("waiting_reason %q does not say why the record cannot be read", w)
	}
}
