package block

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/vfs"
)

// ErrClosed is returned by calls on a closed disk; it wraps guest.ErrClosed.
var ErrClosed = fmt.Errorf("block: disk closed: %w", guest.ErrClosed)

// DefaultMaxLogBytes bounds the log of completed writes when nobody takes
// it (a guest run without protection must not grow without limit).
const DefaultMaxLogBytes = 256 << 20

// CloseTimeout is how long Close waits for an in-flight write or flush.
const CloseTimeout = 5 * time.Second

// Options configure Open.
type Options struct {
	// FS opens the file; nil means the real file system.
	FS vfs.FS
	// MaxLogBytes bounds the completed-write log; 0 means DefaultMaxLogBytes.
	// When a write would exceed it, the whole log is dropped and Dropped
	// counts the lost writes, so a replicator knows it must resync the disk.
	MaxLogBytes uint64
}

type opKind uint8

const (
	opWrite opKind = iota
	opFlush
)

// op is one queued unit of work. Writes and flushes share one FIFO so a
// flush covers exactly the writes submitted before it.
type op struct {
	kind  opKind
	off   uint64
	data  []byte
	done  func(error)
	flush *flushOp
}

// flushOp is one flush; several Flush calls may wait on it.
type flushOp struct {
	done chan struct{} // closed when err is set
	err  error
	seen atomic.Bool // a Flush caller has returned err
}

func (f *flushOp) finished() bool {
	select {
	case <-f.done:
		return true
	default:
		return false
	}
}

// Disk is a file-backed virtual disk. Its methods are safe for concurrent
// use; completions run on the disk's worker goroutine.
type Disk struct {
	path    string
	file    File
	maxLog  uint64
	wake    chan struct{} // capacity 1: work was queued
	closing chan struct{} // closed by Close
	exited  chan struct{} // closed when the worker returns

	// mu guards everything below.
	mu       sync.Mutex
	closed   bool
	queue    []op
	inflight *op // the op the worker is performing, if any
	log      []guest.DiskWrite
	logBytes uint64
	dropped  uint64
	// lastFlush is the newest flush queued; writesSince says whether a
	// write was queued after it (if not, a new Flush joins it).
	lastFlush   *flushOp
	writesSince bool
	// writeErr is the first failed write since the last flush began; that
	// flush reports it.
	writeErr   error
	stallNext  time.Duration // the next flush's stall
	stallWrite time.Duration // the next write's stall
	failNext   error
	// observe is told of every write and flush the worker completes
	// (named timings: a 60 s flush must show up by name, not only the
	// budget the caller gave up at).
	observe func(op string, start time.Time, d time.Duration, err error)
}

// Operations an observer is told of.
const (
	OpWrite = "write"
	OpFlush = "flush"
	OpRead  = "read"
)

// SetObserver sets a function told of every completed write and flush
// (op is OpWrite or OpFlush, on the disk's worker) and read (OpRead, on
// the reader's goroutine); it must not block.
// nil removes it.
func (d *Disk) SetObserver(f func(op string, start time.Time, took time.Duration, err error)) {
	d.mu.Lock()
	d.observe = f
	d.mu.Unlock()
}

// observer is the observer set now.
func (d *Disk) observer() func(op string, start time.Time, took time.Duration, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.observe
}

// Open opens (creating if needed, mode 0600: it holds guest data) the disk
// file at path and starts its worker.
func Open(path string, opts Options) (*Disk, error) {
	f, err := vfs.OrDefault(opts.FS).OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("block: open disk %s: %w", path, err)
	}
	d := &Disk{
		path:    path,
		file:    f,
		maxLog:  opts.MaxLogBytes,
		wake:    make(chan struct{}, 1),
		closing: make(chan struct{}),
		exited:  make(chan struct{}),
	}
	if d.maxLog == 0 {
		d.maxLog = DefaultMaxLogBytes
	}
	go d.worker()
	return d, nil
}

// Path is the disk file's path.
func (d *Disk) Path() string { return d.path }

// Write queues a write of data at off and returns at once. The disk owns
// data from now on. done, if not nil, runs on the worker when the write has
// reached the file (not necessarily durable: Flush makes it so) or failed;
// it must not call back into the disk's Flush. A failed write is also
// reported by the next flush.
func (d *Disk) Write(off uint64, data []byte, done func(error)) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	d.queue = append(d.queue, op{kind: opWrite, off: off, data: data, done: done})
	d.writesSince = true
	d.kick()
	return nil
}

