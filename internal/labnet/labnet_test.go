package labnet

import (
	"fmt"
	"net"
	"os"
	"os/exec"
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

// peekPrefix is the prefix the next Make will try first (the tests in
// this package do not run in parallel).
func peekPrefix() string {
	return fmt.Sprintf("tn%d%c", os.Getpid()%100000, 'a'+(made.Load()+1)%26)
}

// TestMakeLeavesOthersNames: a name Make picks that already exists is
// someone else's. Whether it is the first name (the bridge) or one made
// after Make has created others (the veth), Make must leave it in place,
// remove what it made under that prefix, and succeed under another.
func TestMakeLeavesOthersNames(t *testing.T) {
	if err := Usable(); err != nil {
		t.Skip(err)
	}
	for _, c := range []struct{ suffix, kind string }{{"br", "bridge"}, {"v0", "bridge"}} {
		p := peekPrefix()
		other := p + c.suffix
		if out, err := exec.Command("ip", "link", "add", other, "type", c.kind).CombinedOutput(); err != nil {
			t.Fatalf("pre-create %s: %v: %s", other, err, out)
		}
		n, err := Make()
		if err != nil {
			exec.Command("ip", "link", "del", other).Run()
			t.Fatalf("Make with %s taken: %v", other, err)
		}
		if n.prefix == p {
			t.Errorf("Make used prefix %s although %s exists", p, other)
		}
		n.Close()
		if _, err := net.InterfaceByName(other); err != nil {
			t.Errorf("%s (not Make's) was removed: %v", other, err)
		}
		exec.Command("ip", "link", "del", other).Run()
		// Nothing Make made under the taken prefix is left behind.
		for _, name := range []string{p + "br", p + "v0"} {
			if name != other {
				if _, err := net.InterfaceByName(name); err == nil {
					t.Errorf("%s left behind after the failed attempt", name)
				}
			}
		}
		if out, _ := exec.Command("ip", "netns", "list").CombinedOutput(); strings.Contains(string(out), p+"ns") {
			t.Errorf("namespace %sns left behind after the failed attempt", p)
		}
	}
}
