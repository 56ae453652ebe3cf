package ft

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/e2e"
	"github.com/tandemvm/tandem/internal/failpoint"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/internal/vfs"
	"github.com/tandemvm/tandem/replica"
)

// The driver-level crash sweep (issue 12, items 5 and 7): a raft trio in
// one process (witness w, primary a, secondary b) over real TCP on
// 127.0.0.1, synth kv guests with a disk, kv clients recording every
// operation. b's data dir and disk copy are on a vfs.MemFS: its host
// loses power at a failpoint (unsynced data dropped or torn), and b is
// restarted on what survived. raft.db stays on the real file system
// (raft-boltdb cannot go through internal/vfs; it fsyncs its commits).
//
// TANDEM_CRASH_SWEEP=full runs every row; without it a representative
// subset runs (the full sweep takes minutes under -race).

// sweepFull says whether every row runs.
func sweepFull() bool { return os.Getenv("TANDEM_CRASH_SWEEP") == "full" }

// errHostDown is what the file system of a host that lost power answers.
var errHostDown = errors.New("the host has lost power")

// hostFS is one boot of a host's file system: the MemFS until the host
// loses power, then nothing (the process that was running is dead; in
// process it runs on for a moment and must not write again). A restart
// makes a new hostFS on the same MemFS.
type hostFS struct {
	*vfs.MemFS
	dead atomic.Bool
}

func (h *hostFS) check() error {
	if h.dead.Load() {
		return errHostDown
	}
	return nil
}

func (h *hostFS) Create(name string, perm fs.FileMode) (vfs.File, error) {
	if err := h.check(); err != nil {
		return nil, err
	}
	return h.MemFS.Create(name, perm)
}
func (h *hostFS) Open(name string) (vfs.File, error) {
	if err := h.check(); err != nil {
		return nil, err
	}
	return h.MemFS.Open(name)
}
func (h *hostFS) OpenFile(name string, flag int, perm fs.FileMode) (vfs.File, error) {
	if err := h.check(); err != nil {
		return nil, err
	}
	return h.MemFS.OpenFile(name, flag, perm)
}
func (h *hostFS) Rename(o, n string) error {
	if err := h.check(); err != nil {
		return err
	}
	return h.MemFS.Rename(o, n)
}
func (h *hostFS) Remove(name string) error {
	if err := h.check(); err != nil {
		return err
	}
	return h.MemFS.Remove(name)
}
func (h *hostFS) MkdirAll(dir string, perm fs.FileMode) error {
	if err := h.check(); err != nil {
		return err
	}
	return h.MemFS.MkdirAll(dir, perm)
}
func (h *hostFS) SyncDir(dir string) error {
	if err := h.check(); err != nil {
		return err
	}
	return h.MemFS.SyncDir(dir)
}
func (h *hostFS) Chmod(name string, mode fs.FileMode) error {
	if err := h.check(); err != nil {
		return err
	}
	return h.MemFS.Chmod(name, mode)
}

// killListener is a data port whose connections all die at once (kill):
// a host without power sends nothing more.
type killListener struct {
	net.Listener
	mu    sync.Mutex
	conns []net.Conn
	dead  bool
}

func (l *killListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.dead {
		c.Close()
		return nil, net.ErrClosed
	}
	l.conns = append(l.conns, c)
	return c, nil
}

func (l *killListener) kill() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.dead = true
	l.Listener.Close()
	for _, c := range l.conns {
		c.Close()
	}
}

// sweepNode is one member of the trio: its node, raft node, driver and
// data port, and the fixed addresses a restart takes again.
type sweepNode struct {
	id                    string
	raftDir               string
	raftFS                vfs.FS // holds raftDir's identity files (nil: the OS)
	dataAddr, consoleAddr string
	m                     *Member
	n                     *Node
	c                     *RaftCoordinator
	ln                    *killListener
	host                  *hostFS // b's file system this boot (nil: a)
	stopped               bool
}