// kick wakes the worker. Precondition: mu held.
func (d *Disk) kick() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// Flush makes every write queued before it durable. If ctx ends first it
// returns an error wrapping guest.ErrFlushDeadline and the flush goes on in
// the background; a later Flush with no writes queued in between joins that
// flush, otherwise it queues behind it. A write that failed since the
// previous flush makes the flush fail.
func (d *Disk) Flush(ctx context.Context) error {
	start := time.Now()
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return ErrClosed
	}
	f := d.lastFlush
	switch {
	case f != nil && !d.writesSince && !f.finished():
		// join the flush in flight
	case f != nil && !d.writesSince && f.err != nil && !f.seen.Load():
		// a flush whose caller gave up failed since: report it now
	default:
		f = &flushOp{done: make(chan struct{})}
		d.queue = append(d.queue, op{kind: opFlush, flush: f})
		d.lastFlush = f
		d.writesSince = false
		d.kick()
	}
	d.mu.Unlock()
	select {
	case <-f.done:
		f.seen.Store(true)
		return f.err
	case <-ctx.Done():
		return fmt.Errorf("block: flush of %s not durable after %v (continuing in background): %w",
			d.path, time.Since(start).Round(time.Millisecond), guest.ErrFlushDeadline)
	}
}

// TakeWrites returns the writes completed since the previous call, in
// completion order (which is submission order), and forgets them.
func (d *Disk) TakeWrites() []guest.DiskWrite {
	d.mu.Lock()
	defer d.mu.Unlock()
	ws := d.log
	d.log, d.logBytes = nil, 0
	return ws
}

// Dropped is how many completed writes were dropped from the log because
// it exceeded MaxLogBytes.
func (d *Disk) Dropped() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.dropped
}

// Pending returns the writes submitted but not yet completed, in order
// (copies of the descriptors; Data is shared and must not be modified).
// A guest saves them as device state so a restored guest can reissue them.
func (d *Disk) Pending() []guest.DiskWrite {
	d.mu.Lock()
	defer d.mu.Unlock()
	var ws []guest.DiskWrite
	if d.inflight != nil && d.inflight.kind == opWrite {
		ws = append(ws, guest.DiskWrite{Offset: d.inflight.off, Data: d.inflight.data})
	}
	for _, o := range d.queue {
		if o.kind == opWrite {
			ws = append(ws, guest.DiskWrite{Offset: o.off, Data: o.data})
		}
	}
	return ws
}

// Apply writes ws to the file synchronously and syncs it (replica side).
// A write without data sets the file's size (a size mark: guest.DiskWrite).
// Applied writes do not enter the completed-write log: they are not the
// guest's own writes.
func (d *Disk) Apply(ws []guest.DiskWrite) error {
	d.mu.Lock()
	closed := d.closed
	d.mu.Unlock()
	if closed {
		return ErrClosed
	}
	for _, w := range ws {
		if len(w.Data) == 0 {
			// A size mark (guest.DiskWrite).
			if err := d.file.Truncate(int64(w.Offset)); err != nil {
				return fmt.Errorf("block: apply size %d to %s: %w", w.Offset, d.path, err)
			}
			continue
		}
		if err := writeFull(d.file, w.Data, w.Offset); err != nil {
			return fmt.Errorf("block: apply write of %d bytes at %d to %s: %w", len(w.Data), w.Offset, d.path, err)
		}
	}
	if len(ws) > 0 {
		if err := d.file.Sync(); err != nil {
			return fmt.Errorf("block: apply sync %s: %w", d.path, err)
		}
	}
	return nil
}

// Size is the disk file's size in bytes.
func (d *Disk) Size() (uint64, error) {
	fi, err := d.file.Stat()
	if err != nil {
		return 0, fmt.Errorf("block: size of %s: %w", d.path, err)
	}
	return uint64(fi.Size()), nil
}

// ReadAt reads the disk file (for verification; it does not wait for
// queued writes).
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	closed := d.closed
	d.mu.Unlock()
	if closed {
		return 0, ErrClosed
	}
	start := time.Now()
	n, err := d.file.ReadAt(p, off)
	if f := d.observer(); f != nil {
		f(OpRead, start, time.Since(start), err)
	}
	return n, err
}

// StallFlush makes the next flush the worker performs wait d before it
// syncs, as a saturated NFS link once did for 40-50 s. 0 cancels.
func (d *Disk) StallFlush(dur time.Duration) {
	d.mu.Lock()
	d.stallNext = dur
	d.mu.Unlock()
}

// StallWrite makes the next write the worker performs wait dur before it
// writes (a stuck device, for tests of the slow list). 0 cancels.
func (d *Disk) StallWrite(dur time.Duration) {
	d.mu.Lock()
	d.stallWrite = dur
	d.mu.Unlock()
}

// FailNextWrite makes the next write the worker performs fail with err
// without touching the file. nil cancels.
func (d *Disk) FailNextWrite(err error) {
	d.mu.Lock()
	d.failNext = err
	d.mu.Unlock()
}

