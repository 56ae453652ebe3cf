package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/tandemvm/tandem/guest/kvproto"
	"github.com/tandemvm/tandem/internal/trust"
)

// Bounds of a KVClient.
const (
	// RequestTimeout bounds one attempt of one request on one connection.
	RequestTimeout = time.Second
	// DialTimeout bounds one connection attempt to one console.
	DialTimeout = 300 * time.Millisecond
)

// KVReply is one reply a client saw, with where and when.
type KVReply struct {
	Text string // after "<client>:<seq> "
	Addr string
	At   time.Time
}

// KVClient is one kv client id talking to whichever node serves the
// console. It keeps one request outstanding (Do) and resends it under the
// same seq until it sees the reply, across connections: the guest answers
// a seq it has already applied from its record, so a retry is never
// applied twice. Every operation goes into its History (when set).
// A KVClient is used by one goroutine at a time.
type KVClient struct {
	ID    string
	Addrs []string
	// Next is the index in Addrs tried first; Seq the last seq used (a
	// client id used again must start above its last run's).
	Next int
	Seq  uint64
	// Backoff is the pause after a node turned the client away (0: none).
	Backoff time.Duration
	// History records every operation (nil: none).
	History *History

	tls  *trust.Identity // nil: plaintext
	conn net.Conn
	r    *bufio.Reader
	addr string
}

// NewKVClient is client id of the consoles at addrs, over TLS with tls's
// identity (nil: plaintext).
func NewKVClient(id string, addrs []string, tls *trust.Identity) *KVClient {
	return &KVClient{ID: id, Addrs: addrs, tls: tls}
}

// Close drops the connection (the next request dials again).
func (c *KVClient) Close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn, c.r = nil, nil
	}
}

// connect dials the addresses in turn from c.Next until one accepts.
// A node that is not primary says so on its first line; that is found
// when reading the reply, so nothing is probed here.
func (c *KVClient) connect(deadline time.Time) error {
	for time.Now().Before(deadline) {
		for range c.Addrs {
			a := c.Addrs[c.Next%len(c.Addrs)]
			c.Next++
			dctx, cancel := context.WithTimeout(context.Background(), DialTimeout)
			conn, err := trust.Dial(dctx, c.tls, a, "")
			cancel()
			if err == nil {
				c.conn, c.r, c.addr = conn, bufio.NewReader(conn), a
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.New("no console accepted a connection")
}

// Do sends cmd as the client's next request and returns its reply,
// resending the same seq until deadline or until ctx ends.
func (c *KVClient) Do(ctx context.Context, cmd string, deadline time.Time) (KVReply, error) {
	c.Seq++
	prefix := fmt.Sprintf("%s:%d ", c.ID, c.Seq)
	line := prefix + cmd + "\n"
	op := c.History.Invoke(c.ID, cmd, time.Now())
	for {
		if err := ctx.Err(); err != nil {
			return KVReply{}, err
		}
		if time.Now().After(deadline) {
			return KVReply{}, fmt.Errorf("%s%s: no reply by the deadline", prefix, cmd)
		}
		if c.conn == nil {
			if err := c.connect(deadline); err != nil {
				return KVReply{}, err
			}
		}
		rep, err := c.attempt(line, prefix, earliest(deadline, time.Now().Add(RequestTimeout)))
		if err == nil {
			c.History.Return(op, rep.Text, rep.At)
			return rep, nil
		}
		// Lost, turned away or silent: the next node in turn.
		c.Close()
		if c.Backoff > 0 {
			time.Sleep(c.Backoff)
		}
	}
}

// maxReplyLine bounds a reply line read from a node: a reply is shorter
// than a request (kvproto.MaxLine), so anything longer is a fault.
const maxReplyLine = 2 * kvproto.MaxLine

// readLine reads one reply line, refusing one past maxReplyLine instead
// of buffering whatever the node sends until a newline.
func (c *KVClient) readLine() (string, error) {
	var line []byte
	for {
		chunk, err := c.r.ReadSlice('\n')
		line = append(line, chunk...)
		if len(line) > maxReplyLine {
			return "", fmt.Errorf("a reply line longer than %d bytes", maxReplyLine)
		}
		if err != bufio.ErrBufferFull {
			return string(line), err
		}
	}
}

// attempt sends line once on the current connection and reads until the
// reply with the given prefix, an error or the deadline.
func (c *KVClient) attempt(line, prefix string, deadline time.Time) (KVReply, error) {
	c.conn.SetDeadline(deadline)
	if _, err := io.WriteString(c.conn, line); err != nil {
		return KVReply{}, err
	}
	for {
		l, err := c.readLine()
		if err != nil {
			return KVReply{}, err
		}
		l = strings.TrimRight(l, "\r\n")
		if strings.HasPrefix(l, "ERR not the primary") {
			return KVReply{}, errors.New("not the primary")
		}
		// Every client of a console sees every reply: pick out ours.
		if text, ok := strings.CutPrefix(l, prefix); ok {
			return KVReply{Text: text, Addr: c.addr, At: time.Now()}, nil
		}
	}
}

// DoBatch sends idempotent requests (GETs, or DELs of keys nobody else
// writes) pipelined, each with its own seq, and returns their replies in
// order. Requests whose reply is lost with a connection are sent again
// under new seqs, so a batch survives a failover; in the History each
// send is an operation of its own (a lost one stays pending).
func (c *KVClient) DoBatch(ctx context.Context, cmds []string, deadline time.Time) ([]KVReply, error) {
	out := make([]KVReply, len(cmds))
	todo := make([]int, len(cmds))
	for i := range todo {
		todo[i] = i
	}
	for len(todo) > 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s: %d of %d requests unanswered by the deadline", c.ID, len(todo), len(cmds))
		}
		if c.conn == nil {
			if err := c.connect(deadline); err != nil {
				return nil, err
			}
		}
		todo = c.batchOnce(cmds, todo, out, earliest(deadline, time.Now().Add(RequestTimeout+time.Duration(len(todo))*time.Millisecond)))
	}
	return out, nil
}

// batchOnce sends cmds[todo] on the current connection and reads replies
// into out until all came, an error or dl; it returns those still
// unanswered (and drops the connection if any are).
func (c *KVClient) batchOnce(cmds []string, todo []int, out []KVReply, dl time.Time) []int {
	type pending struct {
		i  int
		op OpID
	}
	want := map[string]pending{} // "<client>:<seq>" -> its request
	var b strings.Builder
	now := time.Now()
	for _, i := range todo {
		c.Seq++
		tag := fmt.Sprintf("%s:%d", c.ID, c.Seq)
		want[tag] = pending{i, c.History.Invoke(c.ID, cmds[i], now)}
		b.WriteString(tag + " " + cmds[i] + "\n")
	}
	c.conn.SetDeadline(dl)
	_, err := io.WriteString(c.conn, b.String())
	for err == nil && len(want) > 0 {
		var l string
		if l, err = c.readLine(); err != nil {
			break
		}
		l = strings.TrimRight(l, "\r\n")
		if strings.HasPrefix(l, "ERR not the primary") {
			err = errors.New("not the primary")
			break
		}
		tag, text, _ := strings.Cut(l, " ")
		if p, ok := want[tag]; ok {
			out[p.i] = KVReply{Text: text, Addr: c.addr, At: time.Now()}
			c.History.Return(p.op, text, out[p.i].At)
			delete(want, tag)
		}
	}
	left := todo[:0]
	for _, p := range want {
		left = append(left, p.i)
	}
	slices.Sort(left)
	if err != nil {
		c.Close()
	}
	return left
}

func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
