package test

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
)

// A trio on three real (virtual) hosts: each node in a network namespace
// of its own with its own address, joined by veth pairs on a bridge that
// the test makes (and removes), every channel over mutual TLS. The test
// process reaches the nodes over the bridge as the operator. Links are
// cut with `ip link set down`, not by a proxy.

// netLab is the bridge and the namespaces of one test.
type netLab struct {
	t      *testing.T
	prefix string            // interface and namespace name prefix, unique per process
	ip     map[string]string // node ID -> its address
}

// labSeq numbers the labs of one test process (parallel tests make labs
// at once).
var labSeq atomic.Int64

func newNetLab(t *testing.T, ids ...string) *netLab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("iproute2 (ip) not installed")
	}
	seq := labSeq.Add(1)
	// Interface names are at most 15 bytes: "tn" + 5 digits + 1 + "h" + id.
	l := &netLab{t: t, prefix: fmt.Sprintf("tn%05d%d", os.Getpid()%100000, seq%10), ip: map[string]string{}}
	subnet := fmt.Sprintf("10.%d.%d", 100+os.Getpid()%100, seq%250)
	t.Cleanup(l.teardown)
	l.run("ip", "link", "add", l.bridge(), "type", "bridge")
	l.run("ip", "addr", "add", subnet+".254/24", "dev", l.bridge())
	l.run("ip", "link", "set", l.bridge(), "up")
	for i, id := range ids {
		ns, host, peer := l.ns(id), l.prefix+"h"+id, l.prefix+"p"+id
		l.ip[id] = fmt.Sprintf("%s.%d", subnet, i+1)
		l.run("ip", "netns", "add", ns)
		l.run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
		l.run("ip", "link", "set", peer, "netns", ns)
		l.run("ip", "link", "set", host, "master", l.bridge())
		l.run("ip", "link", "set", host, "up")
		l.run("ip", "-n", ns, "addr", "add", l.ip[id]+"/24", "dev", peer)
		l.run("ip", "-n", ns, "link", "set", peer, "up")
		l.run("ip", "-n", ns, "link", "set", "lo", "up")
	}
	return l
}

func (l *netLab) bridge() string      { return l.prefix + "br" }
func (l *netLab) ns(id string) string { return l.prefix + "-" + id }

func (l *netLab) run(args ...string) {
	l.t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		l.t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// setLink brings id's link to the bridge up or down: down, the node can
// reach nobody and nobody it.
func (l *netLab) setLink(id string, up bool) {
	l.t.Helper()
	state := "down"
	if up {
		state = "up"
	}
	l.run("ip", "link", "set", l.prefix+"h"+id, state)
}

// teardown removes the namespaces (their veth ends go with them) and the
// bridge. Processes still running in a namespace were killed by their own
// cleanups, which run before this one (cleanups run last-in first-out).
func (l *netLab) teardown() {
	for id := range l.ip {
		exec.Command("ip", "netns", "del", l.ns(id)).Run()
		exec.Command("ip", "link", "del", l.prefix+"h"+id).Run()
	}
	exec.Command("ip", "link", "del", l.bridge()).Run()
}

// newNetnsTrio is a test trio whose members live in l's namespaces, all
// channels over TLS with pki's certificates.
func newNetnsTrio(t *testing.T, kind string, l *netLab, pki *testPKI) *testTrio {
	addrs := map[string]e2e.Addrs{}
	for _, id := range []string{"a", "b", "w"} {
		ip := l.ip[id]
		addrs[id] = e2e.Addrs{Raft: ip + ":7301", Data: ip + ":7311", API: ip + ":7321", Console: ip + ":7331"}
	}
	tr := newTestTrioAt(t, kind, addrs)
	tr.pki = pki
	for _, id := range []string{"a", "b", "w"} {
		tr.m[id].Netns = l.ns(id)
	}
	return tr
}

// TestNetnsTrio: a TLS trio on three hosts of their own. kill -9 of the
// primary under kv load loses no acknowledged write; then the new
// primary's link is cut with `ip link set down` under load: the other
// two fail over again (the cut node fences itself), nothing acknowledged
// is lost, and the cut node rejoins as secondary when its link is back.
func TestNetnsTrio(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		l := newNetLab(t, "a", "b", "w")
		pki := newPKI(t, "a", "b", "w", operator)
		tr := newNetnsTrio(t, kind, l, pki)
		tr.startAll()
		tr.waitProtected("a", "b", 45*time.Second)

		// 1. kill -9 the primary under load.
		lg, stop, done := tr.startLoad("a", "w1")
		waitAcks(t, lg, 20, 30*time.Second)
		tr.m["a"].n.kill()
		<-done
		close(stop)
		rto := tr.serveWithin("b", 15*time.Second)
		checkAcked(t, tr.m["b"].n, lg)
		t.Logf("%s: kill -9 of a: b served %v later, %d acknowledged writes kept", kind, rto.Round(time.Millisecond), len(lg.acked))
		tr.start("a")
		tr.waitProtected("b", "a", 45*time.Second)

		// 2. Cut the new primary's link under load.
		lg2, stop2, done2 := tr.startLoad("b", "w2")
		waitAcks(t, lg2, 20, 10*time.Second)
		cutAt := time.Now()
		l.setLink("b", false)
		<-done2 // the writer stops at its first failed request
		close(stop2)
		tr.serveWithin("a", 20*time.Second)
		rto = time.Since(cutAt)
		checkAckedAs(t, tr.m["a"].n, lg2, "verify2")
		checkAckedAs(t, tr.m["a"].n, lg, "verify3")
		t.Logf("%s: b's link cut: a served within %v of the cut (the client's 3 s request timeout included), %d acknowledged writes kept", kind, rto.Round(time.Millisecond), len(lg2.acked))

		// 3. The link comes back: b (fenced, its guest kept paused until it
		// sees a newer primary) rejoins as a's secondary.
		l.setLink("b", true)
		tr.waitProtected("a", "b", 45*time.Second)
		c := dialConsole(t, tr.m["a"].n, "after")
		if r := c.do("SET after-heal yes"); r != "OK" {
			t.Fatalf("SET after the heal: %q", r)
		}
	})
}
