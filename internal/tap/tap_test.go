package tap

import (
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest/netframe"
	"github.com/tandemvm/tandem/internal/netlab"
)

func TestParseSpec(t *testing.T) {
	good := map[string]Spec{
		"tap:t0":                       {Name: "t0"},
		"tap:tdm-a,bridge=br0":         {Name: "tdm-a", Bridge: "br0"},
		"tap:fifteen_chars_x,bridge=b": {Name: "fifteen_chars_x", Bridge: "b"},
	}
	for in, want := range good {
		if got, err := ParseSpec(in); err != nil || got != want {
			t.Errorf("ParseSpec(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "t0", "tun:t0", "tap:", "tap:sixteen_chars_xx", "tap:a/b", "tap:t0,br=x", "tap:t0,bridge=", "tap:t0,bridge=a,b", "tap:t0,bridge=a b"} {
		if _, err := ParseSpec(in); err == nil || strings.Contains(err.Error(), "\n") {
			t.Errorf("ParseSpec(%q): err %v, want one line", in, err)
		}
	}
}

// serve runs ep behind dev until stop is closed: ARP answered, every
// datagram echoed back with "echo:" in front.
func serve(dev *Device, ep *netframe.Endpoint, stop chan struct{}, wg *sync.WaitGroup, mu *sync.Mutex) {
	defer wg.Done()
	buf := make([]byte, 2048)
	for {
		select {
		case <-stop:
			return
		default:
		}
		n, err := dev.ReadFrame(buf, time.Now().Add(50*time.Millisecond))
		if err != nil {
			continue
		}
		mu.Lock()
		out, data, from, ok := ep.Input(buf[:n], nil)
		if ok && data != nil {
			out, _ = ep.Reply(nil, from, append([]byte("echo:"), data...))
		}
		mu.Unlock()
		if out != nil {
			dev.WriteFrame(out, time.Now().Add(time.Second))
		}
	}
}

// roundTrip sends msg until a reply comes (ARP may need the first try).
func roundTrip(t *testing.T, c *net.UDPConn, msg string, within time.Duration) (string, time.Duration) {
	t.Helper()
	t0 := time.Now()
	buf := make([]byte, 2048)
	for time.Since(t0) < within {
		c.Write([]byte(msg))
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if n, err := c.Read(buf); err == nil {
			return string(buf[:n]), time.Since(t0)
		}
	}
	t.Fatalf("no reply to %q within %v", msg, within)
	return "", 0
}

// The kernel, on the other side of a real bridge, resolves the guest's
// address by ARP, sends it UDP, and accepts its replies (so their
// checksums are right); a second device announcing the same address
// with another MAC takes the address over at once.
func TestTapAgainstKernel(t *testing.T) {
	l := netlab.New(t)
	guestIP := netframe.IPv4{10, 77, 0, 10}
	c := l.DialUDP("10.77.0.10:7000")

	var mu sync.Mutex
	run := func(name string, mac netframe.MAC) (*netframe.Endpoint, func()) {
		dev, err := Open(Spec{Name: name, Bridge: l.Bridge})
		if err != nil {
			t.Fatal(err)
		}
		ep := &netframe.Endpoint{MAC: mac, IP: guestIP, Port: 7000}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go serve(dev, ep, stop, &wg, &mu)
		mu.Lock()
		g := ep.Announce(nil)
		mu.Unlock()
		if err := dev.WriteFrame(g, time.Now().Add(time.Second)); err != nil {
			t.Fatal(err)
		}
		return ep, func() { close(stop); wg.Wait(); dev.Close() }
	}

	macA := netframe.MAC{0x52, 0x54, 0, 0, 0, 0x0a}
	a, stopA := run(l.TapName(), macA)
	got, took := roundTrip(t, c, "c:1 GET k", 5*time.Second)
	if got != "echo:c:1 GET k" {
		t.Fatalf("reply %q", got)
	}
	mu.Lock()
	ca := a.Counters
	mu.Unlock()
	if ca.ARPReplies == 0 || ca.Datagrams == 0 {
		t.Fatalf("device A counters %+v: the kernel reached it without ARP or UDP?", ca)
	}
	t.Logf("first reply from A after %v (counters %+v)", took, ca)
	stopA()

	// The address moves: B has another MAC and announces the address.
	macB := netframe.MAC{0x52, 0x54, 0, 0, 0, 0x0b}
	b, stopB := run(l.TapName(), macB)
	defer stopB()
	got, took = roundTrip(t, c, "c:2 GET k", 5*time.Second)
	if got != "echo:c:2 GET k" {
		t.Fatalf("reply after the move %q", got)
	}
	neigh := l.IP("-n", l.NS, "neigh", "show", "10.77.0.10")
	if !strings.Contains(neigh, macB.String()) {
		t.Fatalf("client's neighbour entry after the announce: %q, want %s", neigh, macB)
	}
	mu.Lock()
	cb := b.Counters
	mu.Unlock()
	t.Logf("first reply from B after %v (counters %+v; neighbour %s)", took, cb, strings.TrimSpace(neigh))
	if took > time.Second {
		t.Errorf("the address took %v to move; a gratuitous ARP should make it immediate", took)
	}
}

func TestOpenRefusals(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	_, err := Open(Spec{Name: "tdtnobr0", Bridge: "tdt-no-such"})
	if err == nil || !strings.Contains(err.Error(), "bridge tdt-no-such") {
		t.Fatalf("missing bridge: %v", err)
	}
	if _, err := net.InterfaceByName("tdtnobr0"); err == nil {
		t.Fatalf("a refused Open left the device behind")
	}
}

// A device already in another bridge is refused, not taken as attached.
func TestOpenRefusesDeviceOfAnotherBridge(t *testing.T) {
	l := netlab.New(t)
	other := l.TapName() + "b"
	l.IP("link", "add", other, "type", "bridge")
	t.Cleanup(func() { exec.Command("ip", "link", "del", other).Run() })
	name := l.TapName()
	l.IP("tuntap", "add", "dev", name, "mode", "tap") // persistent, no fd holds it
	t.Cleanup(func() { exec.Command("ip", "link", "del", name).Run() })
	l.IP("link", "set", name, "master", other)
	if d, err := Open(Spec{Name: name, Bridge: l.Bridge}); err == nil {
		d.Close()
		t.Fatalf("a device in bridge %s was opened for bridge %s", other, l.Bridge)
	}
	d, err := Open(Spec{Name: name, Bridge: other}) // its own bridge: fine
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}
