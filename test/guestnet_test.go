package test

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/netlab"
)

// The guest on a real network: a raft trio of real processes whose
// nodes' TAP devices sit on one bridge with a client namespace. The
// client writes kv over UDP to the guest's address, retrying each
// request with the same id until it is answered; the primary is killed
// with SIGKILL; the secondary takes over and announces the address; the
// client goes on at the same address, and every write it saw
// acknowledged is there. It runs on both guests.
func TestGuestNetworkTrioFailover(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			skipUnlessKind(t, kind)
			guestNetworkTrioFailover(t, kind)
		})
	}
}

func guestNetworkTrioFailover(t *testing.T, kind string) {
	l := netlab.New(t)
	tr := newTestTrio(t, kind)
	tr.m["a"].Extra = []string{"--guest-ip", "10.77.0.10/24", "--net", "tap:" + l.TapName() + ",bridge=" + l.Bridge}
	tr.m["b"].Extra = []string{"--net", "tap:" + l.TapName() + ",bridge=" + l.Bridge}
	tr.startAll()
	tr.waitProtected("a", "b", 30*time.Second)

	c := l.DialUDP("10.77.0.10:7000")
	w := &udpWriter{c: c}
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- w.run(stop) }()
	waitAcked := func(n int, within time.Duration) {
		t.Helper()
		deadline := time.Now().Add(within)
		for w.ackedCount() < n {
			if time.Now().After(deadline) {
				close(stop)
				t.Fatalf("%d writes acknowledged after %v, want %d (last error %v)", w.ackedCount(), within, n, w.lastErr())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitAcked(100, 20*time.Second)
	before := w.ackedCount()
	killed := time.Now()
	tr.m["a"].n.kill()
	waitAcked(before+1, 20*time.Second)
	rto := w.firstAckAfter(killed).Sub(killed)
	waitAcked(before+100, 20*time.Second)
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	tr.waitMember("b", 10*time.Second, "primary", func(s trioStatus) bool { return s.Role == "primary" })

	// Every acknowledged write is in the guest that runs now.
	r := &udpWriter{c: c, client: "check"}
	lost := 0
	for _, k := range w.ackedKeys() {
		got, err := r.do(fmt.Sprintf("GET %s", k), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got != "OK v"+strings.TrimPrefix(k, "k") {
			lost++
			t.Errorf("acknowledged write %s: now %q", k, got)
		}
	}
	t.Logf("%d writes acknowledged over UDP (%d before the kill), 0 of them lost (%d checked); first reply at the same address %v after SIGKILL", w.ackedCount(), before, len(w.ackedKeys())-lost, rto)
}

// udpWriter is a kv client over UDP: one request per datagram, each
// retried with the same <client>:<seq> until its reply comes.
type udpWriter struct {
	c      *net.UDPConn
	client string // "" means "w"
	seq    int

	mu    sync.Mutex
	acked []string    // keys written and acknowledged, in order
	at    []time.Time // when each was acknowledged
	err   error
}

// do sends one request and waits (retrying every 50 ms) for its reply,
// returned without the id.
func (w *udpWriter) do(req string, within time.Duration) (string, error) {
	w.seq++
	client := w.client
	if client == "" {
		client = "w"
	}
	id := fmt.Sprintf("%s:%d", client, w.seq)
	msg := []byte(id + " " + req)
	buf := make([]byte, 2048)
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if _, err := w.c.Write(msg); err != nil {
			return "", err
		}
		w.c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		for {
			n, err := w.c.Read(buf)
			if err != nil {
				break // timeout (or ICMP refusal while nobody has the address): retry
			}
			if rest, ok := strings.CutPrefix(string(buf[:n]), id+" "); ok {
				return strings.TrimSuffix(rest, "\n"), nil
			}
		}
	}
	return "", fmt.Errorf("no reply to %s %s within %v", id, req, within)
}

func (w *udpWriter) run(stop chan struct{}) error {
	for i := 1; ; i++ {
		select {
		case <-stop:
			return nil
		default:
		}
		k := fmt.Sprintf("k%d", i)
		got, err := w.do(fmt.Sprintf("SET %s v%d", k, i), 20*time.Second)
		if err != nil {
			w.mu.Lock()
			w.err = err
			w.mu.Unlock()
			return err
		}
		if got != "OK" {
			return fmt.Errorf("SET %s: %q", k, got)
		}
		w.mu.Lock()
		w.acked, w.at = append(w.acked, k), append(w.at, time.Now())
		w.mu.Unlock()
	}
}

func (w *udpWriter) ackedCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.acked)
}

func (w *udpWriter) ackedKeys() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.acked...)
}

func (w *udpWriter) lastErr() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// firstAckAfter is when the first write acknowledged after t was.
func (w *udpWriter) firstAckAfter(t time.Time) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, a := range w.at {
		if a.After(t) {
			return a
		}
	}
	return time.Time{}
}
