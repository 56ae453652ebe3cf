package replica

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/tandemvm/tandem/guest"
)

// ProtoVersion is the version of the data-channel handshake. The stream
// that follows carries its own format version (checkpoint).
const ProtoVersion = 1

// Purposes of a data connection.
const (
	PurposeMigrate   = "migrate"   // one-shot live migration: the destination resumes the guest
	PurposeReplicate = "replicate" // FT epochs: the secondary commits and acknowledges each one
)

// maxControlLine bounds one handshake or acknowledgement line, so garbage
// sent to a data port cannot make the receiver allocate without limit.
const maxControlLine = 64 << 10

// Hello is the first line the sender writes on a data connection, before
// the checkpoint stream: what it is about to send, so the receiver can
// refuse it before the sender pauses anything.
type Hello struct {
	Proto      int          `json:"proto"`
	Purpose    string       `json:"purpose"`
	Kind       string       `json:"guest_kind"`
	Config     guest.Config `json:"config"`
	Build      string       `json:"build"`
	Format     uint16       `json:"format_version"`
	MinReader  uint16       `json:"min_reader"`
	Generation uint64       `json:"generation,omitempty"`
	Sender     string       `json:"sender,omitempty"`
	Verify     bool         `json:"verify,omitempty"`
}

// HelloReply is the receiver's answer: OK, or the one-line reason it
// refuses.
type HelloReply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	Build string `json:"build,omitempty"`
	// LastEpoch is the receiver's last committed epoch (replicate).
	LastEpoch uint64 `json:"last_epoch,omitempty"`
}

// ErrProtocol is a data connection that does not speak this protocol.
var ErrProtocol = errors.New("replica: bad data-channel message")

// writeLine writes v as one JSON line.
func writeLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// readLine reads one JSON line of at most maxControlLine bytes into v.
func readLine(r *bufio.Reader, v any) error {
	var line []byte
	for {
		chunk, isPrefix, err := r.ReadLine()
		if err != nil {
			if errors.Is(err, io.EOF) && len(line) > 0 {
				return fmt.Errorf("%w: truncated line", ErrProtocol)
			}
			return err
		}
		line = append(line, chunk...)
		if len(line) > maxControlLine {
			return fmt.Errorf("%w: line longer than %d bytes", ErrProtocol, maxControlLine)
		}
		if !isPrefix {
			break
		}
	}
	if err := json.Unmarshal(line, v); err != nil {
		shown := line
		if len(shown) > 40 {
			shown = shown[:40]
		}
		return fmt.Errorf("%w: %q is not a tandem handshake (is the sender a tandem of this protocol version?)", ErrProtocol, shown)
	}
	return nil
}
