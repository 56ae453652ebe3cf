package ft

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// lockedBuffer is a bytes.Buffer safe for a writer and a reader.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// echoBridge is a console bridge that serves while serving is set and
// answers every line it is given as the kv guest does: "<line> ok" (the
// reply starts with the request's ID).
type echoBridge struct {
	b       *consoleBridge
	serving atomic.Bool
	mu      sync.Mutex
	got     []string
}

func newEchoBridge(t *testing.T) *echoBridge {
	t.Helper()
	e := &echoBridge{}
	b, err := newConsoleBridge("127.0.0.1:0", func(p []byte) error {
		e.mu.Lock()
		e.got = append(e.got, string(p))
		e.mu.Unlock()
		e.b.release(echoReply(p))
		return nil
	}, e.serving.Load, nil, quietLog(), Trust{})
	if err != nil {
		t.Fatal(err)
	}
	e.b = b
	t.Cleanup(b.close)
	return e
}

// echoReply is the echo bridge's answer to the lines p.
func echoReply(p []byte) []byte {
	var out []byte
	for _, l := range strings.SplitAfter(string(p), "\n") {
		if l != "" {
			out = append(out, strings.TrimSuffix(l, "\n")+" ok\n"...)
		}
	}
	return out
}

func (e *echoBridge) lines() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return strings.Join(e.got, "")
}

// The console client finds the node that serves, follows the primary to
// another node when the first stops serving, and ends once its input
// ends and the last reply is in; its connections' readers are joined
// (goleak).
func TestConsoleClientFollowsPrimary(t *testing.T) {
	a, b := newEchoBridge(t), newEchoBridge(t)
	a.serving.Store(true)
	var out, notes lockedBuffer
	c := &ConsoleClient{Addrs: []string{b.b.addr(), a.b.addr()}, Timeout: 10 * time.Second, Out: &out, Notes: &notes}
	lines := make(chan string)
	done := make(chan error, 1)
	go func() { done <- c.Run(lines) }()
	lines <- "c:1 SET x 1\n"
	eventually(t, "reply from a", func() bool { return strings.Contains(out.String(), "c:1 SET x 1 ok") })
	if b.lines() != "" {
		t.Fatalf("a node that does not serve got %q", b.lines())
	}
	a.serving.Store(false)
	b.serving.Store(true)
	a.b.dropAll() // a stops serving: its clients are cut (EOF, not an error line)
	lines <- "c:2 SET y 2\n"
	eventually(t, "reply from b", func() bool { return strings.Contains(out.String(), "c:2 SET y 2 ok") })
	if !strings.Contains(b.lines(), "c:2 SET y 2") || strings.Contains(a.lines(), "c:2") {
		t.Errorf("a got %q, b got %q", a.lines(), b.lines())
	}
	close(lines)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the client did not end with its input")
	}
	if n := strings.Count(notes.String(), "connected to"); n != 2 {
		t.Errorf("%d connections, want 2:\n%s", n, notes.String())
	}
}

// With no node serving, the client gives up after its timeout.
func TestConsoleClientGivesUp(t *testing.T) {
	a := newEchoBridge(t)
	c := &ConsoleClient{Addrs: []string{a.b.addr()}, Timeout: 300 * time.Millisecond, Out: &lockedBuffer{}, Notes: &lockedBuffer{}}
	err := c.Run(make(chan string))
	if err == nil || !strings.Contains(err.Error(), "no node served the console") {
		t.Fatalf("Run with no primary: %v", err)
	}
}

