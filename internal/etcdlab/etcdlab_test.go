package etcdlab

import (
	"context"
	"net"
	"net/url"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain: no goroutine may be left but the members' idle peer
// connections (etcd's rafthttp keeps HTTP/1.1 connections that closing a
// member does not close; as in ft/etcdcoord).
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreAnyFunction("net/http.(*conn).serve"),
		goleak.IgnoreAnyFunction("net/http.(*connReader).backgroundRead"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"))
}

// TestRestartWaitsForItsPort: a member restarts on the ports it had; if
// another process holds one for a moment (as another test's freeURL
// probe does), the restart waits for it instead of failing.
func TestRestartWaitsForItsPort(t *testing.T) {
	c, err := Start(Config{Members: 1, Dir: t.TempDir(), TickMs: 50, ElectionMs: 500})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	m := c.Members[0]
	m.Stop()
	u, _ := url.Parse(m.ClientURL)
	ln, err := net.Listen("tcp", u.Host)
	if err != nil {
		t.Fatalf("the stopped member's port: %v", err)
	}
	go func() {
		time.Sleep(300 * time.Millisecond)
		ln.Close()
	}()
	if err := m.Restart(); err != nil {
		t.Fatalf("restart while the port was held for 300 ms: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Leader(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestStartRetriesATakenPort: Start begins again on new ports when a port
// it picked was taken before its member bound it.
func TestStartRetriesATakenPort(t *testing.T) {
	var held net.Listener
	takeNext = func(addr string) {
		if held == nil {
			held, _ = net.Listen("tcp", addr)
		}
	}
	defer func() {
		takeNext = func(string) {}
		if held != nil {
			held.Close()
		}
	}()
	dir := t.TempDir()
	c, err := Start(Config{Members: 3, Dir: dir, TickMs: 50, ElectionMs: 500})
	if err != nil {
		t.Fatalf("start with a port taken under it: %v", err)
	}
	defer c.Close()
	if held == nil {
		t.Fatal("the test took no port")
	}
	for _, m := range c.Members {
		if u, _ := url.Parse(m.ClientURL); u.Host == held.Addr().String() {
			t.Fatalf("member %s on the taken port %s", m.Name, u.Host)
		}
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatal(err)
	}
}
