package ft

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/tandemvm/tandem/internal/trust"
)

// ConsoleClient talks to the guest's console and follows the primary: a
// node that does not run the guest turns clients away ("ERR not the
// primary", the console bridge's serving check), so on any loss the
// client tries the addresses in turn until one serves, for at most
// Timeout. Lines sent on a connection that died before any reply are
// resent on the next (the kv protocol answers a resent request from its
// record).
type ConsoleClient struct {
	// Addrs are every node's console address.
	Addrs   []string
	Timeout time.Duration
	// TLS, if set, makes every connection mutual TLS against the CA.
	TLS *trust.Identity
	// Out receives the guest's output; Notes says which node serves.
	Out, Notes io.Writer
}

// Run sends lines (each ending in a newline) until lines is closed and
// the last replies have come in (nil), or no node served for Timeout.
func (c *ConsoleClient) Run(lines <-chan string) error {
	var unsent []string // sent on a connection that died before any reply
	next := 0
	drain := &drainClock{within: c.Timeout}
	for {
		conn, err := c.dialPrimary(&next)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.Notes, "tandem console: connected to %s\n", conn.RemoteAddr())
		s := &consoleSession{conn: conn, out: c.Out, unsent: unsent, got: make(chan struct{}, 1), readDone: make(chan error, 1), drain: drain}
		done, err := s.run(lines)
		unsent = s.pending()
		if done {
			if len(unsent) > 0 {
				fmt.Fprintf(c.Notes, "tandem console: input ended; no reply to %d line(s) within %v\n", len(unsent), c.Timeout)
			}
			return nil
		}
		fmt.Fprintf(c.Notes, "tandem console: lost %s (%v); looking for the primary\n", conn.RemoteAddr(), err)
	}
}

// drainClock bounds the wait for the last replies once the input has
// ended, across reconnections: within of the input's end.
type drainClock struct {
	within time.Duration
	by     time.Time // zero until the input ends
}

func (d *drainClock) deadline() time.Time {
	if d.by.IsZero() {
		d.by = time.Now().Add(max(d.within, 2*time.Second))
	}
	return d.by
}

// consoleSession is one connection of a ConsoleClient.
type consoleSession struct {
	drain    *drainClock
	conn     net.Conn
	out      io.Writer
	got      chan struct{} // capacity 1: a reply came in
	readDone chan error    // capacity 1: the reader's end
	// mu guards unsent.
	mu     sync.Mutex
	unsent []string
}

func (s *consoleSession) pending() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.unsent
}

// run resends what the last connection left unanswered, then sends lines
// until they end (done) or the connection is lost. It owns the
// connection's reader: the connection is closed and the reader joined
// before it returns.
func (s *consoleSession) run(lines <-chan string) (done bool, err error) {
	readerGone := make(chan struct{})
	go func() {
		defer close(readerGone)
		s.read()
	}()
	defer func() {
		s.conn.Close()
		<-readerGone // a closed connection ends its read at once
	}()
	// A node that accepts but does not read must not hold the resend
	// forever: the same deadline as pump's writes.
	for _, l := range s.pending() {
		s.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if _, err := s.conn.Write([]byte(l)); err != nil {
			break
		}
	}
	err = s.pump(lines)
	if err != errInputEnded {
		return false, err
	}
	// stdin ended: wait for the last replies (output clears unsent), with
	// the connection still open (closing it first cut off every reply not
	// yet read), until the drain deadline. A connection lost meanwhile
	// (the primary died before answering) sends the client to the next
	// primary, which is asked again.
	deadline := s.drain.deadline()
	for time.Now().Before(deadline) && len(s.pending()) > 0 {
		select {
		case err := <-s.readDone:
			if len(s.pending()) > 0 {
				return false, err
			}
			return true, nil
		case <-s.got:
		case <-time.After(20 * time.Millisecond):
		}
	}
	return true, nil
}

// read copies the guest's output until the connection ends.
func (s *consoleSession) read() {
	r := bufio.NewReader(s.conn)
	for {
		l, err := r.ReadString('\n')
		if l != "" {
			if strings.HasPrefix(l, "ERR not the primary") {
				s.readDone <- errors.New("not the primary")
				return
			}
			io.WriteString(s.out, l)
			s.mu.Lock()
			s.unsent = nil
			s.mu.Unlock()
			select {
			case s.got <- struct{}{}:
			default:
			}
		}
		if err != nil {
			s.readDone <- err
			return
		}
	}
}

// errInputEnded is pump's answer when lines is closed. It is not io.EOF:
// a node that closes the connection (fenced, stopping) also ends the
// reader with io.EOF, and that must make the client look for the primary,
// not end as if its input had (the command's client did exactly that).
var errInputEnded = errors.New("console input ended")

// pump sends lines until they end or the connection is lost.
func (s *consoleSession) pump(lines <-chan string) error {
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				return errInputEnded
			}
			s.mu.Lock()
			s.unsent = append(s.unsent, l)
			s.mu.Unlock()
			s.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := s.conn.Write([]byte(l)); err != nil {
				return err
			}
		case err := <-s.readDone:
			return err
		}
	}
}

// dialPrimary tries the addresses in turn, starting at *next, until one
// accepts and does not turn the client away, for at most Timeout. With
// TLS every connection is mutual TLS against the cluster's CA.
func (c *ConsoleClient) dialPrimary(next *int) (net.Conn, error) {
	addrs := c.Addrs
	deadline := time.Now().Add(c.Timeout)
	var lastErr error
	for attempt := 0; time.Now().Before(deadline); attempt++ {
		a := addrs[*next%len(addrs)]
		*next++
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := trust.Dial(ctx, c.TLS, a, "")
		cancel()
		if err != nil {
			lastErr = err
		}
		if err == nil {
			// A node that does not serve says so at once.
			conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			var b [1]byte
			n, rerr := conn.Read(b[:])
			conn.SetReadDeadline(time.Time{})
			if n == 0 && rerr != nil && isTimeout(rerr) {
				return conn, nil
			}
			if rerr != nil {
				lastErr = rerr // a refused certificate shows here
			}
			conn.Close()
		}
		if attempt%len(addrs) == len(addrs)-1 {
			time.Sleep(50 * time.Millisecond)
		}
	}
	if lastErr != nil {
		return nil, fmt.Errorf("no node served the console within %v (tried %s; last error: %v)", c.Timeout, strings.Join(addrs, ", "), lastErr)
	}
	return nil, fmt.Errorf("no node served the console within %v (tried %s)", c.Timeout, strings.Join(addrs, ", "))
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