// Close stops the worker, failing queued work with ErrClosed (callers that
// need the writes durable Flush first), and closes the file. It waits for
// an op in progress for at most CloseTimeout; if the file system is stuck
// beyond that, the worker is left to exit on its own and the file is not
// closed.
func (d *Disk) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	close(d.closing)
	d.mu.Unlock()
	t := time.NewTimer(CloseTimeout)
	defer t.Stop()
	select {
	case <-d.exited:
	case <-t.C:
		return fmt.Errorf("block: disk %s: I/O still running %v after close", d.path, CloseTimeout)
	}
	if err := d.file.Close(); err != nil {
		return fmt.Errorf("block: close %s: %w", d.path, err)
	}
	return nil
}

func (d *Disk) worker() {
	defer close(d.exited)
	for {
		d.mu.Lock()
		if d.closed {
			q := d.queue
			d.queue = nil
			d.mu.Unlock()
			for _, o := range q {
				o.finish(ErrClosed)
			}
			return
		}
		if len(d.queue) == 0 {
			d.mu.Unlock()
			select {
			case <-d.wake:
			case <-d.closing:
			}
			continue
		}
		o := d.queue[0]
		d.queue[0] = op{}
		d.queue = d.queue[1:]
		d.inflight = &o
		var stall time.Duration
		var fail error
		if o.kind == opFlush {
			stall, d.stallNext = d.stallNext, 0
		} else {
			stall, d.stallWrite = d.stallWrite, 0
			fail, d.failNext = d.failNext, nil
		}
		d.mu.Unlock()

		switch o.kind {
		case opWrite:
			d.doWrite(o, stall, fail)
		case opFlush:
			d.doFlush(o, stall)
		}
	}
}

// stallFor waits dur (a fault a test asked for); false if the disk closed.
func (d *Disk) stallFor(dur time.Duration) bool {
	if dur <= 0 {
		return true
	}
	t := time.NewTimer(dur)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-d.closing:
		return false
	}
}

func (d *Disk) doWrite(o op, stall time.Duration, fail error) {
	start := time.Now()
	err := fail
	if !d.stallFor(stall) {
		err = ErrClosed
	}
	if err == nil {
		err = writeFull(d.file, o.data, o.off)
	}
	if f := d.observer(); f != nil {
		f(OpWrite, start, time.Since(start), err)
	}
	if err != nil {
		err = fmt.Errorf("block: write of %d bytes at %d to %s: %w", len(o.data), o.off, d.path, err)
	}
	d.mu.Lock()
	d.inflight = nil
	if err != nil {
		if d.writeErr == nil {
			d.writeErr = err
		}
	} else if len(o.data) > 0 {
		// A write of nothing changes nothing and is not logged: in a
		// log, a DiskWrite without data is a size mark.
		n := uint64(len(o.data))
		if d.logBytes+n > d.maxLog {
			d.dropped += uint64(len(d.log)) + 1
			d.log, d.logBytes = nil, 0
		} else {
			d.log = append(d.log, guest.DiskWrite{Offset: o.off, Data: o.data})
			d.logBytes += n
		}
	}
	d.mu.Unlock()
	if o.done != nil {
		o.done(err)
	}
}

func (d *Disk) doFlush(o op, stall time.Duration) {
	start := time.Now()
	var err error
	if !d.stallFor(stall) {
		err = ErrClosed
	}
	if err == nil {
		if serr := d.file.Sync(); serr != nil {
			err = fmt.Errorf("block: sync %s: %w", d.path, serr)
		}
	}
	d.mu.Lock()
	d.inflight = nil
	if werr := d.writeErr; werr != nil {
		d.writeErr = nil
		if err != nil {
			err = fmt.Errorf("%w; %w", werr, err)
		} else {
			err = werr
		}
	}
	observe := d.observe
	d.mu.Unlock()
	if observe != nil {
		observe(OpFlush, start, time.Since(start), err)
	}
	o.finish(err)
}

// finish completes an op that will not be performed or has been.
func (o op) finish(err error) {
	switch o.kind {
	case opWrite:
		if o.done != nil {
			o.done(err)
		}
	case opFlush:
		o.flush.err = err
		close(o.flush.done)
	}
}

func writeFull(f File, p []byte, off uint64) error {
	if off > 1<<62 {
		return fmt.Errorf("offset %d out of range", off)
	}
	for len(p) > 0 {
		n, err := f.WriteAt(p, int64(off))
		if err != nil {
			return err
		}
		if n == 0 {
			return errors.New("short write")
		}
		p, off = p[n:], off+uint64(n)
	}
	return nil
}
