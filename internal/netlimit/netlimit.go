// Package netlimit caps the connections a listener keeps that have not yet
// shown they are worth keeping: connected but still in their handshake (a
// data connection before its Hello passed, an HTTP connection between
// requests, a console client before its first line).
//
// The policy is chosen so that an attacker cannot lock a real peer out:
// when a new connection arrives and the cap is reached, the oldest
// connection still in its handshake is closed, and the new one is
// admitted. A real peer completes its handshake within a round trip and
// then no longer counts, so to keep it out an attacker would have to open
// more than the cap's worth of connections within that round trip, again
// and again; a silent or trickling connection is also dropped by its
// handshake deadline (replica: 5 s for the Hello; HTTP: ReadHeaderTimeout).
// Connections past their handshake are bounded by their protocol (one
// primary connection per secondary, one migration per receiver, the
// console's client limit, HTTP's IdleTimeout), not here.
package netlimit

import (
	"log/slog"
	"net"
	"sync"
	"time"
)

// Caps of Tandem's listeners: connections still in their handshake.
const (
	DataCap    = 8  // a secondary's or receiver's data port
	APICap     = 64 // the HTTP API
	ConsoleCap = 32 // the console bridge
)

// logEvery spaces the log lines about closed connections: a flood is
// reported with its count, not line by line.
const logEvery = 10 * time.Second

// Listener wraps a net.Listener; its Accept returns *Conn.
type Listener struct {
	net.Listener
	name string
	max  int
	log  *slog.Logger

	mu      sync.Mutex
	pending []*Conn // in their handshake, oldest first
	closed  uint64  // closed by the cap since the last log line
	total   uint64  // closed by the cap, ever
	lastLog time.Time
}

// Wrap caps ln at max connections in their handshake; name says which
// listener in log lines.
func Wrap(ln net.Listener, name string, max int, log *slog.Logger) *Listener {
	if max < 1 {
		max = 1
	}
	if log == nil {
		log = slog.Default()
	}
	return &Listener{Listener: ln, name: name, max: max, log: log}
}

type connState uint8

const (
	statePending connState = iota
	stateEstablished
	stateClosed
)

// Conn is an accepted connection. Established says its handshake is done;
// Pending puts it back among those in their handshake (an HTTP
// connection idle between requests).
type Conn struct {
	net.Conn
	l     *Listener
	state connState // guarded by l.mu
}

// Accept waits for a connection and admits it, closing the oldest one
// still in its handshake if the cap is reached.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	lc := &Conn{Conn: c, l: l}
	l.mu.Lock()
	victim := l.admitLocked(lc)
	l.mu.Unlock()
	l.drop(victim)
	return lc, nil
}

// admitLocked adds c to the pending connections and returns the one it
// displaces, if any.
func (l *Listener) admitLocked(c *Conn) *Conn {
	var victim *Conn
	if len(l.pending) >= l.max {
		victim = l.pending[0]
		l.pending = append(l.pending[:0], l.pending[1:]...)
		victim.state = stateClosed
	}
	c.state = statePending
	l.pending = append(l.pending, c)
	return victim
}

func (l *Listener) drop(victim *Conn) {
	if victim == nil {
		return
	}
	victim.Conn.Close()
	now := time.Now()
	l.mu.Lock()
	l.closed++
	l.total++
	n := l.closed
	logNow := now.Sub(l.lastLog) >= logEvery
	if logNow {
		l.closed, l.lastLog = 0, now
	}
	l.mu.Unlock()
	if logNow {
		l.log.Warn("connection cap reached: closed the oldest connection still in its handshake",
			"listener", l.name, "cap", l.max, "closed", n, "remote", victim.RemoteAddr().String())
	}
}

func (l *Listener) removeLocked(c *Conn) {
	for i, p := range l.pending {
		if p == c {
			l.pending = append(l.pending[:i], l.pending[i+1:]...)
			return
		}
	}
}

// Stats reports the connections in their handshake now and how many the
// cap has closed.
func (l *Listener) Stats() (pending int, closedByCap uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.pending), l.total
}

// Established takes c out of the connections in their handshake: it no
// longer counts against the cap and is never closed by it.
func (c *Conn) Established() {
	c.l.mu.Lock()
	if c.state == statePending {
		c.l.removeLocked(c)
		c.state = stateEstablished
	}
	c.l.mu.Unlock()
}

// Pending puts an established c back among the connections in their
// handshake, as the newest (an HTTP connection idle between requests).
func (c *Conn) Pending() {
	c.l.mu.Lock()
	var victim *Conn
	if c.state == stateEstablished {
		victim = c.l.admitLocked(c)
	}
	c.l.mu.Unlock()
	c.l.drop(victim)
}

// Close closes the connection and forgets it.
func (c *Conn) Close() error {
	c.l.mu.Lock()
	if c.state == statePending {
		c.l.removeLocked(c)
	}
	c.state = stateClosed
	c.l.mu.Unlock()
	return c.Conn.Close()
}

// Of finds the *Conn a connection runs over: c itself, or the one under a
// wrapper that exposes it with NetConn (a *tls.Conn does). ok is false
// for a connection from another listener.
func Of(c net.Conn) (lc *Conn, ok bool) {
	for c != nil {
		if lc, ok := c.(*Conn); ok {
			return lc, true
		}
		u, isWrapper := c.(interface{ NetConn() net.Conn })
		if !isWrapper {
			break
		}
		c = u.NetConn()
	}
	return nil, false
}
