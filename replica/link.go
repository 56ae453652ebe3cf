package replica

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/precopy"
)

// DefaultIOTimeout bounds every read and write on a data connection: a
// peer that moves no byte for this long is gone.
const DefaultIOTimeout = 30 * time.Second

// Link is the sending end of a data connection: the handshake, the
// checkpoint stream and the acknowledgements that come back. It
// implements precopy.Link.
type Link struct {
	conn    net.Conn
	bw      *bufio.Writer
	sent    atomic.Uint64
	w       *checkpoint.Writer
	timeout time.Duration

	// mu guards the acknowledgement state; changed is closed and
	// replaced whenever it changes.
	mu      sync.Mutex
	last    precopy.Ack
	hasLast bool
	ackErr  error
	changed chan struct{}
	done    chan struct{} // closed when the ack reader ends

	// postcopy: the receiver granted post-copy (Hello.Postcopy asked);
	// postcopyRefused: why not, in one line.
	postcopy        bool
	postcopyRefused string
	// holdsOutput: the receiver holds the guest's output until the
	// source reports the migration completed (Hello.HoldOutput asked).
	holdsOutput bool
}

// DialOptions configure Dial.
type DialOptions struct {
	Stream  checkpoint.Options
	Timeout time.Duration // per-I/O deadline; 0 means DefaultIOTimeout
	// OnAck is called from the ack reader for every acknowledgement, in
	// order (the epoch loop releases output from here).
	OnAck func(precopy.Ack)
	// TLS, if set, makes the connection mutual TLS against the cluster
	// CA with this identity (nil: plaintext).
	TLS *trust.Identity
	// Expect, with TLS, is the node the receiver's certificate must name
	// ("": any certificate of the CA).
	Expect string
	// Insecure lets a plaintext stream (TLS nil) reach a non-loopback
	// address; without it such a Dial is refused (trust.CheckDial).
	Insecure bool
}

// Dial connects to a receiver's data address, performs the handshake
// (refusals come back as errors naming the receiver's reason) and opens
// the stream for regions. ctx bounds the connect and the handshakes (TLS,
// then the data channel's own).
func Dial(ctx context.Context, addr string, hello Hello, regions []guest.Region, o DialOptions) (*Link, error) {
	if o.Timeout <= 0 {
		o.Timeout = DefaultIOTimeout
	}
	if err := trust.CheckDial(o.TLS, o.Insecure, "data link to", addr); err != nil {
		return nil, err
	}
	conn, err := trust.Dial(ctx, o.TLS, addr, o.Expect)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	ok := false
	defer func() {
		if !ok {
			conn.Close()
		}
	}()
	if dl, has := ctx.Deadline(); has {
		conn.SetDeadline(dl)
	} else {
		conn.SetDeadline(time.Now().Add(o.Timeout))
	}
	hello.Proto = ProtoVersion
	if hello.Format == 0 {
		hello.Format = uint16(checkpoint.Current)
		hello.MinReader = uint16(checkpoint.MinReadable)
		if o.Stream.Version != 0 {
			hello.Format = uint16(o.Stream.Version)
		}
	}
	if err := writeLine(conn, hello); err != nil {
		return nil, fmt.Errorf("handshake with %s: %w", addr, err)
	}
	br := bufio.NewReader(conn)
	var reply HelloReply
	if err := readLine(br, &reply); err != nil {
		return nil, fmt.Errorf("handshake with %s: %w", addr, err)
	}
	if !reply.OK {
		if reply.Activated {
			return nil, fmt.Errorf("%s refused the stream: %w", addr, ErrPeerActivated)
		}
		return nil, fmt.Errorf("%s refused the stream: %s", addr, oneLine(reply.Error))
	}
	if !reply.SectionsChecked {
		if err := checkUnchecked(addr, reply, hello); err != nil {
			return nil, err
		}
	}
	conn.SetDeadline(time.Time{})

	l := &Link{conn: conn, timeout: o.Timeout, changed: make(chan struct{}), done: make(chan struct{})}
	if hello.Postcopy {
		l.postcopy = reply.Postcopy
		l.postcopyRefused = cmp.Or(reply.PostcopyRefused, "the receiver does not take post-copy (an older build)")
		if l.postcopy {
			l.postcopyRefused = ""
		}
		l.holdsOutput = l.postcopy && hello.HoldOutput && reply.HoldOutput
	}
	l.bw = bufio.NewWriterSize(&deadlineWriter{l}, 256<<10)
	h := checkpoint.Header{Build: hello.Build, Kind: hello.Kind, PageSize: guest.PageSize, Regions: checkpoint.RegionsOf(regions)}
	switch hello.Purpose {
	case PurposeMigrate:
		h.Flags |= checkpoint.FlagMigration
	case PurposeReplicate:
		h.Flags |= checkpoint.FlagMicroCheckpoint
	}
	w, err := checkpoint.NewWriter(l.bw, h, o.Stream)
	if err != nil {
		return nil, err
	}
	l.w = w
	if err := l.bw.Flush(); err != nil {
		return nil, fmt.Errorf("send stream header to %s: %w", addr, err)
	}
	go l.readAcks(br, o.OnAck)
	ok = true
	return l, nil
}

