package failover

import (
	"fmt"

	"github.com/hashicorp/go-msgpack/v2/codec"
)

// commandVersion is the first byte of every raft log entry this package
// writes, and of every FSM snapshot. A node that reads a version it does not
// know refuses the entry (deterministically on every node) instead of
// guessing.
const commandVersion byte = 1

// commandType is the second byte of a log entry. Numbers are never reused.
type commandType byte

const (
	cmdRegister     commandType = 1
	cmdPromote      commandType = 2
	cmdSetProtected commandType = 3
	cmdEpoch        commandType = 4
)

func (t commandType) String() string {
	switch t {
	case cmdRegister:
		return "register"
	case cmdPromote:
		return "promote"
	case cmdSetProtected:
		return "set-protected"
	case cmdEpoch:
		return "epoch"
	}
	return fmt.Sprintf("command(%d)", byte(t))
}

// registerCmd upserts a member's info. ClusterID must match the state's (or
// sets it when the state has none).
type registerCmd struct {
	ClusterID string   `codec:"cluster"`
	Info      NodeInfo `codec:"info"`
}

// promoteCmd makes ID the primary with Generation, which must be exactly the
// current generation plus one (compare-and-set: two racing promotions cannot
// both win).
type promoteCmd struct {
	ID         string `codec:"id"`
	Generation uint64 `codec:"gen"`
}

// protectedCmd sets Protected; refused unless Generation is current.
type protectedCmd struct {
	Generation uint64 `codec:"gen"`
	Protected  bool   `codec:"protected"`
}

// epochCmd raises Epoch; refused unless Generation is current. A lower epoch
// is ignored (reports may be reordered by retries).
type epochCmd struct {
	Generation uint64 `codec:"gen"`
	Epoch      uint64 `codec:"epoch"`
}

func msgpackHandle() *codec.MsgpackHandle {
	h := &codec.MsgpackHandle{}
	h.WriteExt = true
	h.RawToString = true
	return h
}

var mh = msgpackHandle()

// encodeCommand returns version, type, msgpack(body).
func encodeCommand(t commandType, body any) ([]byte, error) {
	var out []byte
	if err := codec.NewEncoderBytes(&out, mh).Encode(body); err != nil {
		return nil, fmt.Errorf("failover: encode %s: %w", t, err)
	}
	return append([]byte{commandVersion, byte(t)}, out...), nil
}

// decodeCommand parses a log entry into its type and body (a pointer to one
// of the command structs).
func decodeCommand(data []byte) (commandType, any, error) {
	if len(data) < 2 {
		return 0, nil, fmt.Errorf("%w: entry of %d bytes", ErrCorrupt, len(data))
	}
	if data[0] != commandVersion {
		return 0, nil, fmt.Errorf("%w: command version %d, want %d", ErrCorrupt, data[0], commandVersion)
	}
	t := commandType(data[1])
	var body any
	switch t {
	case cmdRegister:
		body = &registerCmd{}
	case cmdPromote:
		body = &promoteCmd{}
	case cmdSetProtected:
		body = &protectedCmd{}
	case cmdEpoch:
		body = &epochCmd{}
	default:
		return t, nil, fmt.Errorf("%w: unknown %s", ErrCorrupt, t)
	}
	if err := codec.NewDecoderBytes(data[2:], mh).Decode(body); err != nil {
		return t, nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, t, err)
	}
	return t, body, nil
}
