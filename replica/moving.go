package replica

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
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

// moveReadTimeout ends a move notice on the secondary's side when the
// primary has not been heard for this long (six heartbeats).
const moveReadTimeout = 6 * MoveHeartbeat

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
	activated, cur, busy, primary := s.activated, s.current, s.moveConn != nil, s.connPeer
	var retired error
	var retiredBy string
	if s.move != nil && s.move.Done {
		retired, retiredBy = movedError(s.move), s.move.MigrationID
	}
	var stale net.Conn
	if busy && s.move != nil && !s.move.Done && s.move.MigrationID == h.MigrationID {
		// The same primary reopens its notice (its heartbeat failed): the
		// old connection is dead to it, so this one replaces it.
		stale, s.moveConn, busy = s.moveConn, nil, false
	}
	s.mu.Unlock()
	if stale != nil {
		// Closed after mu: a TLS close on a dead link may wait seconds
		// to send its goodbye, and activation and status take mu.
		stale.Close()
	}
	switch {
	case activated:
		return refuse(true, "this secondary has been activated and runs the guest itself")
	case retired != nil:
		conn.SetWriteDeadline(time.Now().Add(s.R.timeout()))
		writeLine(conn, HelloReply{OK: false, Error: retired.Error(), Build: s.R.Build, Retired: retiredBy})
		return retired
	case h.MigrationID == "" || h.Destination == "":
		return refuse(false, "a move notice needs a migration id and a destination")
	case primary != "" && peerName(conn) != primary:
		// Its commit retires this secondary for good: only the primary
		// whose epochs it holds may send it, as only that primary may
		// stream epochs (Serve's check of the sender).
		return refuse(false, "a move notice from %q: this secondary's primary is %q", peerName(conn), primary)
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
	return s.followMove(conn, br, mv)
}

// followMove reads an open move notice until its outcome: heartbeats
// keep the primary heard, abort ends the move (the primary runs the
// guest again), commit retires this secondary.
func (s *Secondary) followMove(conn net.Conn, br *bufio.Reader, mv *Move) error {
	for {
		var c Control
		// A primary silently cut off must not keep the notice open until
		// TCP gives up: a few missed heartbeats end it (the primary
		// reopens it when it can).
		conn.SetReadDeadline(time.Now().Add(moveReadTimeout))
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
	addr  string
	hello Hello
	opts  DialOptions

	// conn and br are the notice's connection; beat replaces them when
	// it reopens the notice, and only beat uses them until halt returns.
	conn net.Conn
	br   *bufio.Reader
	stop chan struct{}
	done chan struct{}

	// mu guards the fields below: why the notice is down (lost: the
	// heartbeat failed and no reopen took yet; "" while it is up) and
	// since when, and whether the secondary was found activated.
	mu        sync.Mutex
	lost      string
	lostSince time.Time
	activated bool
}

// OpenMoveNotice tells the secondary at addr that the guest (hello's
// kind and config) moves by migration id to dest from epoch final, and
// starts the heartbeat. ctx bounds the connect and the handshake.
func OpenMoveNotice(ctx context.Context, addr string, hello Hello, o DialOptions) (*MoveNotice, error) {
	hello.Proto, hello.Purpose = ProtoVersion, PurposeMoving
	hello.Format, hello.MinReader = uint16(checkpoint.Current), uint16(checkpoint.MinReadable)
	conn, br, err := dialMoveNotice(ctx, addr, hello, o)
	if err != nil {
		return nil, err
	}
	n := &MoveNotice{addr: addr, hello: hello, opts: o, conn: conn, br: br, stop: make(chan struct{}), done: make(chan struct{})}
	go n.beat() // joined by End and Close
	return n, nil
}

// dialMoveNotice connects and handshakes one move notice. A secondary
// that retired by this very migration answers with ErrMoved.
func dialMoveNotice(ctx context.Context, addr string, hello Hello, o DialOptions) (net.Conn, *bufio.Reader, error) {
	if err := trust.CheckDial(o.TLS, o.Insecure, "move notice to", addr); err != nil {
		return nil, nil, err
	}
	conn, err := trust.Dial(ctx, o.TLS, addr, o.Expect)
	if err != nil {
		return nil, nil, fmt.Errorf("move notice: connect to %s: %w", addr, err)
	}
	deadline := time.Now().Add(DefaultHandshakeTimeout)
	if dl, ok := ctx.Deadline(); ok {
		deadline = dl
	}
	conn.SetDeadline(deadline)
	br := bufio.NewReader(conn)
	var reply HelloReply
	if err := writeLine(conn, hello); err == nil {
		err = readLine(br, &reply)
	}
	switch {
	case err != nil:
		conn.Close()
		return nil, nil, fmt.Errorf("move notice to %s: %w", addr, err)
	case !reply.OK && reply.Activated:
		conn.Close()
		return nil, nil, fmt.Errorf("move notice: %s refused: %w", addr, ErrPeerActivated)
	case !reply.OK && reply.Retired != "" && reply.Retired == hello.MigrationID:
		conn.Close()
		return nil, nil, fmt.Errorf("move notice: %s retired by migration %s: %w", addr, reply.Retired, ErrMoved)
	case !reply.OK:
		conn.Close()
		return nil, nil, fmt.Errorf("move notice: %s refused: %s", addr, oneLine(reply.Error))
	}
	conn.SetDeadline(time.Time{})
	return conn, br, nil
}

// beat writes a heartbeat every MoveHeartbeat until stopped. A failed
// heartbeat is not the end: the secondary stops counting this primary as
// heard (and may be activated) until the notice is open again, so beat
// says so (Lost) and reopens it, for the same migration, until it takes,
// the secondary turns out activated, or the notice is stopped.
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
		if n.conn == nil {
			if !n.reopen() {
				return
			}
			continue
		}
		n.conn.SetWriteDeadline(time.Now().Add(MoveHeartbeat * 4))
		if err := writeLine(n.conn, Control{Migrate: ControlHeartbeat}); err != nil {
			n.conn.Close()
			n.conn, n.br = nil, nil
			n.mu.Lock()
			n.lost, n.lostSince = "its heartbeat failed ("+err.Error()+"); reopening it", time.Now()
			n.mu.Unlock()
		}
	}
}

