package netlimit

import (
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

func listen(t *testing.T, max int) *Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := Wrap(ln, "test", max, slog.New(slog.NewTextHandler(io.Discard, nil)))
	t.Cleanup(func() { l.Close() })
	return l
}

// closedSoon says whether the peer closed c within d.
func closedSoon(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	var b [1]byte
	_, err := c.Read(b[:])
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return false
	}
	return err != nil
}

// Idle connections beyond the cap displace the oldest idle ones; an
// established connection is never closed by the cap, and a new one is
// always admitted.
func TestOldestHandshakingConnectionMakesRoom(t *testing.T) {
	l := listen(t, 3)
	accepted := make(chan net.Conn, 100)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dial := func() (client, server net.Conn) {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		select {
		case s := <-accepted:
			return c, s
		case <-time.After(5 * time.Second):
			t.Fatal("not accepted")
		}
		return nil, nil
	}
	realC, realS := dial()
	realS.(*Conn).Established()
	var idle []net.Conn
	for range 10 {
		c, _ := dial()
		idle = append(idle, c)
	}
	// The first seven idle ones were closed to make room, the last three
	// are held; the established one stays.
	for i, c := range idle[:7] {
		if !closedSoon(c, 2*time.Second) {
			t.Errorf("idle connection %d still open past the cap", i)
		}
	}
	for i, c := range idle[7:] {
		if closedSoon(c, 100*time.Millisecond) {
			t.Errorf("idle connection %d of the newest three was closed", 7+i)
		}
	}
	if closedSoon(realC, 100*time.Millisecond) {
		t.Error("the established connection was closed by the cap")
	}
	if p, n := l.Stats(); p != 3 || n != 7 {
		t.Errorf("stats: %d pending, %d closed; want 3 and 7", p, n)
	}
	// Back to pending (an idle HTTP connection): the newest, so the
	// oldest idle one goes first.
	realS.(*Conn).Pending()
	if !closedSoon(idle[7], 2*time.Second) {
		t.Error("oldest pending connection not closed when an established one came back")
	}
	if closedSoon(realC, 100*time.Millisecond) {
		t.Error("the connection put back was closed instead of the oldest")
	}
	realS.Close()
	if p, _ := l.Stats(); p != 2 {
		t.Errorf("%d pending after a close, want 2", p)
	}
}
