package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/trust"
)

// StatusTimeout bounds one status call of the harness.
const StatusTimeout = time.Second

// TrioConfig describes a trio: what every node runs and where its files
// go.
type TrioConfig struct {
	Bin    string // the tandem binary
	Dir    string // data dirs (Dir/<id>); logs too unless LogDir is set
	LogDir string // logs: <id>-<start>.log
	Guest  string // the primary's --guest
	Memory string // its --memory (default 128MiB)
	Image  string // kvm: the micro-guest, as an absolute path ("": the node's default)
	// CertDir holds the cluster's CA and a certificate per node (named by
	// its ID); TLS is the operator's identity the harness's clients use.
	// "" and nil: the trio runs in plaintext.
	CertDir string
	TLS     *trust.Identity
	Extra   []string // flags for every node
	// Addrs, when set, fixes each node's addresses (a network namespace's
	// IP); the default is FreeAddr on loopback.
	Addrs map[string]Addrs
	// Etcd, when set, runs a and b with --coordinator etcd on these
	// endpoints (comma-separated) under --cluster Cluster (default "g1"),
	// and no witness.
	Etcd, Cluster string
}

// Addrs are a node's listening addresses; a witness has no Data or
// Console.
type Addrs struct{ Raft, Data, API, Console string }

// Node is one process of a trio: its addresses are fixed at creation, so
// a restart is the same command with the same data dir.
type Node struct {
	ID, Role string // role as configured: primary, secondary, witness
	Addrs
	DataDir string
	// Netns runs the node inside this network namespace (ip netns exec).
	Netns string
	// Extra are flags of this node only (e.g. --data-advertise).
	Extra []string

	logDir string
	client *api.Client

	// mu guards starts and proc.
	mu     sync.Mutex
	starts int
	proc   *Proc
}

// Trio is a primary, a secondary and a witness of the same binary (on
// etcd: a primary and a secondary).
type Trio struct {
	cfg   TrioConfig
	peers string
	nodes []*Node // a (primary), b (secondary), w (witness)
}

// NewTrio lays out a trio: node a primary, b secondary, w witness, each
// on its addresses (fresh loopback ports unless cfg.Addrs says).
func NewTrio(cfg TrioConfig) (*Trio, error) {
	if cfg.LogDir == "" {
		cfg.LogDir = cfg.Dir
	}
	if cfg.Memory == "" {
		cfg.Memory = "128MiB"
	}
	t := &Trio{cfg: cfg}
	var peers []string
	specs := [][2]string{{"a", "primary"}, {"b", "secondary"}, {"w", "witness"}}
	if cfg.Etcd != "" {
		specs = specs[:2] // etcd decides: no witness
		if cfg.Cluster == "" {
			cfg.Cluster = "g1"
		}
		t.cfg = cfg
	}
	for _, spec := range specs {
		n := &Node{ID: spec[0], Role: spec[1], DataDir: filepath.Join(cfg.Dir, spec[0]), logDir: cfg.LogDir}
		if a, ok := cfg.Addrs[n.ID]; ok {
			n.Addrs = a
		} else {
			for _, p := range []*string{&n.Raft, &n.Data, &n.API, &n.Console} {
				var err error
				if *p, err = FreeAddr(); err != nil {
					return nil, err
				}
			}
		}
		if n.Role == "witness" {
			n.Data, n.Console = "", ""
		}
		peers = append(peers, n.ID+"="+n.Raft)
		t.nodes = append(t.nodes, n)
	}
	t.peers = strings.Join(peers, ",")
	t.SetTLS(cfg.CertDir, cfg.TLS)
	return t, nil
}

// SetTLS runs the trio over TLS with the certificates in certDir and the
// operator identity id for the harness's clients ("" and nil:
// plaintext). Call it before the trio starts.
func (t *Trio) SetTLS(certDir string, id *trust.Identity) {
	t.cfg.CertDir, t.cfg.TLS = certDir, id
	var tc *tls.Config
	if id != nil {
		tc = id.ClientTLS("")
	}
	for _, n := range t.nodes {
		n.client = api.NewClient(n.API, tc, StatusTimeout)
	}
}

// Dir is where the trio's data dirs are.
func (t *Trio) Dir() string { return t.cfg.Dir }

// Peers is every node's --peers.
func (t *Trio) Peers() string { return t.peers }

// TLS is the operator identity the harness's clients use (nil: plaintext).
func (t *Trio) TLS() *trust.Identity { return t.cfg.TLS }

// Nodes are a, b and w.
func (t *Trio) Nodes() []*Node { return t.nodes }

// Node is the node with id, or nil.
func (t *Trio) Node(id string) *Node {
	for _, n := range t.nodes {
		if n.ID == id {
			return n
		}
	}
	return nil
}

