package postcopy

import (
	"bytes"
	"context"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// TestSourceFinishesWhenAWriteLosesTheRaceWithDone: the destination sends
// Done and closes its end, and the source's next write fails (broken
// pipe) before its reader has got to Done, which waits unread in the
// socket. The run finished: the source must say so, not report a lost
// link (a protected move then stayed post-copy-paused with nothing owed,
// in make test). Here every write fails and Done arrives 100 ms after
// the runs, so the failed push always comes first.
func TestSourceFinishesWhenAWriteLosesTheRaceWithDone(t *testing.T) {
	regions, want, runs := raceFixture(t)
	done := encodeFrames(t, func(w *frameWriter) error { return w.write(frameDone, 0, want[:]) })
	urgent := &lateDoneConn{first: runs, later: done, delay: 100 * time.Millisecond}
	s := NewSource(regions, want)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Run(ctx, urgent, &recordConn{err: syscall.EPIPE}); err != nil {
		t.Fatalf("run: %v (want nil: the destination had sent Done)", err)
	}
}

// raceFixture is the three tests' setup: a 16-page guest with one page to
// push, the digest its destination reports, and the urgent connection's
// opening (every page missing).
func raceFixture(t *testing.T) ([]guest.Region, guest.Digest, []byte) {
	t.Helper()
	mem := make([]byte, 16*guest.PageSize)
	mem[5*guest.PageSize] = 1 // one page for the push to send
	var want guest.Digest
	want[0], want[31] = 0xab, 0xcd
	runs := encodeFrames(t, func(w *frameWriter) error { return writeRuns(w, [][2]uint64{{0, 16}}) })
	return []guest.Region{{GPA: 0, Mem: mem}}, want, runs
}

// encodeFrames is what write puts on a connection, flushed.
func encodeFrames(t *testing.T, write func(w *frameWriter) error) []byte {
	t.Helper()
	var b bytes.Buffer
	w := newFrameWriter(&recordConn{w: &b}, time.Second)
	if err := write(w); err != nil {
		t.Fatal(err)
	}
	if err := w.flush(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// recordConn is a net.Conn whose writes go to w, or fail with err.
type recordConn struct {
	net.Conn
	w   io.Writer
	err error
}

func (c *recordConn) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	return c.w.Write(p)
}
func (c *recordConn) Read([]byte) (int, error)         { return 0, io.EOF }
func (c *recordConn) SetDeadline(time.Time) error      { return nil }
func (c *recordConn) SetReadDeadline(time.Time) error  { return nil }
func (c *recordConn) SetWriteDeadline(time.Time) error { return nil }
func (c *recordConn) Close() error                     { return nil }

// lateDoneConn reads first at once, later after delay, then EOF; every
// write fails as on a connection the peer has closed.
type lateDoneConn struct {
	recordConn
	mu           sync.Mutex
	first, later []byte
	delay        time.Duration
	waited       bool
}

func (c *lateDoneConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.first) > 0 {
		n := copy(p, c.first)
		c.first = c.first[n:]
		return n, nil
	}
	if !c.waited {
		c.waited = true
		time.Sleep(c.delay)
	}
	if len(c.later) > 0 {
		n := copy(p, c.later)
		c.later = c.later[n:]
		return n, nil
	}
	return 0, io.EOF
}

func (c *lateDoneConn) Write([]byte) (int, error) { return 0, syscall.EPIPE }

// TestSourceFinishesWhenDonesDigestIsSlow: as above, and the digest Done
// is checked against takes longer than the grace for finding Done (a
// scan of a large paused guest on a loaded host): the run still finished.
func TestSourceFinishesWhenDonesDigestIsSlow(t *testing.T) {
	regions, want, runs := raceFixture(t)
	done := encodeFrames(t, func(w *frameWriter) error { return w.write(frameDone, 0, want[:]) })
	urgent := &lateDoneConn{first: runs, later: done, delay: 100 * time.Millisecond}
	s := NewSourceFunc(regions, func() guest.Digest {
		time.Sleep(doneGrace + 500*time.Millisecond)
		return want
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Run(ctx, urgent, &recordConn{err: syscall.EPIPE}); err != nil {
		t.Fatalf("run: %v (want nil: the destination had sent Done; only its check was slow)", err)
	}
}

// TestSourceFinishesWhenAReplyLosesTheRaceWithDone: the destination's
// last request is answered by the push first, it sends Done and closes;
// the source's reply to that request fails (broken pipe) before it reads
// Done. The run finished.
func TestSourceFinishesWhenAReplyLosesTheRaceWithDone(t *testing.T) {
	regions, want, runs := raceFixture(t)
	later := encodeFrames(t, func(w *frameWriter) error {
		if err := w.write(frameRequest, 5, nil); err != nil {
			return err
		}
		return w.write(frameDone, 0, want[:])
	})
	urgent := &lateDoneConn{first: runs, later: later, delay: 100 * time.Millisecond}
	var bulk bytes.Buffer
	s := NewSource(regions, want)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Run(ctx, urgent, &recordConn{w: &bulk}); err != nil {
		t.Fatalf("run: %v (want nil: the destination had sent Done after its request)", err)
	}
}