type deadlineWriter struct{ l *Link }

func (d *deadlineWriter) Write(p []byte) (int, error) {
	d.l.conn.SetWriteDeadline(time.Now().Add(d.l.timeout))
	n, err := d.l.conn.Write(p)
	d.l.sent.Add(uint64(n))
	return n, err
}

// Postcopy says whether the receiver granted the post-copy the Hello
// asked for, and if not, why (one line).
func (l *Link) Postcopy() (bool, string) { return l.postcopy, l.postcopyRefused }

// HoldsOutput says whether the receiver granted the output hold the
// Hello asked for (Hello.HoldOutput).
func (l *Link) HoldsOutput() bool { return l.holdsOutput }

// Writer implements precopy.Link.
func (l *Link) Writer() *checkpoint.Writer { return l.w }

// Flush implements precopy.Link.
func (l *Link) Flush() error { return l.bw.Flush() }

// BytesSent implements precopy.Link.
func (l *Link) BytesSent() uint64 { return l.sent.Load() }

func (l *Link) readAcks(br *bufio.Reader, onAck func(precopy.Ack)) {
	defer close(l.done)
	for {
		var a precopy.Ack
		err := readLine(br, &a)
		l.mu.Lock()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				err = fmt.Errorf("receiver closed the connection: %w", err)
			}
			if l.ackErr == nil { // Fail's reason stays
				l.ackErr = err
			}
		} else if !a.Activated {
			// An activation notice (epoch 0) is for onAck alone: as the
			// last ack it would move the acknowledged epoch backwards.
			l.last, l.hasLast = a, true
		}
		close(l.changed)
		l.changed = make(chan struct{})
		l.mu.Unlock()
		if err != nil {
			return
		}
		if onAck != nil {
			onAck(a)
		}
	}
}

// WaitAck implements precopy.Link.
func (l *Link) WaitAck(ctx context.Context, epoch uint64, final bool) (precopy.Ack, error) {
	for {
		l.mu.Lock()
		last, has, err, ch := l.last, l.hasLast, l.ackErr, l.changed
		l.mu.Unlock()
		if has && (last.Epoch >= epoch || last.Error != "") {
			return last, nil
		}
		if err != nil {
			return precopy.Ack{}, err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return precopy.Ack{}, fmt.Errorf("waiting for the acknowledgement of epoch %d: %w", epoch, ctx.Err())
		}
	}
}

// AckChanged implements precopy.AckNotifier.
func (l *Link) AckChanged() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.changed
}

// Send writes one control line (a migration's commit or abort) after
// everything buffered; call it from the goroutine that owns the Writer.
func (l *Link) Send(c Control) error {
	if err := writeLine(l.bw, c); err != nil {
		return err
	}
	return l.bw.Flush()
}

// Commit implements precopy.Committer: the two-phase switch-over's
// commit line, after the final epoch.
func (l *Link) Commit(epoch uint64) error {
	return l.Send(Control{Migrate: ControlCommit, Epoch: epoch})
}

// Abort implements precopy.Committer: the destination drops the guest it
// loaded (best effort, bounded by the write deadline).
func (l *Link) Abort(epoch uint64, reason string) error {
	return l.Send(Control{Migrate: ControlAbort, Epoch: epoch, Reason: reason})
}

// Fail ends the link for a reason found outside it (no acknowledgement
// within a deadline): the connection is closed, blocked writes return,
// and Err and WaitAck report err from now on.
func (l *Link) Fail(err error) {
	l.mu.Lock()
	if l.ackErr == nil {
		l.ackErr = err
		close(l.changed)
		l.changed = make(chan struct{})
	}
	l.mu.Unlock()
	l.conn.Close()
}

// Done is closed when the ack reader ends: the link failed (Err says why,
// Fail included) or was closed. A waiter selects on it instead of polling
// Err.
func (l *Link) Done() <-chan struct{} { return l.done }

// Err returns why the acknowledgement channel failed, if it did.
func (l *Link) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ackErr
}

// Close closes the connection and waits (bounded) for the ack reader.
func (l *Link) Close() error {
	err := l.conn.Close()
	select {
	case <-l.done:
	case <-time.After(5 * time.Second):
	}
	return err
}
