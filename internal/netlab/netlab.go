// Package netlab builds, for tests, a small network on the host: a Linux
// bridge and a client network namespace joined to it by a veth pair, with
// the client at 10.77.0.2/24. Devices a test opens (TAPs) attach to the
// bridge; the client reaches them from its namespace. Everything is
// removed when the test ends. It needs root; without it the test skips.
//
// It owns the names it makes (a per-process prefix, so parallel test
// binaries do not collide) and nothing else. It must never touch an
// interface it did not create.
package netlab

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// ClientIP is the client namespace's address on the bridge.
const ClientIP = "10.77.0.2"

// Lab is one bridge with one client namespace.
type Lab struct {
	t      testing.TB
	prefix string
	Bridge string // the bridge's name, for tap.Spec.Bridge
	NS     string // the client namespace's name
	v0, v1 string
	taps   atomic.Int32
}

var labs atomic.Int32

// New makes the bridge and the client namespace, or skips t without root.
func New(t testing.TB) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a bridge, a namespace and TAP devices")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
	p := fmt.Sprintf("tn%d%c", os.Getpid()%100000, 'a'+labs.Add(1)%26)
	l := &Lab{t: t, prefix: p, Bridge: p + "br", NS: p + "ns", v0: p + "v0", v1: p + "v1"}
	t.Cleanup(l.teardown)
	l.IP("link", "add", l.Bridge, "type", "bridge")
	l.IP("link", "set", l.Bridge, "up")
	l.IP("netns", "add", l.NS)
	l.IP("link", "add", l.v0, "type", "veth", "peer", "name", l.v1)
	l.IP("link", "set", l.v0, "master", l.Bridge, "up")
	l.IP("link", "set", l.v1, "netns", l.NS)
	l.IP("-n", l.NS, "addr", "add", ClientIP+"/24", "dev", l.v1)
	l.IP("-n", l.NS, "link", "set", l.v1, "up")
	return l
}

// TapName is a fresh TAP device name for this lab (the caller opens it).
func (l *Lab) TapName() string { return fmt.Sprintf("%st%d", l.prefix, l.taps.Add(1)) }

// IP runs ip with args and fails the test on error.
func (l *Lab) IP(args ...string) string {
	l.t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// SetClientLink takes the client's veth end on the bridge down or up (a
// cut between the client and every node).
func (l *Lab) SetClientLink(up bool) {
	state := "down"
	if up {
		state = "up"
	}
	l.IP("link", "set", l.v0, state)
}

func (l *Lab) teardown() {
	exec.Command("ip", "link", "del", l.v0).Run()
	exec.Command("ip", "netns", "del", l.NS).Run()
	exec.Command("ip", "link", "del", l.Bridge).Run()
}

// DialUDP opens a UDP socket inside the client namespace, connected to
// raddr. A socket belongs to the namespace of the thread that makes it,
// so it is made on a locked thread moved into the namespace and back.
func (l *Lab) DialUDP(raddr string) *net.UDPConn {
	l.t.Helper()
	type res struct {
		c   *net.UDPConn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- res{err: err}
			return // the locked thread ends with the goroutine
		}
		defer unix.Close(orig)
		nsfd, err := unix.Open("/run/netns/"+l.NS, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- res{err: err}
			return
		}
		defer unix.Close(nsfd)
		if err := unix.Setns(nsfd, unix.CLONE_NEWNET); err != nil {
			ch <- res{err: err}
			return
		}
		ua, err := net.ResolveUDPAddr("udp4", raddr)
		var c *net.UDPConn
		if err == nil {
			c, err = net.DialUDP("udp4", nil, ua)
		}
		if unix.Setns(orig, unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- res{c, err}
	}()
	r := <-ch
	if r.err != nil {
		l.t.Fatalf("socket in namespace %s: %v", l.NS, r.err)
	}
	l.t.Cleanup(func() { r.c.Close() })
	return r.c
}
