package labnet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ClientIP is the client namespace's address on the bridge.
const ClientIP = "10.77.0.2"

// cmdTimeout bounds one ip command (they take milliseconds; a stuck
// netlink call must not hang a test or the demo).
const cmdTimeout = 10 * time.Second

// Net is one bridge with one client namespace.
type Net struct {
	Bridge string // the bridge's name, for tap.Spec.Bridge or --net
	NS     string // the client namespace's name
	prefix string
	v0, v1 string
	taps   atomic.Int32

	// undo holds, newest last, the ip commands that remove what this Net
	// made: only objects whose creating command succeeded are on it, so
	// Close never removes a name that some other program owns.
	undo [][]string
}

var made atomic.Int32

// tries bounds how many prefixes Make tries when a name it picked
// already exists (another process whose pid agrees mod 100000, or one
// that died without cleaning up).
const tries = 8

// ErrExists is returned (wrapped) when a name Make picked is in use.
var ErrExists = errors.New("name already exists")

// Usable says why this process cannot make a Net (nil: it can): it needs
// root (CAP_NET_ADMIN) and /dev/net/tun.
func Usable() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root to make a bridge, a namespace and TAP devices")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return errors.New("no /dev/net/tun")
	}
	return nil
}

// nextPrefix is a fresh name prefix: "tn", the pid mod 100000 and a
// letter, so every name fits the kernel's 15 bytes.
func nextPrefix() string {
	return fmt.Sprintf("tn%d%c", os.Getpid()%100000, 'a'+made.Add(1)%26)
}

// Make makes the bridge and the client namespace; on an error it has
// already removed whatever it made (and only that). If a name it picked
// is taken it tries another prefix. The caller must Close the Net.
func Make() (*Net, error) {
	if err := Usable(); err != nil {
		return nil, err
	}
	var err error
	for range tries {
		var n *Net
		if n, err = makeOn(nextPrefix()); err == nil {
			return n, nil
		}
		if !errors.Is(err, ErrExists) {
			return nil, err
		}
	}
	return nil, err
}

// makeOn makes the Net under prefix p, recording each object as soon
// as its command succeeds.
func makeOn(p string) (*Net, error) {
	n := &Net{prefix: p, Bridge: p + "br", NS: p + "ns", v0: p + "v0", v1: p + "v1"}
	for _, st := range []struct{ do, undo []string }{
		{[]string{"link", "add", n.Bridge, "type", "bridge"}, []string{"link", "del", n.Bridge}},
		{[]string{"link", "set", n.Bridge, "up"}, nil},
		{[]string{"netns", "add", n.NS}, []string{"netns", "del", n.NS}},
		// Deleting v0 deletes its peer v1 too, wherever v1 has moved.
		{[]string{"link", "add", n.v0, "type", "veth", "peer", "name", n.v1}, []string{"link", "del", n.v0}},
		{[]string{"link", "set", n.v0, "master", n.Bridge, "up"}, nil},
		{[]string{"link", "set", n.v1, "netns", n.NS}, nil},
		{[]string{"-n", n.NS, "addr", "add", ClientIP + "/24", "dev", n.v1}, nil},
		{[]string{"-n", n.NS, "link", "set", n.v1, "up"}, nil},
	} {
		out, err := n.IP(st.do...)
		if err != nil {
			n.Close()
			if strings.Contains(out, "File exists") {
				return nil, fmt.Errorf("%w: %v", ErrExists, err)
			}
			return nil, err
		}
		if st.undo != nil {
			n.undo = append(n.undo, st.undo)
		}
	}
	return n, nil
}

// TapName is a fresh TAP device name on this Net's prefix (the caller
// opens it, or passes it to a node's --net).
func (n *Net) TapName() string { return fmt.Sprintf("%st%d", n.prefix, n.taps.Add(1)) }

// IP runs ip with args, within cmdTimeout, and returns its output.
func (n *Net) IP(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// SetClientLink takes the client's veth end on the bridge down or up (a
// cut between the client and every node).
func (n *Net) SetClientLink(up bool) error {
	state := "down"
	if up {
		state = "up"
	}
	_, err := n.IP("link", "set", n.v0, state)
	return err
}

// Close removes what Make made, newest first: the veth pair, the
// namespace and the bridge (errors are ignored: Close is best effort and
// may run twice). TAP devices on the bridge belong to the processes that
// opened them.
func (n *Net) Close() {
	for i := len(n.undo) - 1; i >= 0; i-- {
		n.IP(n.undo[i]...)
	}
	n.undo = nil
}

// DialUDP opens a UDP socket inside the client namespace, connected to
// raddr. A socket belongs to the namespace of the thread that makes it,
// so it is made on a locked thread moved into the namespace and back (a
// thread that cannot move back ends with its goroutine, never reused).
func (n *Net) DialUDP(raddr string) (*net.UDPConn, error) {
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
			return
		}
		defer unix.Close(orig)
		nsfd, err := unix.Open("/run/netns/"+n.NS, unix.O_RDONLY|unix.O_CLOEXEC, 0)
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
		return nil, fmt.Errorf("socket in namespace %s: %w", n.NS, r.err)
	}
	return r.c, nil
}
