package ft

import (
	"bytes"
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
// answers every line it is given with "ok <line>".
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
		e.b.release([]byte("ok " + string(p)))
		return nil
	}, e.serving.Load, nil, quietLog(), Trust{})
	if err != nil {
		t.Fatal(err)
	}
	e.b = b
	t.Cleanup(b.close)
	return e
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
	eventually(t, "reply from a", func() bool { return strings.Contains(out.String(), "ok c:1 SET x 1") })
	if b.lines() != "" {
		t.Fatalf("a node that does not serve got %q", b.lines())
	}
	a.serving.Store(false)
	b.serving.Store(true)
	a.b.dropAll() // a stops serving: its clients are cut (EOF, not an error line)
	lines <- "c:2 SET y 2\n"
	eventually(t, "reply from b", func() bool { return strings.Contains(out.String(), "ok c:2 SET y 2") })
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
	if !strings.Contains(out.String(), "ok c:1 GET k") {
		t.Fatalf("no reply printed: out %q notes %q", out.String(), notes.String())
	}
}
