package failover

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/hashicorp/raft"
)

func mustEncode(t testing.TB, ct commandType, body any) []byte {
	t.Helper()
	b, err := encodeCommand(ct, body)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func applyAll(t *testing.T, f *fsm, entries ...[]byte) []any {
	var out []any
	for i, e := range entries {
		out = append(out, f.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: e}))
	}
	return out
}

func TestFSMTransitions(t *testing.T) {
	f := newFSM(nil)
	res := applyAll(t, f,
		mustEncode(t, cmdRegister, &registerCmd{ClusterID: "c1", Info: infoS}),
		mustEncode(t, cmdRegister, &registerCmd{ClusterID: "c1", Info: infoP}),
		mustEncode(t, cmdRegister, &registerCmd{ClusterID: "c1", Info: infoW}),
		mustEncode(t, cmdPromote, &promoteCmd{ID: "p", Generation: 1}),
		mustEncode(t, cmdSetProtected, &protectedCmd{Generation: 1, Protected: true}),
		mustEncode(t, cmdEpoch, &epochCmd{Generation: 1, Epoch: 10}),
		mustEncode(t, cmdEpoch, &epochCmd{Generation: 1, Epoch: 7}), // reordered report: ignored
	)
	for i, r := range res {
		if r != nil {
			t.Fatalf("entry %d: %v", i, r)
		}
	}
	s := f.load()
	if s.ClusterID != "c1" || s.Generation != 1 || s.Primary != "p" || !s.Protected || s.Epoch != 10 {
		t.Fatalf("state %+v", *s)
	}
	if len(s.Members) != 3 || s.Members[0].ID != "p" || s.Members[1].ID != "s" {
		t.Fatalf("members not sorted: %+v", s.Members)
	}
	if sec, ok := s.Secondary(); !ok || sec.ID != "s" {
		t.Fatalf("secondary %v %v", sec, ok)
	}

	refused := []struct {
		name string
		data []byte
		want error
	}{
		{"promote skips a generation", mustEncode(t, cmdPromote, &promoteCmd{ID: "s", Generation: 3}), ErrStaleGeneration},
		{"promote replays a generation", mustEncode(t, cmdPromote, &promoteCmd{ID: "s", Generation: 1}), ErrStaleGeneration},
		{"promote a witness", mustEncode(t, cmdPromote, &promoteCmd{ID: "w", Generation: 2}), ErrConfig},
		{"promote a stranger", mustEncode(t, cmdPromote, &promoteCmd{ID: "x", Generation: 2}), ErrConfig},
		{"stale protected", mustEncode(t, cmdSetProtected, &protectedCmd{Generation: 0}), ErrStaleGeneration},
		{"stale epoch", mustEncode(t, cmdEpoch, &epochCmd{Generation: 2, Epoch: 99}), ErrStaleGeneration},
		{"other cluster", mustEncode(t, cmdRegister, &registerCmd{ClusterID: "c2", Info: infoS}), ErrWrongCluster},
		{"id at another address", mustEncode(t, cmdRegister, &registerCmd{ClusterID: "c1", Info: NodeInfo{ID: "s", Role: RoleSecondary, RaftAddr: "1.2.3.4:1"}}), ErrInUse},
		{"bad role", mustEncode(t, cmdRegister, &registerCmd{ClusterID: "c1", Info: NodeInfo{ID: "z", Role: "boss"}}), ErrConfig},
		{"unknown version", append([]byte{9}, mustEncode(t, cmdEpoch, &epochCmd{})[1:]...), ErrCorrupt},
		{"unknown type", []byte{commandVersion, 77, 0x80}, ErrCorrupt},
		{"truncated", []byte{commandVersion}, ErrCorrupt},
		{"garbage body", []byte{commandVersion, byte(cmdPromote), 0xc1, 0xff}, ErrCorrupt},
	}
	before := *f.load()
	for _, c := range refused {
		r := applyAll(t, f, c.data)[0]
		err, _ := r.(error)
		if !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", c.name, r, c.want)
		}
	}
	after := *f.load()
	if after.Generation != before.Generation || after.Primary != before.Primary || after.Epoch != before.Epoch || len(after.Members) != 3 {
		t.Fatalf("refused entries changed the state: %+v", after)
	}

	// A new primary starts unprotected; the same primary keeps it.
	applyAll(t, f, mustEncode(t, cmdPromote, &promoteCmd{ID: "p", Generation: 2}))
	if s := f.load(); !s.Protected || s.Generation != 2 {
		t.Fatalf("same-primary promotion: %+v", *s)
	}
	applyAll(t, f, mustEncode(t, cmdPromote, &promoteCmd{ID: "s", Generation: 3}))
	if s := f.load(); s.Protected || s.Primary != "s" {
		t.Fatalf("new-primary promotion: %+v", *s)
	}
	if sec, _ := f.load().Secondary(); sec.ID != "p" {
		t.Fatalf("after failover the old primary is the secondary, got %q", sec.ID)
	}
}

