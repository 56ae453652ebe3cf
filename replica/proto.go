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
	// PurposePostcopy is one of a post-copy migration's two extra
	// connections (Hello.Channel), tied to it by Hello.MigrationID.
	PurposePostcopy = "postcopy"
	// PurposeMoving is a pair primary's move notice to its secondary:
	// its guest is being moved by post-copy migration MigrationID to
	// Destination, from the final epoch FinalEpoch (see moving.go).
	PurposeMoving = "moving"
)

// Post-copy channels (Hello.Channel).
const (
	ChannelUrgent = "urgent"
	ChannelBulk   = "bulk"
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
	// Commit (migrate) asks for the two-phase switch-over: the
	// destination loads the final epoch, answers "ready" and resumes only
	// on the source's commit line (see Commit). A receiver that predates
	// it ignores the field and resumes at once, acknowledging Final; the
	// source then knows it spoke to an older receiver.
	Commit bool `json:"commit,omitempty"`
	// MigrationID names this migration (migrate with Commit), so a
	// destination left awaiting its commit can ask the source's API
	// (SourceAPI) how the migration ended there.
	MigrationID string `json:"migration_id,omitempty"`
	SourceAPI   string `json:"source_api,omitempty"`
	// Devices lists the device sections, with versions, the guest's
	// state carries (nil: the sender's guest cannot say). A receiver
	// refuses one it does not load (see sections.go).
	Devices map[string]uint32 `json:"devices,omitempty"`
	// Postcopy (migrate) asks whether the destination can take a switch
	// to post-copy (HelloReply.Postcopy). Channel (postcopy) names the
	// post-copy connection: ChannelUrgent or ChannelBulk.
	Postcopy bool   `json:"postcopy,omitempty"`
	Channel  string `json:"channel,omitempty"`
	// Resume (postcopy) says the channel replaces one of a link that was
	// lost after the commit (`tandem migrate --resume`): the receiver
	// takes it only while it holds that migration's post-copy with its
	// link down. A receiver that predates it sees a second channel of a
	// migration already connected and refuses it.
	Resume bool `json:"resume,omitempty"`
	// HoldOutput (migrate, with Postcopy) asks the destination to hold
	// all the guest's output from its resume until the source's API
	// reports the migration completed: the source is protected, and its
	// secondary's epoch must stay a fallback that loses nothing said.
	HoldOutput bool `json:"hold_output,omitempty"`
	// Destination and FinalEpoch (moving): where the guest goes, and
	// the epoch the secondary must hold, the image it starts from there.
	Destination string `json:"destination,omitempty"`
	FinalEpoch  uint64 `json:"final_epoch,omitempty"`
	// Resident (migrate, replicate) names the source's long runs of resident
	// memory, [first page, pages], so the destination can populate them
	// while the stream arrives (image_ahead.go). A hint, bounded by
	// MaxResidentRuns; a receiver that predates it ignores it.
	Resident [][2]uint64 `json:"resident,omitempty"`
	// Store is set only in a Store's image.tnd, never on the wire: how
	// the file was written (docs/DURABILITY.md).
	Store *StoreStamp `json:"store,omitempty"`
}

// StoreStamp says how a stored image.tnd was written: under which sync
// policy and in which boot of its host. A file written under --sync
// memory in an earlier boot, and not closed cleanly, may lack an
// acknowledged epoch, and is not offered (ErrStoreMayLack).
type StoreStamp struct {
	Sync string `json:"sync"`
	Boot string `json:"boot,omitempty"`
}

// HelloReply is the receiver's answer: OK, or the one-line reason it
// refuses.
type HelloReply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	Build string `json:"build,omitempty"`
	// LastEpoch is the receiver's last committed epoch (replicate).
	LastEpoch uint64 `json:"last_epoch,omitempty"`
	// Activated (replicate, with OK false): this secondary was activated
	// and runs the guest itself. A primary told so is fenced: it must stop
	// releasing output and pause its guest. Older primaries see only the
	// refusal.
	Activated bool `json:"activated,omitempty"`
	// SectionsChecked (with OK): the receiver checked Hello.Devices
	// against the sections it loads. A receiver that predates the
	// field leaves it false, and the sender then streams it only the
	// sections every build loads.
	SectionsChecked bool `json:"sections_checked,omitempty"`
	// Postcopy (with OK, to a Hello asking for it): the destination
	// registered the guest's memory with userfaultfd and takes a switch
	// to post-copy; PostcopyRefused is why not, in one line. An older
	// receiver sets neither: the source stays precopy-only.
	Postcopy        bool   `json:"postcopy,omitempty"`
	PostcopyRefused string `json:"postcopy_refused,omitempty"`
	// HoldOutput (with Postcopy, to a Hello asking for it): the
	// destination holds the guest's output until the source reports the
	// migration completed. An older receiver never sets it, and a
	// protected source then refuses to migrate.
	HoldOutput bool `json:"hold_output,omitempty"`
	// PostcopyGone (with OK false, to a post-copy channel): the
	// receiver no longer holds the migration (abandoned, failed for
	// good, or never held), so no resume of it can succeed. An older
	// receiver never sets it: its refusal then reads as any other.
	PostcopyGone bool `json:"postcopy_gone,omitempty"`
	// Retired (a move notice's refusal): this secondary retired by the
	// named migration. A moving primary whose commit answer was lost
	// learns from it that the commit took.
	Retired string `json:"retired,omitempty"`
}

// Control is a line the sender writes after a migration's final epoch in
// the two-phase switch-over (Hello.Commit): commit (the source has
// stopped its guest for good; the destination resumes) or abort (the
// source resumes; the destination drops what it loaded).
type Control struct {
	Migrate string `json:"migrate"` // "commit" or "abort"
	Epoch   uint64 `json:"epoch"`
	Reason  string `json:"reason,omitempty"`
}

// Control verbs.
const (
	ControlCommit = "commit"
	ControlAbort  = "abort"
	// ControlHeartbeat (moving) says the moving primary is alive.
	ControlHeartbeat = "heartbeat"
)

// ErrPeerActivated is a secondary that refused a primary because it was
// activated: it runs the guest now, so the primary is fenced.
var ErrPeerActivated = errors.New("the secondary was activated and runs the guest itself")

// ErrProtocol is a data connection that does not speak this protocol.
var ErrProtocol = errors.New("replica: bad data-channel message")

// ErrPostcopyGone is a post-copy channel's refusal by a receiver that no
// longer holds the migration: Receiver.PostcopyConn wraps it to say so,
// and a dialer's error wraps it when the receiver said so
// (HelloReply.PostcopyGone).
var ErrPostcopyGone = errors.New("the destination no longer holds the post-copy migration")

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
