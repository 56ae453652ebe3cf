package failover

import (
	"bytes"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"
)

// maxSnapshotBytes bounds what Restore reads: the state is a handful of
// fields and three members, so anything near this is corruption.
const maxSnapshotBytes = 1 << 20

// fsm is the raft state machine. Apply is called by raft's FSM goroutine
// only; readers use load(), which never blocks on Apply.
type fsm struct {
	// applyMu serialises Apply and Restore (raft already does; the mutex
	// makes it hold for direct calls from tests too).
	applyMu sync.Mutex
	state   atomic.Pointer[FSMState]
	// applied is the raft index of the last command applied (0: none
	// since the node started; a restored snapshot sets none).
	applied atomic.Uint64

	// onChange is called after every state change, from raft's FSM
	// goroutine. It must not block.
	onChange func()
}

func newFSM(onChange func()) *fsm {
	f := &fsm{onChange: onChange}
	f.state.Store(&FSMState{})
	return f
}

// load returns the current state. The caller must not mutate Members.
func (f *fsm) load() *FSMState { return f.state.Load() }

// Apply implements raft.FSM. It returns nil or an error (never panics): a
// refused or corrupt entry leaves the state unchanged on every node alike.
func (f *fsm) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	f.applyMu.Lock()
	defer f.applyMu.Unlock()
	defer f.applied.Store(l.Index) // a refused entry is applied too
	next, err := applyCommand(*f.load(), l.Data)
	if err != nil {
		return err
	}
	f.state.Store(&next)
	if f.onChange != nil {
		f.onChange()
	}
	return nil
}

// applyCommand is the pure transition: state and entry in, state out.
func applyCommand(s FSMState, data []byte) (FSMState, error) {
	t, body, err := decodeCommand(data)
	if err != nil {
		return s, err
	}
	s = s.Clone()
	switch c := body.(type) {
	case *registerCmd:
		if c.Info.ID == "" || !c.Info.Role.Valid() {
			return s, fmt.Errorf("%w: register %q with role %q", ErrConfig, c.Info.ID, c.Info.Role)
		}
		if s.ClusterID != "" && c.ClusterID != s.ClusterID {
			return s, fmt.Errorf("%w: node %s is configured for cluster %q, the cluster is %q", ErrWrongCluster, c.Info.ID, c.ClusterID, s.ClusterID)
		}
		if old, ok := s.Member(c.Info.ID); ok && old.RaftAddr != c.Info.RaftAddr {
			return s, fmt.Errorf("%w: node id %s is registered at raft address %s, not %s", ErrInUse, c.Info.ID, old.RaftAddr, c.Info.RaftAddr)
		}
		s.ClusterID = c.ClusterID
		s.upsert(c.Info)
	case *promoteCmd:
		if c.Generation != s.Generation+1 {
			return s, fmt.Errorf("%w: promote %s to generation %d, current is %d", ErrStaleGeneration, c.ID, c.Generation, s.Generation)
		}
		m, ok := s.Member(c.ID)
		if !ok || m.Role == RoleWitness {
			return s, fmt.Errorf("%w: promote %q: not a registered guest-capable member", ErrConfig, c.ID)
		}
		if c.ID != s.Primary {
			// A new primary has no secondary in sync yet.
			s.Protected = false
		}
		s.Primary = c.ID
		s.Generation = c.Generation
	case *protectedCmd:
		if c.Generation != s.Generation {
			return s, fmt.Errorf("%w: set protected at generation %d, current is %d", ErrStaleGeneration, c.Generation, s.Generation)
		}
		s.Protected = c.Protected
	case *epochCmd:
		if c.Generation != s.Generation {
			return s, fmt.Errorf("%w: epoch %d at generation %d, current is %d", ErrStaleGeneration, c.Epoch, c.Generation, s.Generation)
		}
		s.Epoch = max(s.Epoch, c.Epoch)
	default:
		return s, fmt.Errorf("%w: unhandled %s", ErrCorrupt, t)
	}
	return s, nil
}

// Snapshot implements raft.FSM. The state is immutable once stored, so the
// snapshot just holds the pointer.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	return &fsmSnapshot{state: f.load()}, nil
}

// Restore implements raft.FSM.
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, maxSnapshotBytes+1))
	if err != nil {
		return fmt.Errorf("failover: read snapshot: %w", err)
	}
	s, err := decodeSnapshot(data)
	if err != nil {
		return err
	}
	f.applyMu.Lock()
	f.state.Store(&s)
	f.applyMu.Unlock()
	if f.onChange != nil {
		f.onChange()
	}
	return nil
}

func encodeSnapshot(s *FSMState) ([]byte, error) {
	var out []byte
	if err := codec.NewEncoderBytes(&out, mh).Encode(s); err != nil {
		return nil, fmt.Errorf("failover: encode snapshot: %w", err)
	}
	return append([]byte{commandVersion}, out...), nil
}

func decodeSnapshot(data []byte) (FSMState, error) {
	if len(data) > maxSnapshotBytes {
		return FSMState{}, fmt.Errorf("%w: snapshot larger than %d bytes", ErrCorrupt, maxSnapshotBytes)
	}
	if len(data) < 1 || data[0] != commandVersion {
		return FSMState{}, fmt.Errorf("%w: snapshot version byte missing or unknown", ErrCorrupt)
	}
	var s FSMState
	if err := codec.NewDecoderBytes(data[1:], mh).Decode(&s); err != nil {
		return FSMState{}, fmt.Errorf("%w: snapshot: %v", ErrCorrupt, err)
	}
	return s, nil
}

type fsmSnapshot struct{ state *FSMState }

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	data, err := encodeSnapshot(s.state)
	if err == nil {
		_, err = io.Copy(sink, bytes.NewReader(data))
	}
	if err != nil {
		sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *fsmSnapshot) Release() {}