type memSink struct {
	bytes.Buffer
	cancelled bool
}

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Cancel() error { s.cancelled = true; return nil }
func (s *memSink) Close() error  { return nil }

func TestFSMSnapshotRestore(t *testing.T) {
	f := newFSM(nil)
	applyAll(t, f,
		mustEncode(t, cmdRegister, &registerCmd{ClusterID: "c1", Info: infoP}),
		mustEncode(t, cmdRegister, &registerCmd{ClusterID: "c1", Info: infoS}),
		mustEncode(t, cmdPromote, &promoteCmd{ID: "p", Generation: 1}),
		mustEncode(t, cmdEpoch, &epochCmd{Generation: 1, Epoch: 77}),
	)
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	changed := 0
	g := newFSM(func() { changed++ })
	if err := g.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	a, b := f.load(), g.load()
	if a.ClusterID != b.ClusterID || a.Generation != b.Generation || a.Primary != b.Primary || a.Epoch != b.Epoch || len(b.Members) != 2 || b.Members[1] != infoS || changed != 1 {
		t.Fatalf("restored %+v from %+v", *b, *a)
	}
	for _, bad := range [][]byte{nil, {0}, {commandVersion, 0xc1}, append([]byte{commandVersion}, make([]byte, maxSnapshotBytes+1)...)} {
		h := newFSM(nil)
		if err := h.Restore(io.NopCloser(bytes.NewReader(bad))); !errors.Is(err, ErrCorrupt) {
			t.Errorf("restore of %d bad bytes: %v", len(bad), err)
		}
	}
}

// FuzzApply: no entry, however malformed, panics the FSM or breaks the
// generation's monotonicity.
func FuzzApply(f *testing.F) {
	f.Add(mustEncode(f, cmdPromote, &promoteCmd{ID: "p", Generation: 1}))
	f.Add(mustEncode(f, cmdRegister, &registerCmd{ClusterID: "c", Info: infoP}))
	f.Add(mustEncode(f, cmdEpoch, &epochCmd{Generation: 1, Epoch: 3}))
	f.Add(mustEncode(f, cmdSetProtected, &protectedCmd{Generation: 1, Protected: true}))
	f.Add([]byte{commandVersion, 2, 0x82})
	f.Fuzz(func(t *testing.T, data []byte) {
		s0 := FSMState{ClusterID: "c", Generation: 1, Primary: "p", Members: members()}
		s1, err := applyCommand(s0, data)
		if err != nil {
			return
		}
		if s1.Generation < s0.Generation || s1.Generation > s0.Generation+1 || s1.Epoch < s0.Epoch {
			t.Fatalf("transition %+v -> %+v", s0, s1)
		}
		if _, err := decodeSnapshot(data); err == nil {
			return
		}
	})
}
