package drill

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/internal/e2e"
	"github.com/tandemvm/tandem/internal/etcdlab"
	"github.com/tandemvm/tandem/internal/trust"
)

// The drill's bounds. A run that misses one fails with the bound as its
// reason; nothing in the drill waits without one.
const (
	StartTimeout  = 30 * time.Second // a fresh trio until protected
	Reprotect     = 20 * time.Second // restarted old primary until protected again
	FailoverLimit = 10 * time.Second // kill until the new primary answers
	// CheckTimeout bounds the linearizability check of one run's history
	// (a few thousand operations, partitioned by key, take milliseconds).
	CheckTimeout = 30 * time.Second
)

// Config is what a drill runs.
type Config struct {
	Bin       string // the tandem binary the trio runs ("": this process's)
	Guest     string // kvm or synth
	Memory    string // guest memory, e.g. 128MiB
	Keep      string // keep data dirs and logs here ("": a temp dir, removed unless something failed)
	Seed      uint64 // kill moments and values
	Out       io.Writer
	Plaintext bool // no TLS (loopback only)
	Clients   int  // kv clients per run (1 or 2; 0: 2)
	// Coordinator is raft (the trio, default) or etcd (a pair on etcd:
	// EtcdEndpoints, or the drill's own 3-member etcd when empty).
	Coordinator, EtcdEndpoints string
	// Narrate, when set, is told what happens (the demo's voice).
	Narrate func(format string, a ...any)
	// NodeExtra are flags of one node of every trio, by ID (the
	// demo's network part: each node's own --net).
	NodeExtra map[string][]string
}

// Drill runs failover runs against one trio at a time, starting a fresh
// one when a run leaves it unusable.
type Drill struct {
	cfg     Config
	image   string
	dir     string
	keepDir bool
	rng     *rand.Rand
	trios   int
	t       *e2e.Trio
	// loadPatience, loadBackoff and loadPace shape the kv clients' load.
	loadPatience, loadBackoff, loadPace time.Duration
	// certDir holds the CA and the certificates of a, b, w and the
	// operator; tls is the operator's identity. "" and nil: plaintext.
	certDir string
	tls     *trust.Identity
	// etcd is the drill's own etcd (nil: raft, or the operator's etcd at
	// etcdEndpoints).
	etcd          *etcdlab.Cluster
	etcdEndpoints string
}

