package replica

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/internal/trust"
)

// A pair primary that moves its guest by post-copy migration tells its
// secondary on a move notice: a connection to the secondary's data port
// whose Hello has purpose PurposeMoving, then heartbeat lines, then
// commit (the guest runs at the destination now: the secondary retires)
// or abort (the move failed: the primary runs the guest again). See
// docs/POSTCOPY.md, "A protected guest".

// Move is a move notice a secondary heard.
type Move struct {
	MigrationID string
	Destination string
	// From is the moving primary's address; Epoch the final epoch, the
	// one this secondary holds and the destination starts from.
	From  string
	Epoch uint64
	Since time.Time
	// Open: the notice's connection is open (the primary is alive, or
	// not yet known dead); Done: the primary said the move completed.
	Open, Done bool
}

// ErrMoved is an activation refused because the guest moved away: this
// secondary's image is older than the guest running at the destination.
var ErrMoved = errors.New("the guest moved to another host")

// MoveHeartbeat is how often a moving primary says it is alive.
const MoveHeartbeat = 500 * time.Millisecond

// Move returns the move notice heard last, if any: in progress (Open,
// not Done), retired (Done) or left by a primary that went away (neither).
func (s *Secondary) Move() (Move, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.move == nil {
		return Move{}, false
	}
	mv := *s.move
	mv.Open = s.moveConn != nil
	return mv, true
}

// movedError says why a retired secondary does not activate.
func movedError(mv *Move) error {
	return fmt.Errorf("%w: refusing to activate: the guest moved to %s by migration %s after epoch %d, which this secondary holds, stale now (it protects the guest again once a primary syncs its full image to it)",
		ErrMoved, mv.Destination, mv.MigrationID, mv.Epoch)
}

// MovedError is why a retired secondary refuses activation (nil: it has
// not retired).
func (s *Secondary) MovedError() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.move == nil || !s.move.Done {
		return nil
	}
	return movedError(s.move)
}

// serveMoving serves a move notice (the handshake read): it is refused
// unless this secondary holds the final epoch the guest moves from, and
// kept until commit, abort, or its end.
func (s *Secondary) serveMoving(conn net.Conn, h Hello, br *bufio.Reader) error {
	refuse := func(activated bool, format string, a ...any) error {
		err := fmt.Errorf(format, a...)
		conn.SetWriteDeadline(time.Now().Add(s.R.timeout()))
		writeLine(conn, HelloReply{OK: false, Error: err.Error(), Build: s.R.Build, Activated: activated})
		return err
	}
	s.mu.Lock()
	activated, cur, busy := s.activated, s.current, s.moveConn != nil
	var retired error
	if s.move != nil && s.move.Done {
		retired = movedError(s.move)
	}
	s.mu.Unlock()
	switch {
	case activated:
		return refuse(true, "this secondary has been activated and runs the guest itself")
	case retired != nil:
		return refuse(false, "%v", retired)
	case h.MigrationID == "" || h.Destination == "":
		return refuse(false, "a move notice needs a migration id and a destination")
	case busy:
		return refuse(false, "busy: another move notice is open")
	case cur == nil:
		return refuse(false, "this secondary holds no committed image to fall back to")
	}
	if c := cur.Committed(); !c.Consistent || c.Epoch != h.FinalEpoch {
		return refuse(false, "this secondary's committed epoch is %d (consistent %v), not the final epoch %d the guest moves from", c.Epoch, c.Consistent, h.FinalEpoch)
	}
	mv := &Move{MigrationID: h.MigrationID, Destination: h.Destination, From: conn.RemoteAddr().String(), Epoch: h.FinalEpoch, Since: time.Now()}
	s.mu.Lock()
	if s.activated || s.moveConn != nil {
		s.mu.Unlock()
		return refuse(s.activated, "this secondary was activated, or took another move notice, meanwhile")
	}
	s.move, s.moveConn, s.moveHeard = mv, conn, mv.Since
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		if s.moveConn == conn {
			s.moveConn = nil
		}
		s.mu.Unlock()
	}()
	s.R.log().Warn("the primary moves the guest by post-copy; this secondary's epoch is the fallback until it completes",
		"migration", mv.MigrationID, "destination", mv.Destination, "epoch", mv.Epoch)
	if err := s.R.replyOK(conn, mv.Epoch, h.Kind); err != nil {
		return err
	}
	for {
		var c Control
		if err := readLine(br, &c); err != nil {
			s.R.log().Warn("move notice ended without an outcome: the primary may be gone; activation allowed once it is not heard",
				"migration", mv.MigrationID, "err", err)
			return err
		}
		switch c.Migrate {
		case ControlHeartbeat:
			s.mu.Lock()
			s.moveHeard = time.Now()
			s.mu.Unlock()
		case ControlAbort:
			s.mu.Lock()
			if s.move == mv {
				s.move = nil
			}
			s.mu.Unlock()
			s.R.log().Info("move aborted: the primary runs the guest again", "migration", mv.MigrationID, "reason", c.Reason)
			return nil
		case ControlCommit:
			return s.retire(conn, mv)
		default:
			return fmt.Errorf("%w: move notice control %q", ErrProtocol, c.Migrate)
		}
	}
}

