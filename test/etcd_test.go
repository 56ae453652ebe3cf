package test

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
	"github.com/tandemvm/tandem/internal/etcdlab"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/test/linkproxy"
)

// End-to-end tests of a pair coordinated through etcd (issue 15): real
// tandem processes (a primary and a secondary, no witness) on a real
// 3-member etcd cluster that the test runs in its own process
// (internal/etcdlab), killed with SIGKILL.

// startEtcdLab runs a 3-member etcd for the test: 50 ms ticks and a
// 500 ms election timeout, so the cluster starts and settles fast.
func startEtcdLab(t *testing.T) *etcdlab.Cluster {
	t.Helper()
	return startEtcdLabTimed(t, 50, 500)
}

// startEtcdLabTimed is startEtcdLab with etcd's tick and election
// timeout (0, 0: etcd's defaults, 100 ms and 1 s).
func startEtcdLabTimed(t *testing.T, tickMs, electionMs uint) *etcdlab.Cluster {
	t.Helper()
	c, err := etcdlab.Start(etcdlab.Config{Members: 3, Dir: t.TempDir(), TickMs: tickMs, ElectionMs: electionMs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// newEtcdPair is the harness's trio in etcd mode: a (primary) and b
// (secondary) on endpoints, under cluster name.
func newEtcdPair(t *testing.T, kind, endpoints, name string) *testTrio {
	return newEtcdPairSized(t, kind, endpoints, name, "64MiB")
}

// newEtcdPairSized is newEtcdPair with a guest of memory.
func newEtcdPairSized(t *testing.T, kind, endpoints, name, memory string) *testTrio {
	base := t.TempDir()
	et, err := e2e.NewTrio(e2e.TrioConfig{Bin: tandemBin, Dir: base, LogDir: filepath.Join(base, "logs"), Guest: kind,
		Memory: memory, Etcd: endpoints, Cluster: name})
	if err != nil {
		t.Fatal(err)
	}
	tr := &testTrio{Trio: et, t: t, kind: kind, m: map[string]*trioMember{}, order: []string{"a", "b"}}
	for _, n := range et.Nodes() {
		tr.m[n.ID] = &trioMember{Node: n}
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(et.LogTails(40))
		}
	})
	return tr
}

// TestEtcdFailoverKillPrimary: kill -9 the primary under kv load; the
// secondary takes the etcd lease once the primary's ran out, serves with
// every acknowledged write, and the old primary restarted with the same
// command re-protects it.
func TestEtcdFailoverKillPrimary(t *testing.T) {
	ec := startEtcdLab(t)
	tr := newEtcdPair(t, "synth", strings.Join(ec.Endpoints(), ","), "g1")
	tr.startAll()
	tr.waitProtected("a", "b", 30*time.Second)
	lg, stop, done := tr.startLoad("a", "w1")
	waitAcks(t, lg, 20, 30*time.Second)
	killAt := time.Now()
	tr.m["a"].n.kill()
	<-done
	close(stop)
	rto := tr.serveWithin("b", 15*time.Second)
	st := tr.waitMember("b", 5*time.Second, "primary", func(s trioStatus) bool { return s.Role == "primary" && e2e.Cluster(s).Primary == "b" })
	t.Logf("etcd: b primary at generation %d; first reply %v after the kill (%v since); %d acknowledged writes",
		e2e.Cluster(st).Generation, rto.Round(time.Millisecond), time.Since(killAt).Round(time.Millisecond), len(lg.acked))
	if g := e2e.Cluster(st).Generation; g < 2 {
		t.Errorf("generation %d after a failover, want >= 2", g)
	}
	checkAcked(t, tr.m["b"].n, lg)
	if g, err := metricValue(tr.m["b"].API, "tandem_generation"); err != nil || g < 2 {
		t.Errorf("b's tandem_generation metric %v (err %v), want >= 2", g, err)
	}
	tr.start("a")
	tr.waitProtected("b", "a", 30*time.Second)
}

// TestEtcdSecondaryRestartReprotects: kill -9 the secondary; the primary
// goes on unprotected, and the secondary restarted with its command is
// found through etcd and protects it again. Everything runs over mutual
// TLS on one CA: the data and API channels, and etcd's client port (the
// nodes' --tls-* files are their etcd client identity).
func TestEtcdSecondaryRestartReprotects(t *testing.T) {
	pki := newPKI(t, "a", "b", "etcd", operator)
	ec, err := etcdlab.Start(etcdlab.Config{Members: 3, Dir: t.TempDir(), TickMs: 50, ElectionMs: 500,
		TLS: &etcdlab.TLSFiles{CA: filepath.Join(pki.dir, trust.CAFile),
			Cert: filepath.Join(pki.dir, trust.CertFile("etcd")), Key: filepath.Join(pki.dir, trust.KeyFile("etcd"))}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ec.Close)
	if !strings.HasPrefix(ec.Endpoints()[0], "https://") {
		t.Fatalf("etcd endpoints %v: want https", ec.Endpoints())
	}
	tr := newEtcdPair(t, "synth", strings.Join(ec.Endpoints(), ","), "g1")
	tr.pki = pki
	tr.startAll()
	tr.waitProtected("a", "b", 30*time.Second)
	tr.m["b"].n.kill()
	tr.waitMember("a", 10*time.Second, "unprotected primary", func(s trioStatus) bool {
		return s.Role == "primary" && !e2e.Cluster(s).Protected
	})
	tr.start("b")
	st := tr.waitProtected("a", "b", 30*time.Second)
	if g := e2e.Cluster(st).Generation; g != 1 {
		t.Errorf("generation %d after the secondary's restart, want 1 (no failover)", g)
	}
	// The status's nodes are the record's two members.
	var roles []string
	for _, nv := range st.Nodes {
		roles = append(roles, nv.ID+"="+nv.Role)
	}
	if got := strings.Join(roles, ","); got != "a=primary,b=secondary" {
		t.Errorf("status nodes %s, want a=primary,b=secondary", got)
	}
}

// TestEtcdLeaderKillNoFailover: stopping the etcd cluster's leader (one of
// three members) fails nothing over: a stays the protected primary at its
// generation, b never becomes primary. etcd runs at its default timings
// (1 s election timeout) and the nodes with the default --etcd-lease.
func TestEtcdLeaderKillNoFailover(t *testing.T) {
	ec := startEtcdLabTimed(t, 0, 0)
	tr := newEtcdPair(t, "synth", strings.Join(ec.Endpoints(), ","), "g1")
	tr.startAll()
	before := tr.waitProtected("a", "b", 30*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	leader, err := ec.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Kill stops the member's raft at once, then drains its client
	// connections for seconds: watch from the moment it starts.
	killed := make(chan struct{})
	go func() { defer close(killed); leader.Kill() }()
	defer func() { <-killed }()
	end := time.Now().Add(7 * time.Second) // longer than the 5 s lease: a failover would show
	for time.Now().Before(end) {
		if st, err := trioStat(tr.m["b"].API); err == nil && st.Role == "primary" {
			t.Fatalf("b became primary after the etcd leader %s stopped", leader.Name)
		}
		time.Sleep(50 * time.Millisecond)
	}
	st := tr.waitProtected("a", "b", 10*time.Second)
	if g0, g := e2e.Cluster(before).Generation, e2e.Cluster(st).Generation; g != g0 {
		t.Errorf("generation %d -> %d across an etcd leader change: a was fenced", g0, g)
	}
}

// TestEtcdPartitionedPrimaryFences: cut the primary off from etcd only
// (its data link to the secondary stays): it stops answering before its
// lease can run out at etcd, the secondary then takes over, and every
// write the primary acknowledged is on the secondary: no reply was
// released by both.
func TestEtcdPartitionedPrimaryFences(t *testing.T) {
	ec := startEtcdLab(t)
	var viaProxy []string
	var proxies []*linkproxy.Proxy
	for _, e := range ec.Endpoints() {
		u, _ := url.Parse(e)
		px, err := linkproxy.Start("127.0.0.1:0", u.Host, linkproxy.Shape{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { px.Close() })
		proxies = append(proxies, px)
		viaProxy = append(viaProxy, "http://"+px.Addr())
	}
	tr := newEtcdPair(t, "synth", strings.Join(ec.Endpoints(), ","), "g1")
	tr.m["a"].Extra = []string{"--etcd-endpoints", strings.Join(viaProxy, ",")} // the last flag wins
	tr.startAll()
	tr.waitProtected("a", "b", 30*time.Second)
	lg, stop, done := tr.startLoad("a", "w1")
	waitAcks(t, lg, 20, 30*time.Second)
	cut := time.Now()
	for _, px := range proxies {
		px.Partition(true)
	}
	<-done // a stops answering: fenced
	silent := time.Since(cut)
	close(stop)
	st := tr.waitMember("b", 15*time.Second, "primary", func(s trioStatus) bool { return s.Role == "primary" && e2e.Cluster(s).Primary == "b" })
	promoted := time.Since(cut)
	t.Logf("a silent %v after the cut, b primary at generation %d after %v; %d acknowledged writes",
		silent.Round(time.Millisecond), e2e.Cluster(st).Generation, promoted.Round(time.Millisecond), len(lg.acked))
	checkAcked(t, tr.m["b"].n, lg)
	fenced := tr.waitMember("a", 10*time.Second, "fenced", func(s trioStatus) bool { return s.Role != "primary" || !e2e.Cluster(s).CanRelease })
	if e2e.Cluster(fenced).CanRelease {
		t.Fatal("a can still release after b's promotion")
	}
}

// TestEtcdUnreachableAtStart: a primary whose etcd endpoints do not
// answer logs one line naming them and keeps retrying; it never boots or
// serves the guest: no port of it listens before it joined.
func TestEtcdUnreachableAtStart(t *testing.T) {
	dead := "http://" + freeAddr(t)
	api := freeAddr(t)
	n := startProc(t, "unreachable", "primary", "--coordinator", "etcd", "--etcd-endpoints", dead, "--cluster", "g1",
		"--id", "a", "--data", freeAddr(t), "--data-dir", filepath.Join(t.TempDir(), "a"), "--api", api, "--console", freeAddr(t),
		"--guest", "synth", "--memory", "16MiB", "--workload", "kv")
	t0 := time.Now()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(n.log(), "etcd unreachable") {
		if time.Now().After(deadline) || !n.running() {
			t.Fatalf("no 'etcd unreachable' line after 10 s (running %v):\n%s", n.running(), n.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("'etcd unreachable' logged %v after the start", time.Since(t0).Round(time.Millisecond))
	time.Sleep(time.Second)
	if !n.running() {
		t.Fatalf("exited instead of retrying:\n%s", n.log())
	}
	if got := strings.Count(n.log(), "etcd unreachable"); got != 1 || !strings.Contains(n.log(), dead) {
		t.Errorf("%d 'etcd unreachable' lines (want 1, naming %s):\n%s", got, dead, n.log())
	}
	if _, err := trioStat(api); err == nil {
		t.Error("the API answers before the node joined etcd")
	}
	if c, err := dialAddr(api, time.Second); err == nil {
		c.Close()
		t.Error("the API port listens before the node joined etcd")
	}
	n.kill()
}

// metricValue is the value of the unlabelled metric name in the node's
// GET /metrics.
func metricValue(api, name string) (float64, error) {
	base, hc := apiClient(api)
	resp, err := hc.Get(base + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, fmt.Errorf("no %s in GET /metrics", name)
}