// New prepares a drill: its directory, the kvm image's path and, unless
// plaintext, a CA and certificates of its own. Close it when done.
func New(cfg Config) (*Drill, error) {
	if cfg.Bin == "" {
		bin, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("find this binary: %w", err)
		}
		cfg.Bin = bin
	}
	if cfg.Clients == 0 {
		cfg.Clients = 2
	}
	if cfg.Out == nil {
		cfg.Out = io.Discard
	}
	d := &Drill{cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x9e3779b97f4a7c15)),
		loadPatience: FailoverLimit + 5*time.Second}
	if cfg.Guest == kvm.Kind {
		// The children run where the drill was started; the image is
		// found here once and passed to them by its absolute path.
		if err := kvm.Available(); err != nil {
			return nil, err
		}
		img, err := kvm.DefaultImage()
		if err != nil {
			return nil, err
		}
		if d.image, err = filepath.Abs(img); err != nil {
			return nil, err
		}
	}
	var err error
	if cfg.Keep != "" {
		if err := os.MkdirAll(cfg.Keep, 0o755); err != nil {
			return nil, err
		}
		d.dir, d.keepDir = cfg.Keep, true
	} else if d.dir, err = os.MkdirTemp("", "tandem-drill-"); err != nil {
		return nil, err
	}
	if !cfg.Plaintext {
		// The secure path: a CA of the drill's own, a certificate per
		// node ID and one for the drill's clients.
		d.certDir = filepath.Join(d.dir, "tls")
		if err := e2e.MakeCerts(d.certDir, "a", "b", "w", e2e.Operator); err != nil {
			return nil, fmt.Errorf("drill certificates: %w", err)
		}
		if d.tls, err = e2e.LoadCert(d.certDir, e2e.Operator); err != nil {
			return nil, fmt.Errorf("drill certificates: %w", err)
		}
	}
	if cfg.Coordinator == "etcd" {
		if err := d.startEtcd(); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// Dir is where the drill keeps its trios' data and logs.
func (d *Drill) Dir() string { return d.dir }

// CertDir holds the drill's CA and certificates ("": plaintext).
func (d *Drill) CertDir() string { return d.certDir }

// TLS is the identity of the drill's own clients (nil: plaintext).
func (d *Drill) TLS() *trust.Identity { return d.tls }

// Trio is the current trio (nil before FreshTrio).
func (d *Drill) Trio() *e2e.Trio { return d.t }

// Close kills the current trio's processes, then stops the drill's own
// etcd.
func (d *Drill) Close() {
	if d.t != nil {
		d.t.KillAll()
	}
	d.closeEtcd()
}

// Cleanup kills the nodes (Close), then removes the temp dir unless asked
// to keep it or something failed: a node still running would write into
// the directory while it is removed, and leave it half there.
func (d *Drill) Cleanup(failed bool) {
	d.Close()
	if !d.keepDir && !failed {
		os.RemoveAll(d.dir)
	}
}

func (d *Drill) say(format string, a ...any) {
	if d.cfg.Narrate != nil {
		d.cfg.Narrate(format, a...)
	}
}

// LogTails is the last lines of each of the current trio's logs.
func (d *Drill) LogTails() string {
	if d.t == nil {
		return ""
	}
	return d.t.LogTails(15)
}

// FreshTrio starts a new cluster in a new subdirectory, retrying on a
// port race, and waits until it is protected.
func (d *Drill) FreshTrio(ctx context.Context) (*e2e.Node, api.Status, error) {
	if d.t != nil {
		d.t.KillAll()
	}
	var last error
	for attempt := 0; attempt < 3; attempt++ {
		d.trios++
		dir := filepath.Join(d.dir, fmt.Sprintf("trio%d", d.trios))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, api.Status{}, err
		}
		tc := e2e.TrioConfig{Bin: d.cfg.Bin, Dir: dir, Guest: d.cfg.Guest, Memory: d.cfg.Memory,
			Image: d.image, CertDir: d.certDir, TLS: d.tls}
		d.trioEtcd(&tc)
		t, err := e2e.NewTrio(tc)
		if err != nil {
			return nil, api.Status{}, err
		}
		d.t = t
		for _, n := range t.Nodes() {
			n.Extra = d.cfg.NodeExtra[n.ID]
		}
		if err := t.StartAll(); err != nil {
			return nil, api.Status{}, err
		}
		p, st, err := t.WaitProtected(ctx, StartTimeout)
		if err == nil {
			return p, st, nil
		}
		last = err
		clash := t.PortClash()
		t.KillAll()
		if !clash {
			break
		}
	}
	return nil, api.Status{}, fmt.Errorf("trio did not start: %v (logs in %s)", last, d.t.Dir())
}

// StartLoad starts the drill's kv clients of one run, beginning at the
// primary p's console; stop ends them and waits until they have (it may
// be called more than once).
func (d *Drill) StartLoad(ctx context.Context, run int, p *e2e.Node) (lg *e2e.RunLog, stop func()) {
	lg = e2e.NewRunLog()
	lctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for c := 0; c < d.cfg.Clients; c++ {
		kc := e2e.NewKVClient(fmt.Sprintf("dc%d", c), d.t.Consoles(), d.tls)
		kc.Seq = runSeqBase(run)
		kc.Next = max(0, slices.Index(kc.Addrs, p.Console))
		kc.Backoff = d.loadBackoff
		o := e2e.LoadOptions{KeyPrefix: fmt.Sprintf("k%d_", c), ValuePrefix: fmt.Sprintf("r%d", run),
			Patience: d.loadPatience, Pace: d.loadPace}
		rng := rand.New(rand.NewPCG(d.rng.Uint64(), uint64(c)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			e2e.Load(lctx, kc, o, rng, lg)
		}()
	}
	return lg, func() { cancel(); wg.Wait() }
}

// Verify reads back every key the run wrote, through a fresh client id,
// checks the run's log against it and deletes the keys; then it checks
// the run's whole history (the load and the read-back) for
// linearizability.
func (d *Drill) Verify(ctx context.Context, run int, lg *e2e.RunLog) (lost, divergent int, detail []string, lin e2e.CheckResult, err error) {
	c := e2e.NewKVClient("dv", d.t.Consoles(), d.tls)
	c.Seq = runSeqBase(run)
	defer c.Close()
	lost, divergent, detail, err = e2e.VerifyRun(ctx, c, lg, FailoverLimit)
	lin = lg.History.Check(CheckTimeout)
	return lost, divergent, detail, lin, err
}

// runSeqBase is where a run's clients start their seqs: the drill's
// client ids are the same every run (the guest has a fixed number of
// client slots), and a seq must rise above every earlier run's.
func runSeqBase(run int) uint64 { return uint64(run) << 32 }

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
