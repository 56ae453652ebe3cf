package failover

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
)

// testCluster is a real trio on loopback TCP with bbolt logs in temp dirs.
type testCluster struct {
	t     *testing.T
	peers map[string]string
	dirs  map[string]string
	roles map[string]Role
	// tweak, if set, adjusts every node's config.
	tweak func(*Config)
	mu    sync.Mutex
	nodes map[string]*Node
}

// freeAddrs returns n loopback addresses (e2e.FreeAddr: outside the
// kernel's ephemeral range, never the same twice in this process).
func freeAddrs(t *testing.T, n int) []string {
	t.Helper()
	var out []string
	for range n {
		a, err := e2e.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

func newTestCluster(t *testing.T) *testCluster {
	a := freeAddrs(t, 3)
	c := &testCluster{
		t:     t,
		peers: map[string]string{"p": a[0], "s": a[1], "w": a[2]},
		dirs:  map[string]string{"p": t.TempDir(), "s": t.TempDir(), "w": t.TempDir()},
		roles: map[string]Role{"p": RolePrimary, "s": RoleSecondary, "w": RoleWitness},
		nodes: map[string]*Node{},
	}
	t.Cleanup(func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, n := range c.nodes {
			n.Close()
		}
	})
	return c
}

func (c *testCluster) config(id string) Config {
	cfg := Config{
		ID:          id,
		ClusterID:   "test",
		Role:        c.roles[id],
		Peers:       c.peers,
		DataDir:     c.dirs[id],
		DataTimeout: -1, // tests drive protection explicitly
		Logger:      testLogger(c.t),
	}
	if id != "w" {
		cfg.DataAddr = "127.0.0.1:1" + id
		cfg.APIAddr = "127.0.0.1:2" + id
	}
	if c.tweak != nil {
		c.tweak(&cfg)
	}
	return cfg
}

func testLogger(t *testing.T) *slog.Logger {
	if os.Getenv("FAILOVER_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return nil
}

func (c *testCluster) start(id string) *Node {
	c.t.Helper()
	n, err := Open(c.config(id))
	if err != nil {
		c.t.Fatalf("open %s: %v", id, err)
	}
	if id == "p" && n.State().Generation == 0 {
		n.SetImage(Image{Live: true}) // the booted guest
	}
	// Drain events so the buffer never matters; tests read state instead.
	go func() {
		for range n.Events() {
		}
	}()
	c.mu.Lock()
	c.nodes[id] = n
	c.mu.Unlock()
	return n
}

func (c *testCluster) node(id string) *Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[id]
}

// crash kills a node the way SIGKILL looks from its peers: every
// connection breaks at once and nothing more is sent, no leadership handed
// over.
func (c *testCluster) crash(id string) {
	c.mu.Lock()
	n := c.nodes[id]
	delete(c.nodes, id)
	c.mu.Unlock()
	n.stream.setIsolated(true)
	n.Close()
}

// waitFor polls cond every millisecond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(time.Millisecond)
	}
	return time.Since(start)
}

func activeGen(n *Node) uint64 {
	g, _ := n.Active()
	return g
}

