// Package netlab builds, for tests, a small network on the host: a Linux
// bridge and a client network namespace joined to it by a veth pair, with
// the client at 10.77.0.2/24 (internal/labnet makes them). Devices a test
// opens (TAPs) attach to the bridge; the client reaches them from its
// namespace. Everything is removed when the test ends. It needs root;
// without it the test skips.
//
// It owns the names it makes (a per-process prefix, so parallel test
// binaries do not collide) and nothing else. It must never touch an
// interface it did not create.
package netlab

import (
	"net"
	"testing"

	"github.com/tandemvm/tandem/internal/labnet"
)

// ClientIP is the client namespace's address on the bridge.
const ClientIP = labnet.ClientIP

// Lab is one bridge with one client namespace, removed when its test
// ends. Bridge, NS and TapName are labnet.Net's.
type Lab struct {
	*labnet.Net
	t testing.TB
}

// New makes the bridge and the client namespace, or skips t without root.
func New(t testing.TB) *Lab {
	t.Helper()
	if err := labnet.Usable(); err != nil {
		t.Skip(err.Error())
	}
	n, err := labnet.Make()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	return &Lab{Net: n, t: t}
}

// IP runs ip with args and fails the test on error.
func (l *Lab) IP(args ...string) string {
	l.t.Helper()
	out, err := l.Net.IP(args...)
	if err != nil {
		l.t.Fatal(err)
	}
	return out
}

// SetClientLink takes the client's veth end on the bridge down or up (a
// cut between the client and every node).
func (l *Lab) SetClientLink(up bool) {
	l.t.Helper()
	if err := l.Net.SetClientLink(up); err != nil {
		l.t.Fatal(err)
	}
}

// DialUDP opens a UDP socket inside the client namespace, connected to
// raddr; it is closed when the test ends.
func (l *Lab) DialUDP(raddr string) *net.UDPConn {
	l.t.Helper()
	c, err := l.Net.DialUDP(raddr)
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { c.Close() })
	return c
}