// reopen tries once to open the notice again; false: give up (the
// secondary was activated, or retired, which only a commit makes).
func (n *MoveNotice) reopen() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 4*MoveHeartbeat)
	defer cancel()
	go func() { // a stop cuts a reopen short
		select {
		case <-n.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	conn, br, err := dialMoveNotice(ctx, n.addr, n.hello, n.opts)
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case err == nil:
		n.conn, n.br, n.lost, n.lostSince = conn, br, "", time.Time{}
		return true
	case errors.Is(err, ErrPeerActivated):
		n.activated, n.lost = true, "the secondary was activated: "+err.Error()
		return false
	}
	n.lost = "reopening it failed (" + err.Error() + "); trying again"
	return true
}

// Lost says why the notice is down ("" while it is up) and since when:
// while it is, the secondary does not hear this primary and may be
// activated without --force.
func (n *MoveNotice) Lost() (string, time.Time) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.lost, n.lostSince
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
// waits (up to timeout) for its answer: nil once it has retired. If the
// notice is down or the answer does not come, it opens the notice again
// and asks again, within the timeout: a secondary that already retired
// by this migration says so on the handshake (ErrMoved), which is the
// answer that was lost.
func (n *MoveNotice) Commit(timeout time.Duration) error {
	n.halt()
	err := n.commit(timeout)
	if err == nil {
		n.settled()
	}
	return err
}

// settled clears Lost: the notice has done its work.
func (n *MoveNotice) settled() {
	n.mu.Lock()
	n.lost, n.lostSince = "", time.Time{}
	n.mu.Unlock()
}

func (n *MoveNotice) commit(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	err := errors.New("move notice: not open")
	if n.conn != nil {
		err = n.commitOn(n.conn, n.br, deadline)
	}
	for err != nil && !errors.Is(err, ErrPeerActivated) && !errors.Is(err, errCommitRefused) && time.Now().Before(deadline) {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		conn, br, derr := dialMoveNotice(ctx, n.addr, n.hello, n.opts)
		cancel()
		switch {
		case errors.Is(derr, ErrMoved):
			return nil // retired by this migration: the answer was lost
		case derr == nil:
			err = n.commitOn(conn, br, deadline)
		case errors.Is(derr, ErrPeerActivated):
			return fmt.Errorf("move notice: %w", ErrPeerActivated)
		default:
			err = fmt.Errorf("%w (asked again: %w)", err, derr)
			time.Sleep(min(MoveHeartbeat, time.Until(deadline)))
		}
	}
	return err
}

// errCommitRefused is a secondary's refusal of a commit (not a lost
// answer): asking again would not help.
var errCommitRefused = errors.New("move notice: the secondary refused the commit")

// commitOn sends the commit on conn and reads the answer; it closes conn.
func (n *MoveNotice) commitOn(conn net.Conn, br *bufio.Reader, deadline time.Time) error {
	defer conn.Close()
	conn.SetDeadline(deadline)
	if err := writeLine(conn, Control{Migrate: ControlCommit}); err != nil {
		return fmt.Errorf("move notice: send the commit: %w", err)
	}
	var reply HelloReply
	if err := readLine(br, &reply); err != nil {
		return fmt.Errorf("move notice: the secondary's answer to the commit: %w", err)
	}
	if reply.Activated {
		return fmt.Errorf("move notice: %w", ErrPeerActivated)
	}
	if !reply.OK {
		return fmt.Errorf("%w: %s", errCommitRefused, oneLine(reply.Error))
	}
	return nil
}

// Abort tells the secondary the move failed (best effort) and closes.
func (n *MoveNotice) Abort(reason string) {
	n.halt()
	n.settled()
	if n.conn == nil {
		return
	}
	n.conn.SetWriteDeadline(time.Now().Add(time.Second))
	writeLine(n.conn, Control{Migrate: ControlAbort, Reason: reason})
	n.conn.Close()
}

// Close stops the heartbeat and closes the notice with no outcome: the
// secondary takes the primary as gone once it is not heard.
func (n *MoveNotice) Close() {
	n.halt()
	n.settled()
	if n.conn != nil {
		n.conn.Close()
	}
}

// peerName is the certificate name of conn's peer ("" over plaintext).
func peerName(conn net.Conn) string {
	name, _ := trust.PeerName(conn)
	return name
}