// Piped input (printf 'c:1 GET k\n' | tandem console): the input has
// ended before the reply comes; the client waits for it, and when the
// node it asked goes away unanswered it asks the next primary again.
func TestConsoleClientPipedInput(t *testing.T) {
	b := newEchoBridge(t)
	var a *consoleBridge
	a, err := newConsoleBridge("127.0.0.1:0", func(p []byte) error {
		// a takes the line and dies before answering; b takes over.
		go func() {
			time.Sleep(100 * time.Millisecond)
			b.serving.Store(true)
			a.dropAll()
		}()
		return nil
	}, func() bool { return !b.serving.Load() }, nil, quietLog(), Trust{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.close)
	var out, notes lockedBuffer
	c := &ConsoleClient{Addrs: []string{a.addr(), b.b.addr()}, Timeout: 5 * time.Second, Out: &out, Notes: &notes}
	lines := make(chan string, 1)
	lines <- "c:1 GET k\n"
	close(lines)
	done := make(chan error, 1)
	go func() { done <- c.Run(lines) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the client did not end")
	}
	if !strings.Contains(out.String(), "c:1 GET k ok") {
		t.Fatalf("no reply printed: out %q notes %q", out.String(), notes.String())
	}
}

// A connection that stays open but says nothing after a line was sent (a
// network cut: no reset ever comes) is taken for lost after the reply
// timeout: the client finds the node that serves now and resends the
// line there. Idle (nothing sent), a silent connection is kept.
func TestConsoleClientLeavesSilentConnection(t *testing.T) {
	a, b := newEchoBridge(t), newEchoBridge(t)
	mute := atomic.Bool{}
	// a serves but, muted, swallows every line (its replies are cut off).
	a.b.close()
	ab, err := newConsoleBridge("127.0.0.1:0", func(p []byte) error {
		if !mute.Load() {
			a.b.release(echoReply(p))
		}
		return nil
	}, func() bool { return true }, nil, quietLog(), Trust{})
	if err != nil {
		t.Fatal(err)
	}
	a.b = ab
	t.Cleanup(ab.close)
	var out, notes lockedBuffer
	c := &ConsoleClient{Addrs: []string{ab.addr(), b.b.addr()}, Timeout: 10 * time.Second, ReplyTimeout: 300 * time.Millisecond, Out: &out, Notes: &notes}
	lines := make(chan string)
	done := make(chan error, 1)
	go func() { done <- c.Run(lines) }()
	lines <- "c:1 SET x 1\n"
	eventually(t, "reply from a", func() bool { return strings.Contains(out.String(), "c:1 SET x 1 ok") })
	time.Sleep(500 * time.Millisecond) // idle past the timeout: kept
	if strings.Contains(notes.String(), "lost") {
		t.Fatalf("an idle connection was dropped: %s", notes.String())
	}
	mute.Store(true)
	b.serving.Store(true)
	lines <- "c:2 SET y 2\n"
	eventually(t, "the line resent to b", func() bool { return strings.Contains(out.String(), "c:2 SET y 2 ok") })
	if !strings.Contains(notes.String(), "no output for 300ms") {
		t.Errorf("notes do not say why: %s", notes.String())
	}
	close(lines)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// Piped kv requests are each waited for by their ID: the client ends
// only once every one is answered, and another client's reply (the
// bridge sends all output to every client) answers none of them.
func TestConsoleClientWaitsForEveryReply(t *testing.T) {
	var bridge *consoleBridge
	bridge, err := newConsoleBridge("127.0.0.1:0", func(p []byte) error {
		go func() {
			bridge.release([]byte("other:1 OK\n")) // someone else's
			for _, l := range strings.SplitAfter(string(p), "\n") {
				if l == "" {
					continue
				}
				time.Sleep(50 * time.Millisecond)
				bridge.release([]byte(strings.TrimSuffix(l, "\n") + " ok\n"))
			}
		}()
		return nil
	}, func() bool { return true }, nil, quietLog(), Trust{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(bridge.close)
	var out, notes lockedBuffer
	c := &ConsoleClient{Addrs: []string{bridge.addr()}, Timeout: 5 * time.Second, Out: &out, Notes: &notes}
	lines := make(chan string, 8)
	for i := 1; i <= 5; i++ {
		lines <- fmt.Sprintf("c:%d GET k%d\n", i, i)
	}
	close(lines)
	if err := c.Run(lines); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 5; i++ {
		if want := fmt.Sprintf("c:%d GET k%d ok", i, i); !strings.Contains(out.String(), want) {
			t.Errorf("ended without %q: %q", want, out.String())
		}
	}
	if kvID("c:12 OK") != "c:12" || kvID("c:x OK") != "" || kvID("ERR bad") != "" || kvID("c:3\n") != "c:3" {
		t.Error("kvID")
	}
}

// A primary whose guest is busy answering other clients sends a new
// client their replies at once (the bridge sends every client all
// output): that is a node serving, not one turning the client away, and
// the output it sent first is not lost. Found by the console-follow
// test: an idle console that looked for the new primary while a busy one
// used it took it for "not the primary" for 30 s.
func TestConsoleClientTakesBusyPrimary(t *testing.T) {
	a := newEchoBridge(t)
	a.serving.Store(true)
	stop := make(chan struct{})
	chatDone := make(chan struct{})
	go func() {
		defer close(chatDone)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			a.b.release([]byte(fmt.Sprintf("other:%d OK\n", i)))
		}
	}()
	defer func() { close(stop); <-chatDone }()
	var out, notes lockedBuffer
	c := &ConsoleClient{Addrs: []string{a.b.addr()}, Timeout: 2 * time.Second, Out: &out, Notes: &notes}
	lines := make(chan string)
	done := make(chan error, 1)
	go func() { done <- c.Run(lines) }()
	select {
	case lines <- "c:1 SET x 1\n":
	case err := <-done:
		t.Fatalf("the client ended before its first line: %v (notes: %s)", err, notes.String())
	}
	close(lines)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%v (notes: %s)", err, notes.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the client did not end (notes: %s)", notes.String())
	}
	if !strings.Contains(out.String(), "c:1 SET x 1 ok") {
		t.Fatalf("no reply from the busy primary (notes: %s)", notes.String())
	}
	if strings.Contains(notes.String(), "not the primary") {
		t.Errorf("a busy primary was taken for one that turns clients away:\n%s", notes.String())
	}
	if o := out.String(); !strings.HasPrefix(o, "other:") {
		t.Errorf("the output sent before the client's first line was lost: %.60q", o)
	}
}