// sweepCluster is the trio of one row.
type sweepCluster struct {
	t     *testing.T
	peers map[string]string
	w     *failover.Node
	a, b  *sweepNode
	mem   *vfs.MemFS // b's disks
	boots *bootCounter
	disk  string // a's disk file
}

// sweepHeartbeat is the trio's raft heartbeat and election timeout (the
// lease is half): longer than the default, so a loaded machine running
// the race detector does not fence a healthy primary every few seconds
// (a fence is not what the sweep tests; it still happens, and is fine).
const sweepHeartbeat = time.Second

const (
	sweepBDir  = "/b"
	sweepBDisk = "/b/disk.img"
	sweepBData = "/b/data"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	a, err := e2e.FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// newSweepCluster starts w, a (booting a kv guest with a disk) and b (its
// data dir on a MemFS, under policy) and waits until a is protected.
func newSweepCluster(t *testing.T, policy replica.SyncPolicy) *sweepCluster {
	t.Helper()
	return newSweepClusterWith(t, policy, nil)
}

// raftDirs names, per node id, a raft data dir and the FS holding its
// identity files; a node not named gets a fresh one on the OS.
type raftDirs map[string]struct {
	dir string
	fs  vfs.FS
}

func newSweepClusterWith(t *testing.T, policy replica.SyncPolicy, dirs raftDirs) *sweepCluster {
	t.Helper()
	dirOf := func(id string) (string, vfs.FS) {
		if d, ok := dirs[id]; ok {
			return d.dir, d.fs
		}
		return t.TempDir(), nil
	}
	addrs := freeRaftAddrs(t, 3)
	c := &sweepCluster{t: t, peers: map[string]string{"a": addrs[0], "b": addrs[1], "w": addrs[2]},
		mem: vfs.NewMemFS(uint64(time.Now().UnixNano())), boots: &bootCounter{}}
	if err := vfs.MkdirAllSync(c.mem, sweepBDir, 0o700); err != nil {
		t.Fatal(err)
	}
	c.disk = filepath.Join(t.TempDir(), "a-disk.img")
	var err error
	wDir, wFS := dirOf("w")
	for try := 0; ; try++ {
		c.w, err = failover.Open(failover.Config{ID: "w", ClusterID: "ft-sweep", Role: failover.RoleWitness, Peers: c.peers, DataDir: wDir, FS: wFS, Logger: c.log("w"),
			HeartbeatTimeout: sweepHeartbeat, ElectionTimeout: sweepHeartbeat, LeaderLeaseTimeout: sweepHeartbeat / 2})
		if err == nil || try == 3 || !e2e.PortClash(err.Error()) {
			break
		}
		// Another process (go test runs packages side by side) took the
		// port between its check and this listen: pick three more.
		addrs = freeRaftAddrs(t, 3)
		c.peers = map[string]string{"a": addrs[0], "b": addrs[1], "w": addrs[2]}
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.w.Close() })
	c.a = &sweepNode{id: "a", dataAddr: freeAddr(t), consoleAddr: freeAddr(t)}
	c.a.raftDir, c.a.raftFS = dirOf("a")
	c.b = &sweepNode{id: "b", dataAddr: freeAddr(t), consoleAddr: freeAddr(t)}
	c.b.raftDir, c.b.raftFS = dirOf("b")
	c.start(c.a, failover.RolePrimary, policy, false)
	c.start(c.b, failover.RoleSecondary, policy, false)
	t.Cleanup(func() { c.stop(c.b); c.stop(c.a) })
	eventually(t, "a runs the guest, protected", func() bool {
		st := c.a.c.State()
		return viewOf(c.a.n).state == "running" && st.Protected && st.Primary == "a" && st.Epoch > 0
	})
	return c
}