// Args is n's command line (without the binary): the same on every start.
func (t *Trio) Args(n *Node) []string {
	a := []string{n.Role, "--id", n.ID, "--raft", n.Raft, "--peers", t.peers, "--data-dir", n.DataDir, "--api", n.API}
	if t.cfg.Etcd != "" {
		a = []string{n.Role, "--coordinator", "etcd", "--etcd-endpoints", t.cfg.Etcd, "--cluster", t.cfg.Cluster, "--id", n.ID, "--data-dir", n.DataDir, "--api", n.API}
	}
	if n.Role != "witness" {
		a = append(a, "--data", n.Data, "--console", n.Console)
	}
	if n.Role == "primary" {
		a = append(a, "--guest", t.cfg.Guest, "--memory", t.cfg.Memory, "--workload", "kv")
		if t.cfg.Image != "" {
			a = append(a, "--image", t.cfg.Image)
		}
	}
	if t.cfg.CertDir != "" {
		a = append(a, CertArgs(t.cfg.CertDir, n.ID)...)
	}
	a = append(a, t.cfg.Extra...)
	return append(a, n.Extra...)
}

// Start runs n's command, output to <id>-<start>.log in the log dir. It
// refuses a node that is still running.
func (t *Trio) Start(n *Node) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.proc != nil && n.proc.Running() {
		return fmt.Errorf("%s is already running", n.ID)
	}
	if err := os.MkdirAll(n.logDir, 0o755); err != nil {
		return err
	}
	n.starts++
	argv := append([]string{t.cfg.Bin}, t.Args(n)...)
	if n.Netns != "" {
		argv = append([]string{"ip", "netns", "exec", n.Netns}, argv...)
	}
	p, err := StartProc(n.ID, n.logPathLocked(), argv...)
	if err != nil {
		return err
	}
	n.proc = p
	return nil
}

// StartAll starts a, b and w.
func (t *Trio) StartAll() error {
	for _, n := range t.nodes {
		if err := t.Start(n); err != nil {
			return err
		}
	}
	return nil
}

// KillAll kill -9s every node and waits (bounded) for each.
func (t *Trio) KillAll() {
	for _, n := range t.nodes {
		n.Kill()
	}
}

// PortClash says whether some node's log shows it lost a port race.
func (t *Trio) PortClash() bool {
	for _, n := range t.nodes {
		if PortClash(n.Tail(20)) {
			return true
		}
	}
	return false
}

// LogTails is the last lines of every node's current log.
func (t *Trio) LogTails(lines int) string {
	var b strings.Builder
	for _, n := range t.nodes {
		fmt.Fprintf(&b, "---- %s (%s)\n%s\n", n.LogPath(), n.Role, n.Tail(lines))
	}
	return b.String()
}

// Consoles are the console addresses of a and b.
func (t *Trio) Consoles() []string {
	var cs []string
	for _, n := range t.nodes {
		if n.Console != "" {
			cs = append(cs, n.Console)
		}
	}
	return cs
}

// Client is the typed API client of n (operator's identity, StatusTimeout
// per call).
func (n *Node) Client() *api.Client { return n.client }

// Status is n's GET /status, bounded by StatusTimeout.
func (n *Node) Status(ctx context.Context) (api.Status, error) {
	return n.client.Status(ctx, false)
}

// Proc is n's current (or last) process; nil before the first start.
func (n *Node) Proc() *Proc {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.proc
}

// Starts is how many times n was started.
func (n *Node) Starts() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.starts
}

// LogPath is the log of n's current (or last) start.
func (n *Node) LogPath() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.logPathLocked()
}

func (n *Node) logPathLocked() string {
	return filepath.Join(n.logDir, fmt.Sprintf("%s-%d.log", n.ID, n.starts))
}

// Running says whether n's process runs.
func (n *Node) Running() bool {
	p := n.Proc()
	return p != nil && p.Running()
}

// Signal sends sig to n's process group.
func (n *Node) Signal(sig syscall.Signal) error {
	p := n.Proc()
	if p == nil {
		return fmt.Errorf("%s was never started", n.ID)
	}
	return p.Signal(sig)
}

// Kill SIGKILLs n and waits (bounded) until it is gone.
func (n *Node) Kill() error {
	if p := n.Proc(); p != nil {
		return p.Kill()
	}
	return nil
}

// Stop sends sig and waits (bounded) until n is gone, killing it if it
// outlives the bound.
func (n *Node) Stop(sig syscall.Signal) error {
	if p := n.Proc(); p != nil {
		return p.Stop(sig)
	}
	return nil
}

// Tail is the last lines of n's current log.
func (n *Node) Tail(lines int) string {
	if p := n.Proc(); p != nil {
		return p.Tail(lines)
	}
	return "(never started)"
}

// SwitchoverTimeout bounds the harness's POST /switchover: the node's own
// bound on a switchover (20 s) and a margin for the answer.
const SwitchoverTimeout = 25 * time.Second

// Switchover asks n, the primary, to hand the guest to its secondary
// after a final epoch.
func (t *Trio) Switchover(ctx context.Context, n *Node) (api.SwitchoverResult, error) {
	var tc *tls.Config
	if t.cfg.TLS != nil {
		tc = t.cfg.TLS.ClientTLS("")
	}
	return api.NewClient(n.API, tc, SwitchoverTimeout).Switchover(ctx)
}