// protect brings the trio to a protected state at epoch e with s holding
// the image, as the data path would.
func protect(t *testing.T, c *testCluster, e uint64) {
	t.Helper()
	p, s := c.node("p"), c.node("s")
	// The driver learns its secondary from the FSM; it cannot protect
	// before the secondary registered.
	waitFor(t, 5*time.Second, "s registered on p", func() bool {
		sec, ok := p.Secondary()
		return ok && sec.ID == "s"
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.SetProtected(ctx, true); err != nil {
		t.Fatal(err)
	}
	s.SetImage(Image{Generation: p.State().Generation, Epoch: e})
	p.ReportEpoch(e)
	waitFor(t, 5*time.Second, "epoch replicated to s", func() bool {
		st := s.State()
		return st.Epoch == e && st.Protected
	})
}

func TestClusterElectsConfiguredPrimary(t *testing.T) {
	c := newTestCluster(t)
	// The secondary and the witness start first and elect one of
	// themselves; they must hand over to p once it is there.
	c.start("s")
	c.start("w")
	waitFor(t, 5*time.Second, "a leader among s and w", func() bool {
		_, ok := c.node("s").Leader()
		return ok
	})
	if g := activeGen(c.node("s")) + activeGen(c.node("w")); g != 0 {
		t.Fatalf("a non-primary activated generation %d", g)
	}
	p := c.start("p")
	waitFor(t, 10*time.Second, "p active", func() bool { return activeGen(p) == 1 })
	if !p.CanRelease(1) || p.CanRelease(2) || p.CanRelease(0) {
		t.Fatal("p's release gate is wrong for generations 0/1/2")
	}
	if c.node("s").CanRelease(1) || c.node("w").CanRelease(1) {
		t.Fatal("a follower may release")
	}
	waitFor(t, 5*time.Second, "all members registered everywhere", func() bool {
		for _, id := range []string{"p", "s", "w"} {
			if len(c.node(id).State().Members) != 3 {
				return false
			}
		}
		return true
	})
	sec, ok := p.Secondary()
	if !ok || sec.ID != "s" || sec.DataAddr != "127.0.0.1:1s" || sec.RaftAddr != c.peers["s"] {
		t.Fatalf("p finds its secondary as %+v, %v", sec, ok)
	}
	waitFor(t, 2*time.Second, "witness sees generation 1", func() bool {
		st := c.node("w").State()
		return st.Primary == "p" && st.Generation == 1 && st.ClusterID == "test"
	})
}

// failoverOnce starts a trio, protects it, kills the primary and returns how
// long until the secondary was active under a higher generation.
func failoverOnce(t *testing.T) (time.Duration, *testCluster) {
	return failoverOn(t, newTestCluster(t))
}

// failoverOn is failoverOnce on the cluster c (not started yet).
func failoverOn(t *testing.T, c *testCluster) (time.Duration, *testCluster) {
	for _, id := range []string{"p", "s", "w"} {
		c.start(id)
	}
	p, s := c.node("p"), c.node("s")
	waitFor(t, 10*time.Second, "p active", func() bool { return activeGen(p) == 1 })
	protect(t, c, 10)

	// A snapshot on disk makes the restarted p rebuild its FSM through
	// Restore rather than only by replaying the log.
	if err := p.raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c.crash("p")
	waitFor(t, 5*time.Second, "s active", func() bool { return activeGen(s) > 1 })
	d := time.Since(start)
	if g := activeGen(s); g != 2 || !s.CanRelease(2) || s.State().Primary != "s" {
		t.Fatalf("after failover: s active gen %d, state %+v", g, s.State())
	}
	return d, c
}

func TestFailoverAfterPrimaryKill(t *testing.T) {
	failoverAndRejoin(t, newTestCluster(t))
}

// failoverAndRejoin kills the primary of c, checks the secondary takes
// over, and restarts the old primary as a follower.
func failoverAndRejoin(t *testing.T, c *testCluster) {
	d, c := failoverOn(t, c)
	t.Logf("leader kill -> secondary primary: %v", d)
	if d > 2*time.Second {
		t.Errorf("failover took %v", d)
	}

	// The old primary restarts with its data dir and rejoins as a
	// follower; it has no guest, so it never claims.
	p := c.start("p")
	p.ClearImage()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "p sees generation 2", func() bool {
		st := p.State()
		return st.Generation == 2 && st.Primary == "s"
	})
	if sec, ok := c.node("s").Secondary(); !ok || sec.ID != "p" {
		t.Fatalf("s's secondary is %+v %v, want p", sec, ok)
	}
	time.Sleep(300 * time.Millisecond)
	if activeGen(p) != 0 || activeGen(c.node("s")) != 2 {
		t.Fatalf("after rejoin: p gen %d, s gen %d", activeGen(p), activeGen(c.node("s")))
	}
}

// TestFailoverTiming measures leader kill -> new primary over
// FAILOVER_RUNS runs (default 3) and logs the distribution.
func TestFailoverTiming(t *testing.T) {
	if testing.Short() {
		t.Skip("timing runs")
	}
	runs := 3
	if v, err := strconv.Atoi(os.Getenv("FAILOVER_RUNS")); err == nil && v > 0 {
		runs = v
	}
	var ds []time.Duration
	for i := range runs {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			d, _ := failoverOnce(t)
			ds = append(ds, d)
		})
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	if len(ds) > 0 {
		t.Logf("failover over %d runs: min %v median %v max %v all %v", len(ds), ds[0], ds[len(ds)/2], ds[len(ds)-1], ds)
		if ds[len(ds)/2] > time.Second {
			t.Errorf("median failover %v exceeds 1s", ds[len(ds)/2])
		}
	}
}

