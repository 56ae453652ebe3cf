package ft

import (
	"bytes"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/tandemvm/tandem/internal/netlimit"
	"github.com/tandemvm/tandem/internal/timing"
	"github.com/tandemvm/tandem/internal/trust"
)

// consoleBridge bridges TCP clients to a guest's serial line. Input from
// every client goes to the guest; output the guest releases goes to every
// connected client (kv replies carry their client id, so clients pick out
// their own). Output reaches the bridge only through release, which the
// output-commit gate calls once the epoch that produced the bytes is safe.
type consoleBridge struct {
	ln    net.Listener
	input func([]byte) error
	log   *slog.Logger
	// serving says whether this node runs the guest; while it does not
	// (a secondary, a fenced primary) clients are turned away at once,
	// so a client that knows every node's console finds the primary.
	serving func() bool
	// timings times deliveries (nil: not timed).
	timings *timing.Recorder

	// mu guards clients, pending and closed.
	mu      sync.Mutex
	clients map[net.Conn]*clientOut
	pending map[net.Conn]struct{} // accepted, still in their handshake
	closed  bool

	// wg counts the bridge's goroutines (the accept loop, each client's
	// handshake, reader and writer): close waits for them, bounded.
	wg sync.WaitGroup
}

// clientOut is the output waiting for one client: bytes, not chunks, so
// a guest that writes every reply separately and one that releases an
// epoch at a time cost the same, and the writer sends what has gathered
// in one write.
type clientOut struct {
	mu     sync.Mutex
	buf    []byte
	closed bool
	wake   chan struct{} // capacity 1: buf has bytes or closed was set
}

func (o *clientOut) push(p []byte) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed || len(o.buf)+len(p) > clientQueueBytes {
		return false
	}
	o.buf = append(o.buf, p...)
	select {
	case o.wake <- struct{}{}:
	default:
	}
	return true
}

func (o *clientOut) close() {
	o.mu.Lock()
	o.closed = true
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// take waits for output and returns it (nil once closed and drained).
func (o *clientOut) take(spare []byte) []byte {
	for {
		o.mu.Lock()
		if len(o.buf) > 0 {
			p := o.buf
			o.buf = spare[:0]
			o.mu.Unlock()
			return p
		}
		if o.closed {
			o.mu.Unlock()
			return nil
		}
		o.mu.Unlock()
		<-o.wake
	}
}

// clientQueueBytes bounds the output waiting for a slow client before it
// is dropped (a stuck client must not hold up the guest or grow memory).
const clientQueueBytes = 16 << 20

// maxClients bounds the console's clients (each costs a queue and two
// goroutines); more are turned away with a line saying so.
const maxClients = 256

// newConsoleBridge listens on addr. With an identity in nt every client
// must present a certificate of the cluster's CA (any one); without,
// addr must be loopback unless --insecure. Every client sees all the
// guest's output: see docs/SECURITY.md, "The console". A client counts
// against netlimit.ConsoleCap (its TLS handshake included) until its
// first whole line (readLoop): silent connections displace each other,
// not clients that talk.
// serving (nil: always) is given here, not set later: the accept loop
// reads it from its first connection on.
// timings (nil: none) times each delivery to a client as device
// "console", op "write".
func newConsoleBridge(addr string, input func([]byte) error, serving func() bool, timings *timing.Recorder, log *slog.Logger, nt Trust) (*consoleBridge, error) {
	ln, err := nt.Listen(log, "--console", addr, "console", netlimit.ConsoleCap)
	if err != nil {
		return nil, err
	}
	b := &consoleBridge{ln: ln, input: input, serving: serving, timings: timings, log: log, clients: map[net.Conn]*clientOut{}, pending: map[net.Conn]struct{}{}}
	b.wg.Add(1)
	go b.accept()
	return b, nil
}

func (b *consoleBridge) addr() string { return b.ln.Addr().String() }

func (b *consoleBridge) accept() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.mu.Lock()
		if b.closed {
			b.mu.Unlock()
			c.Close()
			return
		}
		b.pending[c] = struct{}{}
		b.mu.Unlock()
		// The handshake runs off the accept loop, so one client that
		// never completes it holds up nobody else (and netlimit closes
		// the oldest of those still in theirs beyond ConsoleCap).
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			err := trust.Handshake(c, handshakeTimeout)
			b.mu.Lock()
			delete(b.pending, c)
			b.mu.Unlock()
			if err != nil {
				b.log.Warn("console: client refused", "client", c.RemoteAddr().String(), "err", err)
				c.Close()
				return
			}
			b.admit(c)
		}()
	}
}

