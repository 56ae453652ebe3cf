package synth

import (
	"bytes"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvproto"
)

// InputBufferSize is how many bytes of console input may wait for the
// guest; Input fails beyond it.
const InputBufferSize = 1 << 20

// console is the guest's serial line. The input queue is device state (it
// is saved and restored); output goes synchronously from the vCPU to the
// sink, so output commit is the sink's business.
type console struct {
	// accept is false for workloads that do not read the console: their
	// input is dropped rather than left to fill the buffer.
	accept bool
	notify chan struct{} // capacity 1: input arrived
	sink   atomic.Pointer[func([]byte)]

	// mu guards the fields below.
	mu     sync.Mutex
	closed bool
	in     []byte
	// discarding is set while the rest of an over-long line is dropped up
	// to its newline.
	discarding bool
}

func newConsole(accept bool) *console {
	return &console{accept: accept, notify: make(chan struct{}, 1)}
}

// Input queues p for the guest; it never blocks.
func (c *console) Input(p []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return fmt.Errorf("synth: console input: %w", guest.ErrClosed)
	}
	if !c.accept || len(p) == 0 {
		return nil
	}
	if len(c.in)+len(p) > InputBufferSize {
		return fmt.Errorf("synth: console input buffer full (%d of %d bytes waiting)", len(c.in), InputBufferSize)
	}
	c.in = append(c.in, p...)
	select {
	case c.notify <- struct{}{}:
	default:
	}
	return nil
}

// SetOutput sets the sink; nil discards output.
func (c *console) SetOutput(sink func(p []byte)) {
	if sink == nil {
		c.sink.Store(nil)
		return
	}
	c.sink.Store(&sink)
}

// emit hands one line to the sink, on the calling vCPU.
func (c *console) emit(line []byte) {
	if s := c.sink.Load(); s != nil {
		(*s)(line)
	}
}

// maxLineBytes is the longest line kept: a request plus an optional '\r'.
const maxLineBytes = kvproto.MaxLine + 1

// takeLine removes the next complete line from the input queue. tooLong
// reports a line that exceeded the limit and was dropped whole (the guest
// answers it with an ERR). ok is false when no complete line is queued.
func (c *console) takeLine() (line []byte, tooLong, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := bytes.IndexByte(c.in, '\n')
	if c.discarding {
		if i < 0 {
			c.in = c.in[:0]
			return nil, false, false
		}
		c.consume(i + 1)
		c.discarding = false
		return nil, true, true
	}
	if i < 0 {
		if len(c.in) > maxLineBytes {
			c.in = c.in[:0]
			c.discarding = true
		}
		return nil, false, false
	}
	if i > maxLineBytes {
		c.consume(i + 1)
		return nil, true, true
	}
	line = append([]byte(nil), c.in[:i]...)
	c.consume(i + 1)
	return line, false, true
}

// consume drops n bytes from the front of the queue. Slicing forward is
// amortised O(1): the next append that outgrows the array copies only the
// live bytes. Precondition: mu held.
func (c *console) consume(n int) {
	c.in = c.in[n:]
	if len(c.in) == 0 {
		c.in = nil
	}
}

func (c *console) close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
}

// consoleState is the console's saved state, version 1.
type consoleState struct {
	Input      []byte
	Discarding bool
}

const consoleStateVersion = 1

func (c *console) save() consoleState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return consoleState{Input: append([]byte{}, c.in...), Discarding: c.discarding}
}

func (c *console) load(s consoleState) {
	c.mu.Lock()
	c.in = append(c.in[:0], s.Input...)
	c.discarding = s.Discarding
	c.mu.Unlock()
	if len(s.Input) > 0 {
		select {
		case c.notify <- struct{}{}:
		default:
		}
	}
}