func TestPartitionedPrimaryStopsReleasing(t *testing.T) {
	c := newTestCluster(t)
	for _, id := range []string{"p", "s", "w"} {
		c.start(id)
	}
	p, s := c.node("p"), c.node("s")
	waitFor(t, 10*time.Second, "p active", func() bool { return activeGen(p) == 1 })
	protect(t, c, 5)

	// Watch for two nodes released at once (the invariant), throughout.
	var overlap atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			gp, gs := activeGen(p), activeGen(s)
			if gp != 0 && gs != 0 && p.CanRelease(gp) && s.CanRelease(gs) {
				overlap.Add(1)
			}
			time.Sleep(200 * time.Microsecond)
		}
	}()
	defer func() { close(stop); <-done }()

	lease := p.cfg.LeaderLeaseTimeout
	start := time.Now()
	p.stream.setIsolated(true)
	d := waitFor(t, 2*time.Second, "p's gate closed", func() bool { return !p.CanRelease(1) })
	t.Logf("partition -> CanRelease false: %v (lease %v)", time.Since(start), lease)
	if d > lease+50*time.Millisecond {
		t.Errorf("gate closed %v after the partition, lease is %v", d, lease)
	}
	waitFor(t, time.Second, "p fenced", func() bool { return activeGen(p) == 0 })
	waitFor(t, 5*time.Second, "s active", func() bool { return activeGen(s) == 2 })
	t.Logf("partition -> s primary: %v", time.Since(start))

	// Heal: p comes back as a follower of generation 2 and stays fenced.
	p.stream.setIsolated(false)
	waitFor(t, 5*time.Second, "p catches up", func() bool {
		st := p.State()
		return st.Generation == 2 && st.Primary == "s"
	})
	if p.CanRelease(1) || activeGen(p) != 0 {
		t.Fatal("healed old primary may release")
	}
	if n := overlap.Load(); n != 0 {
		t.Fatalf("two nodes could release at once in %d samples", n)
	}
}

func TestSwitchover(t *testing.T) { switchover(t, newTestCluster(t)) }

func switchover(t *testing.T, c *testCluster) {
	for _, id := range []string{"p", "s", "w"} {
		c.start(id)
	}
	p, s := c.node("p"), c.node("s")
	waitFor(t, 10*time.Second, "p active", func() bool { return activeGen(p) == 1 })
	protect(t, c, 3)
	p.ReportEpoch(4)
	s.SetImage(Image{Generation: 1, Epoch: 4})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.Switchover(ctx, ""); err != nil {
		t.Fatal(err)
	}
	if p.CanRelease(1) {
		t.Fatal("old primary may release after switchover")
	}
	waitFor(t, 5*time.Second, "s active", func() bool { return activeGen(s) == 2 })
	if st := s.State(); st.Epoch != 4 {
		t.Fatalf("final epoch not committed before the switch: %d", st.Epoch)
	}
	if err := c.node("w").Switchover(ctx, "p"); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("switchover on a follower: %v", err)
	}
}

func TestDataDirRefusals(t *testing.T) {
	c := newTestCluster(t)
	n := c.start("p")

	// The same node twice: the lock refuses.
	if _, err := Open(c.config("p")); !errors.Is(err, ErrInUse) {
		t.Fatalf("second open of a live data dir: %v", err)
	}
	c.mu.Lock()
	delete(c.nodes, "p")
	c.mu.Unlock()
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	idFile := filepath.Join(c.dirs["p"], clusterIDFile)
	before, err := os.ReadFile(idFile)
	if err != nil {
		t.Fatal(err)
	}

	other := c.config("p")
	other.ClusterID = "another"
	_, err = Open(other)
	if !errors.Is(err, ErrWrongCluster) {
		t.Fatalf("data dir of another cluster: %v", err)
	}
	t.Logf("refusal reads: %v", err)

	wrongNode := c.config("s")
	wrongNode.DataDir = c.dirs["p"]
	if _, err := Open(wrongNode); !errors.Is(err, ErrWrongNode) {
		t.Fatalf("data dir of another node: %v", err)
	}

	moved := c.config("p")
	moved.Peers = map[string]string{"p": c.peers["p"], "s": c.peers["s"], "x": "127.0.0.1:9"}
	_, err = Open(moved)
	if !errors.Is(err, ErrMembership) {
		t.Fatalf("changed peers: %v", err)
	}
	t.Logf("refusal reads: %v", err)

	after, _ := os.ReadFile(idFile)
	if string(after) != string(before) {
		t.Fatal("a refused open rewrote the cluster id")
	}
	// And the directory still opens with the right config.
	c.start("p")
}