// log is node id's logger: quiet, or with TANDEM_CRASH_SWEEP_LOGS=DIR a
// file there per row and node (to read a failed row's story).
func (c *sweepCluster) log(id string) *slog.Logger {
	dir := os.Getenv("TANDEM_CRASH_SWEEP_LOGS")
	if dir == "" {
		return quietLog()
	}
	name := strings.NewReplacer("/", "_").Replace(c.t.Name()) + "." + id + ".log"
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { f.Close() })
	return slog.New(slog.NewTextHandler(f, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func (c *sweepCluster) guestConfig() guest.Config {
	cfg := testGuestConfig
	cfg.Disk = c.disk
	return cfg
}

// start starts (or restarts) member s on its fixed addresses.
func (c *sweepCluster) start(s *sweepNode, role failover.Role, policy replica.SyncPolicy, accept bool) {
	t := c.t
	t.Helper()
	log := c.log(s.id)
	n, err := NewNode(NodeConfig{Role: string(role), APIAddr: "127.0.0.1:0", ConsoleAddr: s.consoleAddr, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.Listen("tcp", s.dataAddr)
	if err != nil {
		n.Close()
		t.Fatal(err)
	}
	ln := &killListener{Listener: raw}
	node, err := failover.Open(failover.Config{ID: s.id, ClusterID: "ft-sweep", Role: role, Peers: c.peers, DataDir: s.raftDir, FS: s.raftFS,
		DataAddr: s.dataAddr, APIAddr: n.APIAddr(), ConsoleAddr: n.ConsoleAddr(), Logger: log,
		HeartbeatTimeout: sweepHeartbeat, ElectionTimeout: sweepHeartbeat, LeaderLeaseTimeout: sweepHeartbeat / 2})
	if err != nil {
		ln.Close()
		n.Close()
		t.Fatal(err)
	}
	coord := &RaftCoordinator{Node: node}
	rcv := &replica.Receiver{NewGuest: EmptyGuest, Build: version.Build(), Log: log, Timeout: 5 * time.Second,
		Sync: policy, AcceptUnsynced: accept}
	cfg := MemberConfig{Node: n, Coordinator: coord, Epochs: testEpochs(), Data: ln, Log: log, Receiver: rcv}
	if s.id == "a" {
		cfg.Fresh, cfg.BootConfig = true, c.guestConfig()
		cfg.Boot = func() (guest.Guest, error) { return synth.New(c.guestConfig()) }
	} else {
		h := &hostFS{MemFS: c.mem}
		s.host = h
		rcv.DiskPath = sweepBDisk
		rcv.NewGuest = func(kind string, gc guest.Config) (guest.Guest, error) {
			return synth.NewWithOptions(gc, synth.Options{DiskFS: h})
		}
		cfg.DataDir, cfg.FS = sweepBData, h
		cfg.BootID = func() string { return fmt.Sprint("boot-", c.mem.Crashes()) }
	}
	s.m, s.n, s.c, s.ln, s.stopped = NewMember(cfg), n, coord, ln, false
	s.m.Start()
	n.Start()
}

// stop ends member s's process (its raft node closes with it).
func (c *sweepCluster) stop(s *sweepNode) {
	if s.stopped || s.m == nil {
		return
	}
	s.stopped = true
	s.m.Stop()
	s.n.Close()
}

// sweepRow is one row of the sweep's table.
type sweepRow struct {
	kind    string // single, double, double+override
	point   string
	policy  replica.SyncPolicy
	fired   bool
	ackedAt int    // acknowledged SETs when b lost power
	acked   int    // acknowledged SETs in all
	restart string // what b's restart found in its data dir
	outcome string // who runs the guest after a's kill, or the refusal
	// override: with the outcome a refusal, b restarted with
	// --accept-unsynced-image: what it offered and what followed.
	override string
	lost     int
	diverge  int
	linear   e2e.Verdict
}

// load is the kv clients of one row.
type load struct {
	lg     *e2e.RunLog
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func startLoad(c *sweepCluster, clients int) *load {
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{lg: e2e.NewRunLog(), cancel: cancel}
	for i := range clients {
		id := fmt.Sprintf("c%d", i)
		kc := e2e.NewKVClient(id, []string{c.a.consoleAddr, c.b.consoleAddr}, nil)
		kc.Backoff = 20 * time.Millisecond
		rng := rand.New(rand.NewPCG(uint64(i), 7))
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			e2e.Load(ctx, kc, e2e.LoadOptions{KeyPrefix: id + "-k", ValuePrefix: id, Patience: 30 * time.Second, Pace: 5 * time.Millisecond}, rng, l.lg)
		}()
	}
	return l
}

func (l *load) stop() {
	l.cancel()
	l.wg.Wait()
}

// waitAcked waits until n more SETs than now are acknowledged.
func (l *load) waitAcked(t *testing.T, what string, n int) {
	t.Helper()
	want := l.lg.Acked() + n
	eventually(t, what, func() bool {
		if e := l.lg.FirstErr(); e != "" {
			t.Fatalf("a kv client failed: %s", e)
		}
		return l.lg.Acked() >= want
	})
}

// verify reads every key back from b and checks what the clients were
// told (nothing acknowledged lost, no read contradicted) and that the
// history is linearizable.
func (c *sweepCluster) verify(row *sweepRow, l *load) {
	t := c.t
	t.Helper()
	kc := e2e.NewKVClient("verify", []string{c.b.consoleAddr}, nil)
	defer kc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	lost, div, detail, err := e2e.VerifyRun(ctx, kc, l.lg, 10*time.Second)
	if err != nil {
		t.Fatalf("read back from b: %v", err)
	}
	row.lost, row.diverge, row.acked = lost, div, l.lg.Acked()
	row.linear = l.lg.History.Check(20 * time.Second).Verdict
	if lost > 0 || div > 0 {
		t.Errorf("%d acknowledged writes lost, %d reads contradicted: %s", lost, div, strings.Join(detail[:min(len(detail), 5)], "; "))
	}
	if row.linear == e2e.NotLinearizable {
		t.Error("the kv history is not linearizable")
	}
}

// armCrash arms point so that its first hit cuts b's power: b's file
// system loses what was not fsynced (torn), its data connections die and
// its raft node closes (in process the dead b runs on until restartB
// stops it, and must not vote, lead or run the guest meanwhile), and
// with killPrimary a's process is killed in the same instant (its raft
// node first, so nothing more is recorded or released).
func (c *sweepCluster) armCrash(point string, killPrimary bool, row *sweepRow, l *load) (crashed <-chan struct{}, disarm func()) {
	p, ok := failpoint.Lookup(point)
	if !ok {
		c.t.Fatalf("no failpoint %s", point)
	}
	ch := make(chan struct{})
	var once sync.Once
	host, ln, braft := c.b.host, c.b.ln, c.b.c.Node
	disarm = p.Enable(func() error {
		fired := false
		once.Do(func() {
			fired = true
			row.fired, row.ackedAt = true, l.lg.Acked()
			c.mem.Crash(vfs.TearUnsynced)
			host.dead.Store(true)
			if killPrimary {
				c.a.c.Node.Close()
			}
			ln.kill()
			braft.Close()
			close(ch)
		})
		if !fired {
			return nil
		}
		return errors.New("power loss")
	})
	return ch, disarm
}

// restartB starts b again on what its file system kept and says what
// its data dir offered.
func (c *sweepCluster) restartB(policy replica.SyncPolicy, accept bool) string {
	t := c.t
	t.Helper()
	c.stop(c.b)
	c.start(c.b, failover.RoleSecondary, policy, accept)
	var sec *replica.Secondary
	eventually(t, "b restarted as secondary", func() bool {
		v := viewOf(c.b.n)
		sec = v.sec
		return sec != nil || v.state == "running"
	})
	if sec == nil {
		return "promoted at once"
	}
	st := sec.Status(false)
	switch {
	case st.LastError != "":
		return "refused: " + st.LastError
	case st.Consistent:
		return fmt.Sprintf("offered epoch %d", st.LastCommittedEpoch)
	}
	return "nothing stored"
}

// runSweepRow runs one row: kind "single" (b crashes, restarts, rejoins,
// then a is killed) or "double" (b crashes and a is killed at once, then
// b restarts).
func runSweepRow(t *testing.T, kind, point string, policy replica.SyncPolicy) sweepRow {
	row := sweepRow{kind: kind, point: point, policy: policy}
	t.Run(fmt.Sprintf("%s/%s/%s", kind, strings.TrimPrefix(point, "replica."), policy), func(t *testing.T) {
		c := newSweepCluster(t, policy)
		l := startLoad(c, 2)
		defer l.stop()
		l.waitAcked(t, "writes acknowledged before the crash", 10)
		crashed, disarm := c.armCrash(point, kind == "double", &row, l)
		defer disarm()
		if strings.Contains(point, ".rewrite.") {
			// A rewrite is the catch-up's (Begin): make a rejoin.
			eventually(t, "a's epoch loop", func() bool { return c.a.m.currentLoop() != nil })
			c.a.m.currentLoop().Relink("crash sweep: a rejoin, so b rewrites its stored image")
		}
		select {
		case <-crashed:
		case <-time.After(20 * time.Second):
			t.Fatalf("failpoint %s never fired", point)
		}
		disarm()
		if kind == "double" {
			c.stop(c.a)
		}
		row.restart = c.restartB(policy, false)
		if kind == "single" {
			// b rejoins: a's loop is protected by it again, and more
			// writes are acknowledged through it.
			eventually(t, "b rejoined a", func() bool {
				loop := c.a.m.currentLoop()
				sec := viewOf(c.b.n).sec
				return loop != nil && loop.Status().Protected && c.a.c.State().Protected &&
					sec != nil && sec.Status(false).Protected
			})
			l.waitAcked(t, "writes acknowledged after b rejoined", 5)
			c.stop(c.a)
		}
		row.outcome = c.waitOutcome()
		row.acked = l.lg.Acked()
		if !strings.HasPrefix(row.outcome, "b runs") {
			// A refusal (one line, checked by waitOutcome). Then the
			// operator's override: b offers whatever survived.
			l.stop()
			row.override = c.restartB(policy, true)
			row.override += "; " + c.waitOutcome()
			if strings.Contains(row.override, "b runs") {
				c.verifyOverride(&row, l)
			}
			return
		}
		l.waitAcked(t, "writes acknowledged by b", 3)
		l.stop()
		c.verify(&row, l)
	})
	return row
}

// verifyOverride counts what an operator who forced b's image lost (by
// contract, epochs after b's last fsync): reported, not a failure.
func (c *sweepCluster) verifyOverride(row *sweepRow, l *load) {
	kc := e2e.NewKVClient("verify", []string{c.b.consoleAddr}, nil)
	defer kc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	lost, div, _, err := e2e.VerifyRun(ctx, kc, l.lg, 10*time.Second)
	if err != nil {
		c.t.Fatalf("read back from b: %v", err)
	}
	row.lost, row.diverge, row.acked = lost, div, l.lg.Acked()
	row.linear = l.lg.History.Check(20 * time.Second).Verdict
}

// waitOutcome waits until b runs the guest, or the cluster says why it
// cannot (a waiting reason held for 2 s; no raft leader yet is not a
// reason: an election takes a heartbeat or two).
func (c *sweepCluster) waitOutcome() string {
	deadline := time.Now().Add(20 * time.Second)
	var why string
	var since time.Time
	for time.Now().Before(deadline) {
		if v := viewOf(c.b.n); v.state == "running" {
			return fmt.Sprintf("b runs (generation %d)", c.b.c.State().Generation)
		}
		w := c.b.c.Waiting()
		switch {
		case w == "" || w != why || strings.HasPrefix(w, "no raft leader"):
			why, since = w, time.Now()
		case time.Since(since) > 2*time.Second:
			if strings.Contains(w, "\n") {
				c.t.Errorf("the waiting reason is not one line: %q", w)
			}
			return "refused: " + w
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.t.Fatalf("neither b runs nor the cluster says why (last: %q)", why)
	return ""
}

// TestDriverCrashSweep is the sweep: every failpoint on the secondary's
// path, under both sync policies, as a single failure (b's host loses
// power at the point, b restarts on what survived and rejoins, then a is
// killed: b must run with every acknowledged write) and as a double
// failure (a is killed in the same instant: b must run the newest
// acknowledged state or the cluster must refuse, saying why; never an
// older image silently). The table is in the log.
func TestDriverCrashSweep(t *testing.T) {
	points := failpoint.Names("replica.")
	var rows []sweepRow
	type cell struct {
		kind, point string
		policy      replica.SyncPolicy
	}
	var cells []cell
	for _, kind := range []string{"single", "double"} {
		for _, policy := range []replica.SyncPolicy{replica.SyncMemory, replica.SyncDisk} {
			for _, p := range points {
				if p == replica.FPAfterAckBeforeSync.Name() && policy == replica.SyncDisk {
					continue // --sync memory only
				}
				cells = append(cells, cell{kind, p, policy})
			}
		}
	}
	if only := os.Getenv("TANDEM_CRASH_SWEEP_ROW"); only != "" {
		k, rest, _ := strings.Cut(only, "/")
		p, pol, _ := strings.Cut(rest, "/")
		policy, _ := replica.ParseSyncPolicy(pol)
		cells = []cell{{k, p, policy}}
	} else if !sweepFull() {
		cells = []cell{
			{"single", replica.FPAppendBeforeSync.Name(), replica.SyncMemory},
			{"single", replica.FPRewriteBeforeRename.Name(), replica.SyncDisk},
			{"double", replica.FPBeforeAck.Name(), replica.SyncMemory},
			{"double", replica.FPBeforeAck.Name(), replica.SyncDisk},
		}
	}
	for _, c := range cells {
		rows = append(rows, runSweepRow(t, c.kind, c.point, c.policy))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n| failure | failpoint | sync | acked at crash | acked | b's restart | after a's kill | with --accept-unsynced-image | lost | contradicted | linearizable |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %d | %d | %s | %s | %s | %d | %d | %s |\n", r.kind, strings.TrimPrefix(r.point, "replica."), r.policy,
			r.ackedAt, r.acked, brief(r.restart), brief(r.outcome), brief(r.override), r.lost, r.diverge, orNA(string(r.linear)))
	}
	b.WriteString("\nThe refusals in full:\n")
	for _, r := range rows {
		for _, s := range []string{r.restart, r.outcome, r.override} {
			if strings.Contains(s, "refused") {
				fmt.Fprintf(&b, "  %s %s %s: %s\n", r.kind, r.point, r.policy, s)
			}
		}
	}
	t.Log(b.String())
}

// brief is a table cell's short form of a restart's or an outcome's text
// (the log has them in full).
func brief(s string) string {
	var out []string
	for _, part := range strings.Split(s, "; ") {
		switch {
		case strings.HasPrefix(part, "it is not offered") || strings.HasPrefix(part, "--accept-unsynced-image runs"):
		case strings.Contains(part, "may lack acknowledged epochs"):
			out = append(out, "refused: image may lack acked epochs")
		case strings.Contains(part, "cannot resume the guest"):
			_, why, _ := strings.Cut(part, "cannot resume the guest: ")
			why, _, _ = strings.Cut(why, "; needed")
			out = append(out, "cluster waits: "+why)
		default:
			out = append(out, part)
		}
	}
	return orNA(strings.Join(out, "; "))
}

func orNA(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
