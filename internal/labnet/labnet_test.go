package labnet

import (
	"net"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestMakeClose: Make builds the bridge and the namespace with the
// client's address in it, and Close leaves none of its names behind.
func TestMakeClose(t *testing.T) {
	if err := Usable(); err != nil {
		t.Skip(err)
	}
	n, err := Make()
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			n.Close()
		}
	}()
	if _, err := net.InterfaceByName(n.Bridge); err != nil {
		t.Fatalf("bridge %s: %v", n.Bridge, err)
	}
	out, err := n.IP("-n", n.NS, "-4", "addr", "show")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, ClientIP+"/24") {
		t.Fatalf("namespace %s has no %s/24:\n%s", n.NS, ClientIP, out)
	}
	c, err := n.DialUDP("10.77.0.10:7000")
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	n.Close()
	closed = true
	for _, name := range []string{n.Bridge, n.v0} {
		if _, err := net.InterfaceByName(name); err == nil {
			t.Errorf("%s still exists after Close", name)
		}
	}
	if out, err := n.IP("netns", "list"); err != nil || strings.Contains(out, n.NS) {
		t.Errorf("namespace %s after Close: %v\n%s", n.NS, err, out)
	}
}
