package test

import (
	"cmp"
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
	forEachKind(t, func(t *testing.T, kind string) {
		l, tr := netTrio(t, kind)
		tr.startAll()
		tr.waitProtected("a", "b", 30*time.Second)

		c := l.DialUDP(guestNetAddr + ":7000")
		ld := startUDPLoad(t, c, 0)
		ld.waitAcked(100, 20*time.Second)
		// Kill a protected primary: a stall of this shared machine can
		// expire a's lease, and a primary that came back unprotected
		// acknowledges writes no secondary has (a double failure when it
		// dies then, not this test's case). Checked just before the kill.
		tr.waitProtected("a", "b", 20*time.Second)
		before := ld.ackedCount()
		killed := time.Now()
		tr.m["a"].n.kill()
		ld.waitAcked(before+1, 20*time.Second)
		rto := ld.firstAckAfter(killed).Sub(killed)
		ld.waitAcked(before+100, 20*time.Second)
		ld.finish()
		tr.waitMember("b", 10*time.Second, "primary", func(s trioStatus) bool { return s.Role == "primary" })

		lost := checkUDPAcked(t, c, ld.udpWriter, "check")
		t.Logf("%s: %d writes acknowledged over UDP (%d before the kill), %d lost; first reply at the same address %v after SIGKILL", kind, ld.ackedCount(), before, lost, rto)
	})
}

// guestNetAddr is the guest's address on a test's lab network.
const guestNetAddr = "10.77.0.10"

// netTrio is a test trio on a fresh lab network: a boots the guest with
// its card at guestNetAddr, and a and b each have a TAP of their own on
// the lab's bridge.
func netTrio(t *testing.T, kind string) (*netlab.Lab, *testTrio) {
	l := netlab.New(t)
	tr := newTestTrio(t, kind)
	tr.m["a"].Extra = []string{"--guest-ip", guestNetAddr + "/24", "--net", "tap:" + l.TapName() + ",bridge=" + l.Bridge}
	tr.m["b"].Extra = []string{"--net", "tap:" + l.TapName() + ",bridge=" + l.Bridge}
	return l, tr
}

// udpLoad is a udpWriter writing in the background until finish.
type udpLoad struct {
	*udpWriter
	t    *testing.T
	stop chan struct{}
	done chan error
	once sync.Once
}

// startUDPLoad writes k1, k2, ... over c, each resent with its id every
// retry (0: 50 ms) until answered; the test's cleanup stops it if finish
// was not called.
func startUDPLoad(t *testing.T, c *net.UDPConn, retry time.Duration) *udpLoad {
	ld := &udpLoad{udpWriter: &udpWriter{c: c, retry: retry}, t: t, stop: make(chan struct{}), done: make(chan error, 1)}
	go func() { ld.done <- ld.run(ld.stop) }()
	t.Cleanup(func() { ld.halt() })
	return ld
}

// halt stops the writer and waits for it (its requests give up within
// 20 s) and returns its error.
func (ld *udpLoad) halt() (err error) {
	ld.once.Do(func() {
		close(ld.stop)
		err = <-ld.done
	})
	return err
}

// finish stops the writer and fails the test if it failed.
func (ld *udpLoad) finish() {
	ld.t.Helper()
	if err := ld.halt(); err != nil {
		ld.t.Fatal(err)
	}
}

// waitAcked waits until n writes were acknowledged.
func (ld *udpLoad) waitAcked(n int, within time.Duration) {
	ld.t.Helper()
	deadline := time.Now().Add(within)
	for ld.ackedCount() < n {
		if time.Now().After(deadline) {
			ld.halt()
			ld.t.Fatalf("%d writes acknowledged after %v, want %d (last error %v)", ld.ackedCount(), within, n, ld.lastErr())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkUDPAcked reads back, over c as kv client id, every write w saw
// acknowledged: each must hold the value written. It returns how many
// did not (each an error of t).
func checkUDPAcked(t *testing.T, c *net.UDPConn, w *udpWriter, id string) (lost int) {
	t.Helper()
	r := &udpWriter{c: c, client: id}
	for _, k := range w.ackedKeys() {
		got, err := r.do(fmt.Sprintf("GET %s", k), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got != "OK v"+strings.TrimPrefix(k, "k") {
			lost++
			if lost <= 5 {
				t.Errorf("acknowledged write %s: now %q", k, got)
			}
		}
	}
	if lost > 5 {
		t.Errorf("... %d acknowledged writes lost in all", lost)
	}
	return lost
}

// udpWriter is a kv client over UDP: one request per datagram, each
// retried with the same <client>:<seq> until its reply comes.
type udpWriter struct {
	c      *net.UDPConn
	client string        // "" means "w"
	retry  time.Duration // how long to wait for a reply before resending (0: 50 ms)
	seq    int

	mu    sync.Mutex
	acked []string    // keys written and acknowledged, in order
	at    []time.Time // when each was acknowledged
	err   error
}

// do sends one request and waits (resending every w.retry) for its reply,
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
		w.c.SetReadDeadline(time.Now().Add(cmp.Or(w.retry, 50*time.Millisecond)))
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

// longestGap is the longest wait between two consecutive acknowledgements
// that spans any moment of [from, to]: the last reply before an event and
// the first after it.
func (w *udpWriter) longestGap(from, to time.Time) (last, first time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := 1; i < len(w.at); i++ {
		if w.at[i].Before(from) || w.at[i-1].After(to) {
			continue
		}
		if w.at[i].Sub(w.at[i-1]) > first.Sub(last) {
			last, first = w.at[i-1], w.at[i]
		}
	}
	return last, first
}
