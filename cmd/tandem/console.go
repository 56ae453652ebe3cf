package main

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
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

	// mu guards clients and closed.
	mu      sync.Mutex
	clients map[net.Conn]chan []byte
	closed  bool
}

// clientQueue bounds how many released chunks wait for a slow client
// before it is dropped (a stuck client must not hold up the guest).
const clientQueue = 4096

// maxClients bounds the console's clients (each costs a queue and two
// goroutines); more are turned away with a line saying so.
const maxClients = 256

func newConsoleBridge(addr string, input func([]byte) error, log *slog.Logger) (*consoleBridge, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	b := &consoleBridge{ln: ln, input: input, log: log, clients: map[net.Conn]chan []byte{}}
	go b.accept()
	return b, nil
}

func (b *consoleBridge) addr() string { return b.ln.Addr().String() }

func (b *consoleBridge) accept() {
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		if b.serving != nil && !b.serving() {
			c.Write([]byte("ERR not the primary\n"))
			c.Close()
			continue
		}
		out := make(chan []byte, clientQueue)
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
			continue
		}
		b.clients[c] = out
		b.mu.Unlock()
		go b.writeLoop(c, out)
		go b.readLoop(c)
	}
}

// maxPartialLine bounds the bytes of an unfinished line kept per client;
// beyond it they go to the guest as they are (which refuses over-long
// lines anyway).
const maxPartialLine = 8 << 10

func (b *consoleBridge) readLoop(c net.Conn) {
	defer b.drop(c)
	buf := make([]byte, 4096)
	var partial []byte
	for {
		c.SetReadDeadline(time.Now().Add(10 * time.Minute))
		n, err := c.Read(buf)
		// The serial line is shared by every client: hand the guest only
		// whole lines, or one client's half line would be completed by
		// another client's bytes.
		partial = append(partial, buf[:n]...)
		cut := bytes.LastIndexByte(partial, '\n') + 1
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

func (b *consoleBridge) writeLoop(c net.Conn, out chan []byte) {
	defer b.drop(c)
	for p := range out {
		c.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(p); err != nil {
			return
		}
	}
}

func (b *consoleBridge) drop(c net.Conn) {
	b.mu.Lock()
	out, ok := b.clients[c]
	delete(b.clients, c)
	b.mu.Unlock()
	if ok {
		close(out)
	}
	c.Close()
}

// release sends released guest output to every client.
func (b *consoleBridge) release(p []byte) {
	if len(p) == 0 {
		return
	}
	cp := append([]byte(nil), p...)
	b.mu.Lock()
	defer b.mu.Unlock()
	for c, out := range b.clients {
		select {
		case out <- cp:
		default:
			b.log.Warn("console: client too slow; dropping", "client", c.RemoteAddr().String())
			delete(b.clients, c)
			close(out)
			c.Close()
		}
	}
}

// dropAll disconnects every client (the node stopped serving the guest).
func (b *consoleBridge) dropAll() {
	b.mu.Lock()
	for c, out := range b.clients {
		delete(b.clients, c)
		close(out)
		c.Close()
	}
	b.mu.Unlock()
}

func (b *consoleBridge) close() {
	b.ln.Close()
	b.mu.Lock()
	b.closed = true
	for c, out := range b.clients {
		delete(b.clients, c)
		close(out)
		c.Close()
	}
	b.mu.Unlock()
}

func bytesReader(p []byte) io.Reader { return bytes.NewReader(p) }