func TestConfigValidation(t *testing.T) {
	peers := map[string]string{"a": "127.0.0.1:1", "b": "127.0.0.1:2", "c": "127.0.0.1:3"}
	for name, cfg := range map[string]Config{
		"no id":        {Role: RolePrimary, Peers: peers, DataDir: "x"},
		"bad role":     {ID: "a", Role: "x", Peers: peers, DataDir: "x"},
		"two peers":    {ID: "a", Role: RolePrimary, Peers: map[string]string{"a": "1", "b": "2"}, DataDir: "x"},
		"not a peer":   {ID: "z", Role: RolePrimary, Peers: peers, DataDir: "x"},
		"addr differs": {ID: "a", RaftAddr: "127.0.0.1:9", Role: RolePrimary, Peers: peers, DataDir: "x"},
		"no dir":       {ID: "a", Role: RolePrimary, Peers: peers},
		"lease > hb":   {ID: "a", Role: RolePrimary, Peers: peers, DataDir: "x", HeartbeatTimeout: 100 * time.Millisecond, LeaderLeaseTimeout: 200 * time.Millisecond},
		"dup addr":     {ID: "a", Role: RolePrimary, Peers: map[string]string{"a": "h:1", "b": "h:1", "c": "h:3"}, DataDir: "x"},
	} {
		if _, err := Open(cfg); !errors.Is(err, ErrConfig) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestRegistrationRefusesForeignCluster(t *testing.T) {
	c := newTestCluster(t)
	for _, id := range []string{"p", "s", "w"} {
		c.start(id)
	}
	p := c.node("p")
	waitFor(t, 10*time.Second, "p active", func() bool { return activeGen(p) == 1 })
	reply := p.handleRegister(registerRequest{ClusterID: "other", Info: NodeInfo{ID: "s", Role: RoleSecondary, RaftAddr: c.peers["s"]}})
	if reply.Err == "" {
		t.Fatal("leader accepted a registration from another cluster")
	}
	reply = p.handleRegister(registerRequest{ClusterID: "test", Info: NodeInfo{ID: "s", Role: RoleSecondary, RaftAddr: "127.0.0.1:9"}})
	if reply.Err == "" {
		t.Fatal("leader accepted node id s at a second address")
	}
	t.Logf("refusals: %s", reply.Err)
}

func TestStaleDataHeartbeatUnprotects(t *testing.T) {
	c := newTestCluster(t)
	c.tweak = func(cfg *Config) { cfg.DataTimeout = 150 * time.Millisecond }
	for _, id := range []string{"p", "s", "w"} {
		c.start(id)
	}
	p := c.node("p")
	waitFor(t, 10*time.Second, "p active", func() bool { return activeGen(p) == 1 })
	waitFor(t, 5*time.Second, "s registered on p", func() bool { _, ok := p.Secondary(); return ok })
	// Heartbeats keep the trio protected...
	stop := make(chan struct{})
	beats := make(chan struct{})
	go func() {
		defer close(beats)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
				p.DataHeartbeat()
			}
		}
	}()
	p.DataHeartbeat()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.SetProtected(ctx, true); err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond)
	if !p.State().Protected {
		t.Fatal("unprotected despite heartbeats")
	}
	// ...and their absence unprotects it.
	close(stop)
	<-beats
	d := waitFor(t, 3*time.Second, "unprotected", func() bool { return !p.State().Protected })
	t.Logf("heartbeats stopped -> unprotected: %v (timeout 150ms)", d)
	if err := c.node("s").SetProtected(ctx, true); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("SetProtected on a follower: %v", err)
	}
}

func TestWitnessLeaderHandsOver(t *testing.T) { witnessHandsOver(t, newTestCluster(t)) }

