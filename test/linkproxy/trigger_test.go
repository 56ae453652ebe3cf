package linkproxy

import (
	"bufio"
	"errors"
	"net"
	"testing"
	"time"
)

// CutOn drops the message that matches and cuts its connection; what
// came before it was delivered, and later connections are unaffected.
func TestCutOn(t *testing.T) {
	for _, dir := range []Direction{Up, Down} {
		t.Run(dir.String(), func(t *testing.T) {
			srv := startServer(t, echo)
			p := startProxy(t, srv.ln.Addr().String(), Shape{})
			c := dial(t, p.Addr())
			r := bufio.NewReader(c)
			if _, err := roundTrip(c, r, 2*time.Second); err != nil {
				t.Fatal(err)
			}
			fired := p.CutOn(dir, []byte("commit"))
			c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := c.Write([]byte("commit 7\n")); err != nil {
				t.Fatal(err)
			}
			line, err := r.ReadString('\n')
			var ne net.Error
			if line != "" || err == nil || (errors.As(err, &ne) && ne.Timeout()) {
				t.Fatalf("after the trigger: read %q, %v; want nothing and the connection cut", line, err)
			}
			select {
			case <-fired:
			default:
				t.Fatal("trigger did not report firing")
			}
			c2 := dial(t, p.Addr())
			c2.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := c2.Write([]byte("commit 8\n")); err != nil {
				t.Fatal(err)
			}
			if line, err := bufio.NewReader(c2).ReadString('\n'); err != nil || line != "commit 8\n" {
				t.Fatalf("a one-shot trigger fired again: %q, %v", line, err)
			}
		})
	}
}
