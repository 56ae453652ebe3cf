package ft

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
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
	// ReplyTimeout: a connection on which a line sent has had no output
	// for this long is taken for lost (a cut leaves it open and silent:
	// no reset ever comes), and the client looks for the primary and
	// resends. 0: DefaultReplyTimeout; negative: never.
	ReplyTimeout time.Duration
	// TLS, if set, makes every connection mutual TLS against the CA.
	TLS *trust.Identity
	// Out receives the guest's output; Notes says which node serves.
	Out, Notes io.Writer
}

// DefaultReplyTimeout is ConsoleClient.ReplyTimeout's default: far above
// a reply's normal delay (an epoch or two) and a failover's pause.
const DefaultReplyTimeout = 5 * time.Second

// Run sends lines (each ending in a newline) until lines is closed and
// the last replies have come in (nil), or no node served for Timeout. A
// kv request (guest/kvproto) is answered by the output line that starts
// with its ID; any other line by any output line without one.
func (c *ConsoleClient) Run(lines <-chan string) error {
	var unsent []pendingLine // sent on a connection that died before its reply
	next := 0
	drain := &drainClock{within: c.Timeout}
	silence := c.ReplyTimeout
	if silence == 0 {
		silence = DefaultReplyTimeout
	}
	for {
		conn, err := c.dialPrimary(&next)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.Notes, "tandem console: connected to %s\n", conn.RemoteAddr())
		s := &consoleSession{conn: conn, out: c.Out, unsent: unsent, got: make(chan struct{}, 1), readDone: make(chan error, 1), drain: drain, silence: silence}
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
	silence  time.Duration // see ConsoleClient.ReplyTimeout (<0: never)
	// mu guards unsent and waiting.
	mu     sync.Mutex
	unsent []pendingLine
	// waiting is when a reply was last awaited from: the send of the
	// first line of unsent, or the last reply that answered one (zero:
	// nothing waits).
	waiting time.Time
}

// pendingLine is a line sent and not answered yet; id is its kv request
// ID ("client:seq"), "" for a line that is not a kv request.
type pendingLine struct {
	line, id string
}

// kvID is the "client:seq" a kv request or reply line starts with ("":
// none). The console's guest answers every request with one line that
// starts with the request's ID (guest/kvproto), and the console bridge
// sends every client all output: a reply to another client is no answer
// to this one's lines.
func kvID(l string) string {
	id, _, ok := strings.Cut(l, " ")
	if !ok {
		id = strings.TrimRight(l, "\r\n")
	}
	client, seq, ok := strings.Cut(id, ":")
	if !ok || client == "" || seq == "" || strings.Trim(seq, "0123456789") != "" {
		return ""
	}
	return id
}

// answered removes what the output line l answers: the pending line with
// its kv ID; a line without one (not the kv protocol) answers every
// pending line without one. It says whether anything was answered.
func (s *consoleSession) answered(l string) bool {
	id := kvID(l)
	s.mu.Lock()
	defer s.mu.Unlock()
	kept := s.unsent[:0]
	for _, p := range s.unsent {
		if p.id != id {
			kept = append(kept, p)
		}
	}
	done := len(kept) < len(s.unsent)
	clear(s.unsent[len(kept):])
	s.unsent = kept
	if done {
		s.waiting = time.Time{}
		if len(s.unsent) > 0 {
			s.waiting = time.Now()
		}
	}
	return done
}

// errSilent is a connection on which a line sent had no output for the
// reply timeout: taken for lost.
type errSilent time.Duration

func (e errSilent) Error() string {
	return fmt.Sprintf("no output for %v after a line was sent", time.Duration(e))
}

// silent says whether a line has waited for output longer than the
// reply timeout.
func (s *consoleSession) silent() bool {
	if s.silence < 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.unsent) > 0 && !s.waiting.IsZero() && time.Since(s.waiting) > s.silence
}

// sent notes that l goes out now (it waits for output from now on, if
// nothing waited before).
func (s *consoleSession) sent(l string, resend bool) {
	s.mu.Lock()
	if !resend {
		s.unsent = append(s.unsent, pendingLine{line: l, id: kvID(l)})
	}
	if s.waiting.IsZero() {
		s.waiting = time.Now()
	}
	s.mu.Unlock()
}

func (s *consoleSession) pending() []pendingLine {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.unsent)
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
	for _, p := range s.pending() {
		s.sent(p.line, true)
		s.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if _, err := s.conn.Write([]byte(p.line)); err != nil {
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
			if s.silent() {
				return false, errSilent(s.silence)
			}
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
			if s.answered(l) {
				select {
				case s.got <- struct{}{}:
				default:
				}
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

// pump sends lines until they end or the connection is lost (broken, or
// silent for the reply timeout).
func (s *consoleSession) pump(lines <-chan string) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				return errInputEnded
			}
			s.sent(l, false)
			s.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := s.conn.Write([]byte(l)); err != nil {
				return err
			}
		case err := <-s.readDone:
			return err
		case <-tick.C:
			if s.silent() {
				return errSilent(s.silence)
			}
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
	said := map[string]string{} // what was said of each address
	note := func(a string, err error) {
		lastErr = err
		if msg := err.Error(); said[a] != msg {
			said[a] = msg
			fmt.Fprintf(c.Notes, "tandem console: %s: %v\n", a, err)
		}
	}
	for attempt := 0; time.Now().Before(deadline); attempt++ {
		a := addrs[*next%len(addrs)]
		*next++
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := trust.Dial(ctx, c.TLS, a, "")
		cancel()
		if err != nil {
			note(a, err)
		}
		if err == nil {
			served, refusal, err := firstWords(conn)
			if err == nil && refusal == "" {
				return served, nil
			}
			switch {
			case refusal != "":
				note(a, errors.New(refusal))
			default:
				note(a, err) // a refused certificate shows here
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

// firstWords tells a node that turns the client away from one that
// serves. A node that does not serve says so at once, with one line
// starting "ERR " and a close; one that serves may send nothing for a
// while, or at once the guest's output to its other clients (the bridge
// sends every client all output), which must not be taken for a refusal
// nor lost: it is handed back in front of the connection's next reads.
func firstWords(conn net.Conn) (served net.Conn, refusal string, err error) {
	deadline := time.Now().Add(50 * time.Millisecond)
	var buf []byte
	var b [256]byte
	for len(buf) < len(b) {
		conn.SetReadDeadline(deadline)
		n, rerr := conn.Read(b[:])
		buf = append(buf, b[:n]...)
		if line, _, ok := strings.Cut(string(buf), "\n"); ok || rerr != nil {
			if strings.HasPrefix(string(buf), "ERR not the primary") || strings.HasPrefix(string(buf), "ERR too many console clients") {
				return nil, strings.TrimPrefix(strings.TrimSpace(line), "ERR "), nil
			}
			if rerr != nil && !isTimeout(rerr) {
				return nil, "", rerr
			}
			break
		}
	}
	conn.SetReadDeadline(time.Time{})
	if len(buf) == 0 {
		return conn, "", nil
	}
	return &prefixConn{Conn: conn, prefix: buf}, "", nil
}

// prefixConn reads prefix before the connection's own bytes.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.prefix) > 0 {
		n := copy(b, p.prefix)
		p.prefix = p.prefix[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