// admit serves an authenticated client, or turns it away with one line.
func (b *consoleBridge) admit(c net.Conn) {
	if b.serving != nil && !b.serving() {
		c.SetWriteDeadline(time.Now().Add(time.Second))
		c.Write([]byte("ERR not the primary\n"))
		c.Close()
		return
	}
	out := &clientOut{wake: make(chan struct{}, 1)}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		c.Close()
		return
	}
	if len(b.clients) >= maxClients {
		b.mu.Unlock()
		c.SetWriteDeadline(time.Now().Add(time.Second))
		c.Write([]byte("ERR too many console clients\n"))
		c.Close()
		return
	}
	b.clients[c] = out
	b.wg.Add(2)
	b.mu.Unlock()
	go b.writeLoop(c, out)
	go b.readLoop(c)
}

// maxPartialLine bounds the bytes of an unfinished line kept per client;
// beyond it they go to the guest as they are (which refuses over-long
// lines anyway).
const maxPartialLine = 8 << 10

func (b *consoleBridge) readLoop(c net.Conn) {
	defer b.wg.Done()
	defer b.drop(c)
	buf := make([]byte, 4096)
	var partial []byte
	talked := false
	for {
		c.SetReadDeadline(time.Now().Add(10 * time.Minute))
		n, err := c.Read(buf)
		// The serial line is shared by every client: hand the guest only
		// whole lines, or one client's half line would be completed by
		// another client's bytes.
		partial = append(partial, buf[:n]...)
		cut := bytes.LastIndexByte(partial, '\n') + 1
		if cut > 0 && !talked {
			talked = true
			if lc, ok := netlimit.Of(c); ok {
				lc.Established()
			}
		}
		if cut == 0 && len(partial) > maxPartialLine {
			cut = len(partial)
		}
		if cut > 0 {
			// The guest's input buffer is finite: retry briefly, then
			// drop the client rather than block forever.
			p := append([]byte(nil), partial[:cut]...)
			partial = append(partial[:0], partial[cut:]...)
			deadline := time.Now().Add(5 * time.Second)
			for {
				if err := b.input(p); err == nil {
					break
				} else if time.Now().After(deadline) {
					b.log.Warn("console: guest input stuck; dropping client", "client", c.RemoteAddr().String(), "err", err)
					return
				}
				time.Sleep(time.Millisecond)
			}
		}
		if err != nil {
			return
		}
	}
}

func (b *consoleBridge) writeLoop(c net.Conn, out *clientOut) {
	defer b.wg.Done()
	defer b.drop(c)
	var spare []byte
	for {
		p := out.take(spare)
		if p == nil {
			return
		}
		start := time.Now()
		c.SetWriteDeadline(start.Add(10 * time.Second))
		_, err := c.Write(p)
		b.timings.Device("console", "write", start, time.Since(start))
		if err != nil {
			return
		}
		spare = p
	}
}

func (b *consoleBridge) drop(c net.Conn) {
	b.mu.Lock()
	out, ok := b.clients[c]
	delete(b.clients, c)
	b.mu.Unlock()
	if ok {
		out.close()
	}
	c.Close()
}

// release sends released guest output to every client. It never blocks:
// a client with more than clientQueueBytes waiting is dropped.
func (b *consoleBridge) release(p []byte) {
	if len(p) == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for c, out := range b.clients {
		if !out.push(p) {
			b.log.Warn("console: client too slow; dropping", "client", c.RemoteAddr().String())
			delete(b.clients, c)
			out.close()
			c.Close()
		}
	}
}

// dropAll disconnects every client (the node stopped serving the guest).
func (b *consoleBridge) dropAll() {
	b.mu.Lock()
	for c, out := range b.clients {
		delete(b.clients, c)
		out.close()
		c.Close()
	}
	b.mu.Unlock()
}

// close stops the bridge: the listener, every client and every client
// still in its handshake are closed, and it returns once the bridge's
// goroutines are gone (or after consoleJoinTimeout, with a log line: a
// reader can be retrying a stuck guest input for up to 5 s).
func (b *consoleBridge) close() {
	b.ln.Close()
	b.mu.Lock()
	b.closed = true
	for c, out := range b.clients {
		delete(b.clients, c)
		out.close()
		c.Close()
	}
	for c := range b.pending {
		c.Close()
	}
	b.mu.Unlock()
	joinWithin(b.wg.Wait, consoleJoinTimeout, b.log, "console bridge goroutines")
}

// consoleJoinTimeout bounds how long close waits for the bridge's
// goroutines.
const consoleJoinTimeout = 6 * time.Second

// joinWithin waits for wait to return, at most d; past that it logs that
// what is still running and returns false (the goroutines are left
// behind, never waited for forever).
func joinWithin(wait func(), d time.Duration, log *slog.Logger, what string) bool {
	done := make(chan struct{})
	go func() {
		wait()
		close(done)
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		log.Error(what+" still running; not waiting any longer", "waited", d.String())
		return false
	}
}
