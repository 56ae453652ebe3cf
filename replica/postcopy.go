package replica

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/trust"
)

// DialPostcopy opens one of a post-copy migration's two extra
// connections (channel: ChannelUrgent or ChannelBulk) to the receiver at
// addr, through the same dialer and trust as the migration's own link,
// tied to it by id. The receiver refuses a channel of a migration it is
// not receiving, or one that did not ask for post-copy. The connection
// it returns carries nothing but post-copy frames after the handshake.
func DialPostcopy(ctx context.Context, addr, id, channel string, o DialOptions) (net.Conn, error) {
	return dialPostcopy(ctx, addr, Hello{Proto: ProtoVersion, Purpose: PurposePostcopy, MigrationID: id, Channel: channel}, o)
}

// ResumePostcopy is DialPostcopy for a post-copy run whose link was
// lost (`tandem migrate --resume`): the Hello says it resumes, and the
// receiver takes it only if it holds migration id with its link down,
// and starts the new run once both channels are in (either order).
func ResumePostcopy(ctx context.Context, addr, id, channel string, o DialOptions) (net.Conn, error) {
	return dialPostcopy(ctx, addr, Hello{Proto: ProtoVersion, Purpose: PurposePostcopy, MigrationID: id, Channel: channel, Resume: true}, o)
}

// postcopyGoneError is a receiver's refusal that carried PostcopyGone:
// its own words (which already say so), and errors.Is ErrPostcopyGone.
type postcopyGoneError string

func (e postcopyGoneError) Error() string        { return string(e) }
func (e postcopyGoneError) Is(target error) bool { return target == ErrPostcopyGone }

func dialPostcopy(ctx context.Context, addr string, h Hello, o DialOptions) (net.Conn, error) {
	channel := h.Channel
	if err := trust.CheckDial(o.TLS, o.Insecure, "post-copy link to", addr); err != nil {
		return nil, err
	}
	conn, err := trust.Dial(ctx, o.TLS, addr, o.Expect)
	if err != nil {
		return nil, fmt.Errorf("post-copy %s connection to %s: %w", channel, addr, err)
	}
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(DefaultHandshakeTimeout)
	}
	conn.SetDeadline(dl)
	err = writeLine(conn, h)
	var reply HelloReply
	if err == nil {
		err = readLineUnbuffered(conn, &reply)
	}
	switch {
	case err == nil && !reply.OK && reply.PostcopyGone:
		err = fmt.Errorf("refused: %w", postcopyGoneError(oneLine(reply.Error)))
	case err == nil && !reply.OK:
		err = fmt.Errorf("refused: %s", oneLine(reply.Error))
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("post-copy %s connection to %s: %w", channel, addr, err)
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}

// readLineUnbuffered reads one JSON line a byte at a time, so nothing
// after it is taken from conn (the post-copy frames that follow are read
// by their own reader).
func readLineUnbuffered(conn net.Conn, v any) error {
	var line []byte
	var b [1]byte
	for {
		if _, err := conn.Read(b[:]); err != nil {
			return err
		}
		if b[0] == '\n' {
			break
		}
		if line = append(line, b[0]); len(line) > maxControlLine {
			return fmt.Errorf("%w: line longer than %d bytes", ErrProtocol, maxControlLine)
		}
	}
	if err := json.Unmarshal(line, v); err != nil {
		return fmt.Errorf("%w: bad post-copy handshake reply", ErrProtocol)
	}
	return nil
}

// errPostcopyTaken is handshakeConn's word that the connection was a
// post-copy channel, handed to Receiver.PostcopyConn.
var errPostcopyTaken = errors.New("post-copy channel handed over")

// postcopyChannel answers a post-copy channel's Hello: PostcopyConn
// takes it (the receiver's OK goes first) or refuses it.
func (r *Receiver) postcopyChannel(conn net.Conn, h Hello, buffered int) error {
	reply := HelloReply{OK: true, Build: r.Build}
	var err error
	switch {
	case r.PostcopyConn == nil:
		err = errors.New("this receiver takes no post-copy connections")
	case h.Proto != ProtoVersion:
		err = fmt.Errorf("data-channel protocol %d, this receiver speaks %d", h.Proto, ProtoVersion)
	case h.Channel != ChannelUrgent && h.Channel != ChannelBulk:
		err = fmt.Errorf("post-copy channel %q: want %q or %q", h.Channel, ChannelUrgent, ChannelBulk)
	case buffered > 0:
		err = errors.New("post-copy handshake: bytes after the Hello before the reply")
	}
	if err == nil {
		err = r.PostcopyConn(h, nil) // check only: is this migration here?
	}
	conn.SetWriteDeadline(time.Now().Add(r.timeout()))
	if err != nil {
		reply = HelloReply{OK: false, Error: err.Error(), Build: r.Build, PostcopyGone: errors.Is(err, ErrPostcopyGone)}
		writeLine(conn, reply)
		return fmt.Errorf("post-copy %s connection for migration %q refused: %w", h.Channel, h.MigrationID, err)
	}
	if err := writeLine(conn, reply); err != nil {
		return err
	}
	conn.SetDeadline(time.Time{})
	if err := r.PostcopyConn(h, conn); err != nil {
		return fmt.Errorf("post-copy %s connection for migration %q: %w", h.Channel, h.MigrationID, err)
	}
	return errPostcopyTaken
}

// grantPostcopy answers a Hello's post-copy question (only Postcopy and
// PostcopyRefused of the reply are set).
func (r *Receiver) grantPostcopy(h Hello, g guest.Guest, o MigrationOptions) HelloReply {
	switch {
	case !h.Postcopy:
		return HelloReply{}
	case !h.Commit || h.MigrationID == "":
		return HelloReply{PostcopyRefused: "post-copy needs the two-phase switch-over and a migration id"}
	case o.Postcopy == nil:
		return HelloReply{PostcopyRefused: "this receiver does not take post-copy"}
	}
	if err := o.Postcopy(g, h); err != nil {
		r.log().Warn("post-copy refused; the migration stays precopy-only", "err", err)
		return HelloReply{PostcopyRefused: oneLine(err.Error())}
	}
	return HelloReply{Postcopy: true, HoldOutput: h.HoldOutput && o.HoldsOutput}
}
