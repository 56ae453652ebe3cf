package postcopy

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// Frame types. Every frame is a type byte and a 64-bit little-endian
// argument (a page index unless said otherwise); a page frame is followed
// by the page, a done frame by a 32-byte digest.
//
//	urgent, destination → source:
//	  'M' first, then a uint64 count: a run of pages the destination lacks
//	  'm' (arg 0): end of the runs; requests may follow
//	  'R' page: a vCPU waits for it
//	  'H' (arg 0): heartbeat, every HeartbeatInterval
//	  'D' (arg 0) + digest: every page arrived; the switch-over digest
//	urgent and bulk, source → destination:
//	  'P' page + 4096 bytes, 'Z' page (all zero)
//	  'H' (urgent only): heartbeat
//	  'E' (bulk only, arg: pages pushed): nothing left to push
const (
	frameRun     = 'M'
	frameRunsEnd = 'm'
	frameRequest = 'R'
	frameBeat    = 'H'
	frameDone    = 'D'
	framePage    = 'P'
	frameZero    = 'Z'
	frameEnd     = 'E'
)

const headerSize = 9

// Timing of the wire. A peer silent for LinkTimeout is taken as gone.
const (
	HeartbeatInterval  = 500 * time.Millisecond
	DefaultLinkTimeout = 5 * time.Second
)

// ErrLink wraps every failure of the connections: the other side can be
// reached again and Run called with new connections.
var ErrLink = errors.New("post-copy link failed")

// ErrProtocol wraps a frame that breaks the protocol (unknown type, a page
// out of range): the peer is not a post-copy peer of this migration.
var ErrProtocol = errors.New("post-copy protocol error")

// frame is one decoded frame. data aliases the reader's buffer until the
// next read.
type frame struct {
	typ  byte
	arg  uint64
	data []byte
}

// frameReader reads frames from a connection, each with a deadline.
type frameReader struct {
	conn    net.Conn
	br      *bufio.Reader
	timeout time.Duration
	done    <-chan struct{} // the run's end (nil: none)
	buf     [guest.PageSize]byte
	digest  [32]byte
}

func newFrameReader(conn net.Conn, timeout time.Duration) *frameReader {
	return &frameReader{conn: conn, br: bufio.NewReaderSize(conn, 256<<10), timeout: timeout}
}

func (r *frameReader) read() (frame, error) {
	if err := arm(r.conn.SetReadDeadline, r.timeout, r.done); err != nil {
		return frame{}, err
	}
	var h [headerSize]byte
	if _, err := io.ReadFull(r.br, h[:]); err != nil {
		return frame{}, fmt.Errorf("%w: read: %w", ErrLink, err)
	}
	f := frame{typ: h[0], arg: binary.LittleEndian.Uint64(h[1:])}
	var payload []byte
	switch f.typ {
	case framePage:
		payload = r.buf[:]
	case frameDone:
		payload = r.digest[:]
	case frameRun:
		var n [8]byte
		if _, err := io.ReadFull(r.br, n[:]); err != nil {
			return frame{}, fmt.Errorf("%w: read: %w", ErrLink, err)
		}
		f.data = n[:]
		return f, nil
	case frameRunsEnd, frameRequest, frameBeat, frameZero, frameEnd:
	default:
		return frame{}, fmt.Errorf("%w: unknown frame type %#x", ErrProtocol, f.typ)
	}
	if payload != nil {
		if _, err := io.ReadFull(r.br, payload); err != nil {
			return frame{}, fmt.Errorf("%w: read: %w", ErrLink, err)
		}
		f.data = payload
	}
	return f, nil
}

// arm sets a deadline timeout from now for the next read or write, then
// checks that the run has not ended. A run ends by closing done and only
// then setting its connections' deadlines to now; checking after arming
// means an I/O armed just after that (a fresh deadline that would undo
// the run's) sees done closed instead of waiting a whole timeout.
func arm(set func(time.Time) error, timeout time.Duration, done <-chan struct{}) error {
	set(time.Now().Add(timeout))
	select {
	case <-done:
		return fmt.Errorf("%w: the run ended", ErrLink)
	default:
		return nil
	}
}

// frameWriter writes frames to a connection, each flush with a deadline.
// Not safe for concurrent use: callers that share one hold a lock.
type frameWriter struct {
	conn    net.Conn
	bw      *bufio.Writer
	timeout time.Duration
	done    <-chan struct{} // the run's end (nil: none)
}

func newFrameWriter(conn net.Conn, timeout time.Duration) *frameWriter {
	return &frameWriter{conn: conn, bw: bufio.NewWriterSize(conn, 256<<10), timeout: timeout}
}

// write buffers a frame; payload is the page or digest (nil for none).
func (w *frameWriter) write(typ byte, arg uint64, payload []byte) error {
	var h [headerSize]byte
	h[0] = typ
	binary.LittleEndian.PutUint64(h[1:], arg)
	if err := arm(w.conn.SetWriteDeadline, w.timeout, w.done); err != nil {
		return err
	}
	if _, err := w.bw.Write(h[:]); err != nil {
		return fmt.Errorf("%w: write: %w", ErrLink, err)
	}
	if _, err := w.bw.Write(payload); err != nil {
		return fmt.Errorf("%w: write: %w", ErrLink, err)
	}
	return nil
}

func (w *frameWriter) flush() error {
	if err := arm(w.conn.SetWriteDeadline, w.timeout, w.done); err != nil {
		return err
	}
	if err := w.bw.Flush(); err != nil {
		return fmt.Errorf("%w: write: %w", ErrLink, err)
	}
	return nil
}

// writePage writes page index's content as a page or a zero frame.
func (w *frameWriter) writePage(index uint64, page []byte) error {
	if guest.IsZeroPage(page) {
		return w.write(frameZero, index, nil)
	}
	return w.write(framePage, index, page)
}

// pageMap finds a page's memory among a guest's regions (ascending GPA).
type pageMap struct {
	regions []guest.Region
	limit   uint64 // one past the highest page index
}

func newPageMap(regions []guest.Region) pageMap {
	return pageMap{regions: regions, limit: guest.PageLimit(regions)}
}

// page returns page index's memory, or nil if no region holds it.
func (m pageMap) page(index uint64) []byte { return guest.PageOf(m.regions, index) }