func witnessHandsOver(t *testing.T, c *testCluster) {
	for _, id := range []string{"p", "s", "w"} {
		c.start(id)
	}
	p, s, w := c.node("p"), c.node("s"), c.node("w")
	waitFor(t, 10*time.Second, "p active", func() bool { return activeGen(p) == 1 })
	protect(t, c, 7)

	// Force the witness into leadership, as an election could.
	p.transferring.Add(1)
	start := time.Now()
	if err := p.transferLeadership(NodeInfo{ID: "w", RaftAddr: c.peers["w"]}); err != nil {
		t.Fatal(err)
	}
	p.transferring.Add(-1)
	waitFor(t, 5*time.Second, "s active", func() bool { return activeGen(s) == 2 })
	t.Logf("witness leadership -> s primary: %v", time.Since(start))
	if activeGen(w) != 0 || w.CanRelease(1) || w.CanRelease(2) || p.CanRelease(1) {
		t.Fatal("witness or old primary may release")
	}
}

func TestParsePeers(t *testing.T) {
	p, err := ParsePeers("a=127.0.0.1:1, b=127.0.0.1:2,c=[::1]:3")
	if err != nil || len(p) != 3 || p["b"] != "127.0.0.1:2" || p["c"] != "[::1]:3" {
		t.Fatalf("ParsePeers: %v, %v", p, err)
	}
	for bad, want := range map[string]string{
		"a=127.0.0.1:1,b=127.0.0.1:2":               "2 voters",
		"a=127.0.0.1:1,a=127.0.0.1:2,c=127.0.0.1:3": "appears twice",
		"a=127.0.0.1,b=127.0.0.1:2,c=127.0.0.1:3":   "want HOST:PORT",
		"127.0.0.1:1,b=127.0.0.1:2,c=127.0.0.1:3":   "want ID=HOST:PORT",
	} {
		if _, err := ParsePeers(bad); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParsePeers(%q): %v, want %q", bad, err, want)
		}
	}
}

// A follower restarted after its peers failed to reach it for seconds
// gets raft's log (and thus its part) at once: the leader's replication
// to it, which raft backs off to seconds between attempts after a few
// seconds of failures, waits for it to be heard again instead
// (transport.AppendEntries). Before, WaitSynced on the restarted node
// took as long as the leader's back-off (issue 20: 2.7 to 12 s from a
// restart to protected, "waiting for the cluster" logged meanwhile).
func TestRestartedFollowerSyncsAtOnce(t *testing.T) {
	c := newTestCluster(t)
	_, c = failoverOn(t, c) // p crashed; s is leader and primary
	// 6 s of failures: raft's back-off to p is past 2.5 s by then.
	time.Sleep(6 * time.Second)
	p := c.start("p")
	p.ClearImage()
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	d := time.Since(t0)
	t.Logf("restarted after 6s down: synced in %v", d)
	if d > 1500*time.Millisecond {
		t.Errorf("a follower restarted after 6 s down synced in %v, want well under a second (%s)", d, p.SyncState())
	}
	if st := p.State(); st.Primary != "s" {
		t.Errorf("synced state names primary %q, want s", st.Primary)
	}
}

// A whole cluster restarted after a snapshot, with no command after it:
// the commands raft keeps behind the snapshot (TrailingLogs) are never
// applied again, and WaitSynced must count them as the restored state's,
// not wait for them forever.
func TestWaitSyncedAfterSnapshotRestart(t *testing.T) {
	c := newTestCluster(t)
	for _, id := range []string{"p", "s", "w"} {
		c.start(id)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, id := range []string{"p", "s", "w"} {
		if err := c.node(id).WaitSynced(ctx); err != nil {
			t.Fatalf("%s: %v", id, err)
		}
	}
	// Every node must have applied the claim before it snapshots: a
	// follower that had not applied it yet could have nothing new since
	// its last snapshot, and raft then refuses ("nothing new to
	// snapshot"; seen once in make test).
	for _, id := range []string{"p", "s", "w"} {
		waitFor(t, 10*time.Second, id+" applied the primary", func() bool { return c.node(id).State().Primary == "p" })
	}
	for _, id := range []string{"p", "s", "w"} {
		if err := c.node(id).raft.Snapshot().Error(); err != nil {
			t.Fatalf("snapshot %s: %v", id, err)
		}
	}
	for _, id := range []string{"p", "s", "w"} {
		c.crash(id)
	}
	for _, id := range []string{"p", "s", "w"} {
		c.start(id)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel2()
	for _, id := range []string{"p", "s", "w"} {
		if err := c.node(id).WaitSynced(ctx2); err != nil {
			t.Fatalf("%s after the restart: %v (%s)", id, err, c.node(id).SyncState())
		}
	}
}