// retire marks the move done (unless this secondary was activated
// first, which the primary is told), records it in the store's directory
// (durably, so a restart stays retired: moved.go) and answers. If it
// cannot be recorded, the commit is refused: the destination then keeps
// holding its output, which is safe, where a retirement a restart forgets
// is not.
func (s *Secondary) retire(conn net.Conn, mv *Move) error {
	s.mu.Lock()
	activated := s.activated
	if !activated {
		mv.Done = true
	}
	store := cmp.Or(s.Store, s.lostStore)
	s.mu.Unlock()
	var saveErr error
	if !activated && store != nil {
		if saveErr = store.SaveMoved(*mv); saveErr != nil {
			s.mu.Lock()
			mv.Done = false
			s.mu.Unlock()
		}
	}
	conn.SetWriteDeadline(time.Now().Add(s.R.timeout()))
	switch {
	case activated:
		writeLine(conn, HelloReply{OK: false, Activated: true, Build: s.R.Build, Error: "this secondary was activated and runs the guest itself"})
		return errors.New("move commit refused: already activated")
	case saveErr != nil:
		s.R.log().Error("move commit refused: the retirement cannot be recorded in the data directory", "migration", mv.MigrationID, "err", saveErr)
		writeLine(conn, HelloReply{OK: false, Build: s.R.Build, Error: "this secondary cannot record its retirement durably: " + saveErr.Error()})
		return saveErr
	}
	s.R.log().Warn("RETIRED: the guest runs at the destination now; this secondary refuses activation",
		"migration", mv.MigrationID, "destination", mv.Destination, "epoch", mv.Epoch)
	return writeLine(conn, HelloReply{OK: true, Build: s.R.Build, LastEpoch: mv.Epoch})
}

// MoveNotice is the moving primary's end of a move notice.
type MoveNotice struct {
	conn net.Conn
	br   *bufio.Reader
	stop chan struct{}
	done chan struct{}
	err  error // the heartbeat's write error, once done
}

// OpenMoveNotice tells the secondary at addr that the guest (hello's
// kind and config) moves by migration id to dest from epoch final, and
// starts the heartbeat. ctx bounds the connect and the handshake.
func OpenMoveNotice(ctx context.Context, addr string, hello Hello, o DialOptions) (*MoveNotice, error) {
	if err := trust.CheckDial(o.TLS, o.Insecure, "move notice to", addr); err != nil {
		return nil, err
	}
	conn, err := trust.Dial(ctx, o.TLS, addr, o.Expect)
	if err != nil {
		return nil, fmt.Errorf("move notice: connect to %s: %w", addr, err)
	}
	deadline := time.Now().Add(DefaultHandshakeTimeout)
	if dl, ok := ctx.Deadline(); ok {
		deadline = dl
	}
	conn.SetDeadline(deadline)
	hello.Proto, hello.Purpose = ProtoVersion, PurposeMoving
	hello.Format, hello.MinReader = uint16(checkpoint.Current), uint16(checkpoint.MinReadable)
	br := bufio.NewReader(conn)
	var reply HelloReply
	if err := writeLine(conn, hello); err == nil {
		err = readLine(br, &reply)
	}
	switch {
	case err != nil:
		conn.Close()
		return nil, fmt.Errorf("move notice to %s: %w", addr, err)
	case !reply.OK && reply.Activated:
		conn.Close()
		return nil, fmt.Errorf("move notice: %s refused: %w", addr, ErrPeerActivated)
	case !reply.OK:
		conn.Close()
		return nil, fmt.Errorf("move notice: %s refused: %s", addr, oneLine(reply.Error))
	}
	conn.SetDeadline(time.Time{})
	n := &MoveNotice{conn: conn, br: br, stop: make(chan struct{}), done: make(chan struct{})}
	go n.beat() // joined by End and Close
	return n, nil
}

// beat writes a heartbeat every MoveHeartbeat until stopped.
func (n *MoveNotice) beat() {
	defer close(n.done)
	t := time.NewTicker(MoveHeartbeat)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
		}
		n.conn.SetWriteDeadline(time.Now().Add(MoveHeartbeat * 4))
		if err := writeLine(n.conn, Control{Migrate: ControlHeartbeat}); err != nil {
			n.err = err
			return
		}
	}
}

// halt stops the heartbeat and waits for it.
func (n *MoveNotice) halt() {
	select {
	case <-n.stop:
	default:
		close(n.stop)
	}
	<-n.done
}

// Commit tells the secondary the guest runs at the destination now and
// waits (up to timeout) for its answer: nil once it has retired.
func (n *MoveNotice) Commit(timeout time.Duration) error {
	n.halt()
	defer n.conn.Close()
	n.conn.SetDeadline(time.Now().Add(timeout))
	if err := writeLine(n.conn, Control{Migrate: ControlCommit}); err != nil {
		return fmt.Errorf("move notice: send the commit: %w", err)
	}
	var reply HelloReply
	if err := readLine(n.br, &reply); err != nil {
		return fmt.Errorf("move notice: the secondary's answer to the commit: %w", err)
	}
	if reply.Activated {
		return fmt.Errorf("move notice: %w", ErrPeerActivated)
	}
	if !reply.OK {
		return fmt.Errorf("move notice: the secondary refused the commit: %s", oneLine(reply.Error))
	}
	return nil
}

// Abort tells the secondary the move failed (best effort) and closes.
func (n *MoveNotice) Abort(reason string) {
	n.halt()
	n.conn.SetWriteDeadline(time.Now().Add(time.Second))
	writeLine(n.conn, Control{Migrate: ControlAbort, Reason: reason})
	n.conn.Close()
}

// Close stops the heartbeat and closes the notice with no outcome: the
// secondary takes the primary as gone once it is not heard.
func (n *MoveNotice) Close() {
	n.halt()
	n.conn.Close()
}
