package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/internal/trust"
)

func init() {
	register("drill", "failover drill: a local trio under kv load, kill -9 the primary (or two nodes: --scenario), verify, repeat", cmdDrill)
}

// The drill's bounds. A run that misses one fails with the bound as its
// reason; nothing in the drill waits without one.
const (
	drillStartTimeout   = 30 * time.Second // a fresh trio until protected
	drillReprotect      = 20 * time.Second // restarted old primary until protected again
	drillFailoverLimit  = 10 * time.Second // kill until the new primary answers
	drillRequestTimeout = time.Second      // one attempt of one request on one connection
)

func cmdDrill(args []string) error {
	fs := newFlagSet("drill")
	runs := fs.Int("runs", 10, "number of kill -9 failovers")
	kind := fs.String("guest", defaultGuestKind(), "guest backend: kvm or synth")
	asJSON := fs.Bool("json", false, "print the summary as one JSON object (the table goes to stderr)")
	seed := fs.Uint64("seed", 0, "random seed for kill moments and values (0: from the clock)")
	keep := fs.String("keep", "", "keep the trio's data dirs and logs under this directory")
	memory := fs.String("memory", "128MiB", "guest memory")
	clients := fs.Int("clients", 2, "kv clients (1 or 2)")
	plaintext := fs.Bool("plaintext", false, "run the trio without TLS (loopback only); by default every channel is mutual TLS on a CA and certificates made for the drill")
	scenarioFlag := fs.String("scenario", "", "instead of --runs, double failures: two nodes go away one after the other and come back;\n"+
		"NAME is one of "+strings.Join(scenarioNames(), ", ")+",\n"+
		"an order (w-s, s-w, p-w: both return orders), all (each once), or a comma-separated list.\n"+
		"w-s: SIGTERM the witness, then kill -9 the secondary; s-w: kill -9 the secondary, then SIGTERM the witness;\n"+
		"p-w: kill -9 the primary, then SIGTERM the witness. /X-first names the node that returns first")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	var scs []scenario
	if *scenarioFlag != "" {
		var err error
		if scs, err = pickScenarios(*scenarioFlag); err != nil {
			return err
		}
	}
	switch {
	case *runs < 1 || *runs > 100000:
		return usagef("--runs %d: want 1 to 100000", *runs)
	case *kind != "kvm" && *kind != "synth":
		return usagef("--guest %q: want kvm or synth", *kind)
	case *clients < 1 || *clients > 2:
		return usagef("--clients %d: want 1 or 2", *clients)
	}
	if *seed == 0 {
		*seed = uint64(time.Now().UnixNano())
	}
	out := os.Stdout
	if *asJSON {
		out = os.Stderr
	}
	d, err := newDrill(*kind, *memory, *keep, *seed, out, *plaintext)
	if err != nil {
		return err
	}
	d.clients = *clients
	defer d.close()
	var sum drillSummary
	if scs != nil {
		sum = d.runScenarios(scs)
	} else {
		sum = d.run(*runs)
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		enc.Encode(sum)
	} else {
		sum.print(out)
	}
	if !sum.ok() {
		if scs != nil {
			return fmt.Errorf("drill failed: %d of %d scenarios failed, %d acknowledged writes lost, %d divergent replies (logs in %s)",
				sum.FailedRuns, sum.Runs, sum.AckedWritesLost, sum.DivergentReplies, d.dir)
		}
		return fmt.Errorf("drill failed: %d of %d runs failed, %d acknowledged writes lost, %d divergent replies (logs in %s)",
			sum.FailedRuns, sum.Runs, sum.AckedWritesLost, sum.DivergentReplies, d.dir)
	}
	return nil
}

// ---- the trio ----

// trioNode is one process of a local trio: its addresses are fixed at
// creation, so a restart is the same command with the same data dir.
type trioNode struct {
	id, role                 string // role as configured: primary, secondary, witness
	raft, data, api, console string
	dataDir, logDir          string
	starts                   int

	// mu guards cmd and exited.
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// trio is a primary, a secondary and a witness of the same binary on free
// loopback ports, with data dirs and logs under dir.
type trio struct {
	bin, dir, kind, memory string
	image                  string // kvm: the micro-guest, as an absolute path
	peers                  string
	nodes                  []*trioNode // a (primary), b (secondary), w (witness)
	extra                  []string    // extra flags for every node (tests)
	// certDir holds the cluster's CA and a certificate per node (named
	// by its ID) and for the operator; "" runs the trio in plaintext.
	certDir string
	// tls is the operator's identity: the drill's own clients (status,
	// kv, switchover) use it. nil in plaintext.
	tls *trust.Identity
	// statusHTTP and statusScheme are fetchStatus's (setTLS makes them).
	statusHTTP   *http.Client
	statusScheme string
}

// freeLoopback returns a loopback address nobody listened on a moment ago
// (another process may take it in between: the caller retries on
// "address already in use").
func freeLoopback() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func newTrio(bin, dir, kind, memory string) (*trio, error) {
	t := &trio{bin: bin, dir: dir, kind: kind, memory: memory}
	var peers []string
	used := map[string]bool{} // the kernel may hand a closed port out again
	for _, spec := range [][2]string{{"a", "primary"}, {"b", "secondary"}, {"w", "witness"}} {
		n := &trioNode{id: spec[0], role: spec[1], dataDir: filepath.Join(dir, spec[0]), logDir: dir}
		for _, p := range []*string{&n.raft, &n.data, &n.api, &n.console} {
			var a string
			for tries := 0; a == "" || used[a]; tries++ {
				var err error
				if a, err = freeLoopback(); err != nil || tries == 100 {
					return nil, fmt.Errorf("free port: %v", err)
				}
			}
			used[a] = true
			*p = a
		}
		if n.role == "witness" {
			n.data, n.console = "", ""
		}
		peers = append(peers, n.id+"="+n.raft)
		t.nodes = append(t.nodes, n)
	}
	t.peers = strings.Join(peers, ",")
	t.setTLS("", nil)
	return t, nil
}

// setTLS runs the trio over TLS with the certificates in certDir and the
// operator identity id for the drill's clients ("" and nil: plaintext).
// Call it before the trio starts.
func (t *trio) setTLS(certDir string, id *trust.Identity) {
	t.certDir, t.tls = certDir, id
	t.statusScheme, t.statusHTTP = apiHTTP(id, time.Second)
}

func (t *trio) node(id string) *trioNode {
	for _, n := range t.nodes {
		if n.id == id {
			return n
		}
	}
	return nil
}

// args is n's command line: the same on every start.
func (t *trio) args(n *trioNode) []string {
	a := []string{n.role, "--id", n.id, "--raft", n.raft, "--peers", t.peers, "--data-dir", n.dataDir, "--api", n.api}
	if n.role != "witness" {
		a = append(a, "--data", n.data, "--console", n.console)
	}
	if n.role == "primary" {
		a = append(a, "--guest", t.kind, "--memory", t.memory, "--workload", "kv")
		if t.image != "" {
			a = append(a, "--image", t.image)
		}
	}
	if t.certDir != "" {
		a = append(a, "--tls-ca", filepath.Join(t.certDir, trust.CAFile),
			"--tls-cert", filepath.Join(t.certDir, trust.CertFile(n.id)),
			"--tls-key", filepath.Join(t.certDir, trust.KeyFile(n.id)))
	}
	return append(a, t.extra...)
}

// drillOperator names the certificate the drill's (and demo's) own
// clients present.
const drillOperator = "operator"

// makeClusterCerts makes a CA in dir and a certificate for each name,
// keeping any already there (a --keep directory used again).
func makeClusterCerts(dir string, names ...string) error {
	now := time.Now()
	if err := trust.NewCA(dir, "Tandem drill CA", now); err != nil && !errors.Is(err, trust.ErrExists) {
		return err
	}
	for _, n := range names {
		if err := trust.Issue(dir, n, trust.IssueOptions{IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}, now); err != nil && !errors.Is(err, trust.ErrExists) {
			return err
		}
	}
	return nil
}

// loadCert loads name's certificate from a directory makeClusterCerts made.
func loadCert(dir, name string) (*trust.Identity, error) {
	return trust.Load(trust.Config{CAFile: filepath.Join(dir, trust.CAFile),
		CertFile: filepath.Join(dir, trust.CertFile(name)), KeyFile: filepath.Join(dir, trust.KeyFile(name))})
}

// logPath is the file of n's current (or last) start.
func (n *trioNode) logPath() string {
	return filepath.Join(n.logDir, fmt.Sprintf("%s-%d.log", n.id, n.starts))
}

// start runs n's command in its own process group, output to a log file.
func (t *trio) start(n *trioNode) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.exited != nil {
		select {
		case <-n.exited:
		default:
			return fmt.Errorf("%s is already running", n.id)
		}
	}
	n.starts++
	lf, err := os.Create(n.logPath())
	if err != nil {
		return err
	}
	cmd := exec.Command(t.bin, t.args(n)...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return fmt.Errorf("start %s: %w", n.id, err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		lf.Close()
		close(exited)
	}()
	n.cmd, n.exited = cmd, exited
	return nil
}

func (t *trio) startAll() error {
	for _, n := range t.nodes {
		if err := t.start(n); err != nil {
			return err
		}
	}
	return nil
}

func (n *trioNode) running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.exited == nil {
		return false
	}
	select {
	case <-n.exited:
		return false
	default:
		return true
	}
}

// signal sends sig to n's process group (a kvm guest's helpers die with it).
func (n *trioNode) signal(sig syscall.Signal) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil || n.cmd.Process == nil {
		return fmt.Errorf("%s was never started", n.id)
	}
	return syscall.Kill(-n.cmd.Process.Pid, sig)
}

// kill SIGKILLs n and waits (bounded) until it is gone.
func (n *trioNode) kill() error {
	if !n.running() {
		return nil
	}
	n.signal(syscall.SIGKILL)
	n.mu.Lock()
	exited := n.exited
	n.mu.Unlock()
	select {
	case <-exited:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s still running 10s after SIGKILL", n.id)
	}
}

// stop sends sig (SIGTERM: a clean stop) and waits (bounded) until n is
// gone, killing it if it outlives the bound.
func (n *trioNode) stop(sig syscall.Signal) error {
	if !n.running() {
		return nil
	}
	if err := n.signal(sig); err != nil {
		return err
	}
	n.mu.Lock()
	exited := n.exited
	n.mu.Unlock()
	select {
	case <-exited:
		return nil
	case <-time.After(10 * time.Second):
		n.kill()
		return fmt.Errorf("%s still running 10s after %v", n.id, sig)
	}
}

func (t *trio) killAll() {
	for _, n := range t.nodes {
		n.signal(syscall.SIGCONT) // a stopped process would outlive SIGKILL's wait otherwise
		n.kill()
	}
}

// tail is the last lines of n's current log.
func (n *trioNode) tail(lines int) string {
	b, err := os.ReadFile(n.logPath())
	if err != nil {
		return err.Error()
	}
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}

// portClash says whether some node's log shows it lost a port race.
func (t *trio) portClash() bool {
	for _, n := range t.nodes {
		if strings.Contains(n.tail(20), "address already in use") {
			return true
		}
	}
	return false
}

func lastLine(s string) string {
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

func (t *trio) consoles() []string {
	var cs []string
	for _, n := range t.nodes {
		if n.console != "" {
			cs = append(cs, n.console)
		}
	}
	return cs
}

// memberStatus is the part of GET /status the drill reads.
type memberStatus struct {
	Role               string  `json:"role"`
	State              string  `json:"state"`
	Protected          bool    `json:"protected"`
	LastCommittedEpoch uint64  `json:"last_committed_epoch"`
	EpochsPerSecond    float64 `json:"epochs_per_second"`
	PauseP50Ms         float64 `json:"pause_p50_ms"`
	PauseP99Ms         float64 `json:"pause_p99_ms"`
	VerifiedEpochs     uint64  `json:"verified_epochs"`
	DigestMismatches   uint64  `json:"digest_mismatches"`
	Waiting            string  `json:"waiting_reason"` // a witness's
	Cluster            struct {
		Generation uint64 `json:"generation"`
		Primary    string `json:"primary"`
		Leader     string `json:"raft_leader"`
		Protected  bool   `json:"protected"`
		Epoch      uint64 `json:"epoch"`
		CanRelease bool   `json:"can_release"`
		Waiting    string `json:"waiting_reason"`
	} `json:"cluster"`
}

// fetchStatus reads a node's status, with the operator's certificate
// when the trio runs over TLS.
func (t *trio) fetchStatus(api string) (memberStatus, error) {
	var st memberStatus
	resp, err := t.statusHTTP.Get(t.statusScheme + "://" + api + "/status")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("status %s: %s", api, resp.Status)
	}
	return st, json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&st)
}

// protectedPrimary returns the node that is primary, running and
// protected with the cluster agreeing, and its status; ok is false while
// there is none.
func (t *trio) protectedPrimary() (*trioNode, memberStatus, bool) {
	for _, n := range t.nodes {
		if n.role == "witness" || !n.running() {
			continue
		}
		st, err := t.fetchStatus(n.api)
		if err == nil && st.Role == "primary" && st.State == "running" && st.Protected &&
			st.Cluster.Protected && st.Cluster.Primary == n.id && st.Cluster.CanRelease {
			return n, st, true
		}
	}
	return nil, memberStatus{}, false
}

// waitProtected waits until some node is a protected primary whose
// secondary (the other member) is running and says it is secondary.
func (t *trio) waitProtected(ctx context.Context, timeout time.Duration) (*trioNode, memberStatus, error) {
	deadline := time.Now().Add(timeout)
	for {
		for _, n := range t.nodes {
			if !n.running() {
				return nil, memberStatus{}, fmt.Errorf("%s exited: %s", n.id, lastLine(n.tail(5)))
			}
			if strings.Contains(n.tail(5), "cannot boot the guest") {
				return nil, memberStatus{}, fmt.Errorf("%s: %s", n.id, lastLine(n.tail(5)))
			}
		}
		if p, st, ok := t.protectedPrimary(); ok {
			for _, s := range t.nodes {
				if s == p || s.role == "witness" || !s.running() {
					continue
				}
				if sst, err := t.fetchStatus(s.api); err == nil && sst.Role == "secondary" {
					return p, st, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return nil, memberStatus{}, fmt.Errorf("no protected primary within %v", timeout)
		}
		select {
		case <-ctx.Done():
			return nil, memberStatus{}, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// ---- the kv client ----

// kvReply is one reply a client saw, with where and when.
type kvReply struct {
	text string // after "<client>:<seq> "
	addr string
	at   time.Time
}

// kvClient is one kv client id talking to whichever node serves the
// console. It keeps one request outstanding and resends it (same seq)
// until it sees the reply, across connections: the guest answers a seq
// it has already applied from its record, so a retry is never applied
// twice.
type kvClient struct {
	id    string
	addrs []string
	next  int
	seq   uint64
	// patience bounds one request of load (0: drillFailoverLimit+5s);
	// backoff is the pause after a node turned the client away (0: none);
	// pace is load's pause between requests (0: none).
	patience, backoff, pace time.Duration

	conn net.Conn
	r    *bufio.Reader
	addr string
	tls  *trust.Identity // nil: plaintext
}

func newKVClient(id string, addrs []string, tls *trust.Identity) *kvClient {
	return &kvClient{id: id, addrs: addrs, tls: tls}
}

func (c *kvClient) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn, c.r = nil, nil
	}
}

// connect dials the addresses in turn from c.next until one accepts.
// A node that is not primary says so on its first line; that is found
// when reading the reply, so nothing is probed here.
func (c *kvClient) connect(deadline time.Time) error {
	for time.Now().Before(deadline) {
		for range c.addrs {
			a := c.addrs[c.next%len(c.addrs)]
			c.next++
			dctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			conn, err := trust.Dial(dctx, c.tls, a, "")
			cancel()
			if err == nil {
				c.conn, c.r, c.addr = conn, bufio.NewReader(conn), a
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.New("no console accepted a connection")
}

// do sends cmd as the client's next request and returns its reply (the
// text after "<client>:<seq> "), resending until deadline.
func (c *kvClient) do(ctx context.Context, cmd string, deadline time.Time) (kvReply, error) {
	c.seq++
	prefix := fmt.Sprintf("%s:%d ", c.id, c.seq)
	line := prefix + cmd + "\n"
	for {
		if err := ctx.Err(); err != nil {
			return kvReply{}, err
		}
		if time.Now().After(deadline) {
			return kvReply{}, fmt.Errorf("%s%s: no reply by the deadline", prefix, cmd)
		}
		if c.conn == nil {
			if err := c.connect(deadline); err != nil {
				return kvReply{}, err
			}
		}
		d := time.Now().Add(drillRequestTimeout)
		if deadline.Before(d) {
			d = deadline
		}
		rep, err := c.attempt(line, prefix, d)
		if err == nil {
			return rep, nil
		}
		// Lost, turned away or silent: the next node in turn.
		c.close()
		if c.backoff > 0 {
			time.Sleep(c.backoff)
		}
	}
}

// doBatch sends idempotent requests (GETs) pipelined, each with its own
// seq, and returns their replies in order. Requests whose reply is lost
// with a connection are sent again under new seqs (reading twice is
// harmless), so a batch survives a failover.
func (c *kvClient) doBatch(ctx context.Context, cmds []string, deadline time.Time) ([]kvReply, error) {
	out := make([]kvReply, len(cmds))
	todo := make([]int, len(cmds))
	for i := range todo {
		todo[i] = i
	}
	for len(todo) > 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s: %d of %d requests unanswered by the deadline", c.id, len(todo), len(cmds))
		}
		if c.conn == nil {
			if err := c.connect(deadline); err != nil {
				return nil, err
			}
		}
		want := map[string]int{} // "<client>:<seq>" -> index in cmds
		var b strings.Builder
		for _, i := range todo {
			c.seq++
			tag := fmt.Sprintf("%s:%d", c.id, c.seq)
			want[tag] = i
			b.WriteString(tag + " " + cmds[i] + "\n")
		}
		dl := time.Now().Add(drillRequestTimeout + time.Duration(len(todo))*time.Millisecond)
		if deadline.Before(dl) {
			dl = deadline
		}
		c.conn.SetDeadline(dl)
		_, err := io.WriteString(c.conn, b.String())
		for err == nil && len(want) > 0 {
			var l string
			if l, err = c.r.ReadString('\n'); err != nil {
				break
			}
			l = strings.TrimRight(l, "\r\n")
			if strings.HasPrefix(l, "ERR not the primary") {
				err = errors.New("not the primary")
				break
			}
			tag, text, _ := strings.Cut(l, " ")
			if i, ok := want[tag]; ok {
				out[i] = kvReply{text: text, addr: c.addr, at: time.Now()}
				delete(want, tag)
			}
		}
		todo = todo[:0]
		for _, i := range want {
			todo = append(todo, i)
		}
		slices.Sort(todo)
		if err != nil {
			c.close()
		}
	}
	return out, nil
}

// attempt sends line once on the current connection and reads until the
// reply with the given prefix, an error or the deadline.
func (c *kvClient) attempt(line, prefix string, deadline time.Time) (kvReply, error) {
	c.conn.SetDeadline(deadline)
	if _, err := io.WriteString(c.conn, line); err != nil {
		return kvReply{}, err
	}
	for {
		l, err := c.r.ReadString('\n')
		if err != nil {
			return kvReply{}, err
		}
		l = strings.TrimRight(l, "\r\n")
		if strings.HasPrefix(l, "ERR not the primary") {
			return kvReply{}, errors.New("not the primary")
		}
		// Every client of a console sees every reply: pick out ours.
		if text, ok := strings.CutPrefix(l, prefix); ok {
			return kvReply{text: text, addr: c.addr, at: time.Now()}, nil
		}
	}
}

// ---- one run's load and its check ----

// runLog is what the clients of one run were told.
type runLog struct {
	mu      sync.Mutex
	sets    map[string]setRec // key -> the one SET of it
	gets    []getRec
	replies []kvReply // every reply, in the order seen per client
	errs    []string
}

type setRec struct {
	value string
	acked bool
	ackAt time.Time
}

type getRec struct {
	key    string
	reply  string
	sentAt time.Time
}

func newRunLog() *runLog { return &runLog{sets: map[string]setRec{}} }

// load runs one client until ctx ends: SET k_i v_i for fresh keys, and
// every third request a GET of a key it wrote before (which must answer
// its value) or of the key it writes next (which must not exist yet).
func load(ctx context.Context, c *kvClient, keyPrefix, valPrefix string, rng *rand.Rand, lg *runLog) {
	defer c.close()
	for i := 0; ; i++ {
		var cmd, key, val string
		isGet := i%3 == 2
		if isGet {
			n := (i/3 + 1) * 2 // SETs sent so far: keys 0..n-1 exist, n is next
			k := rng.IntN(n + 1)
			key = fmt.Sprintf("%s%d", keyPrefix, k)
			cmd = "GET " + key
		} else {
			key = fmt.Sprintf("%s%d", keyPrefix, i-i/3)
			val = fmt.Sprintf("%sv%d-%x", valPrefix, i, rng.Uint32())
			cmd = "SET " + key + " " + val
			lg.mu.Lock()
			lg.sets[key] = setRec{value: val}
			lg.mu.Unlock()
		}
		sent := time.Now()
		if c.pace > 0 && i > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(c.pace):
			}
		}
		patience := c.patience
		if patience == 0 {
			patience = drillFailoverLimit + 5*time.Second
		}
		rep, err := c.do(ctx, cmd, time.Now().Add(patience))
		if err != nil {
			if ctx.Err() == nil {
				lg.mu.Lock()
				lg.errs = append(lg.errs, err.Error())
				lg.mu.Unlock()
			}
			return
		}
		lg.mu.Lock()
		lg.replies = append(lg.replies, rep)
		if isGet {
			lg.gets = append(lg.gets, getRec{key: key, reply: rep.text, sentAt: sent})
		} else if rep.text == "OK" {
			lg.sets[key] = setRec{value: val, acked: true, ackAt: rep.at}
		} else {
			lg.errs = append(lg.errs, fmt.Sprintf("SET %s: %q", key, rep.text))
		}
		lg.mu.Unlock()
	}
}

// checkState compares what the clients were told with the final state
// (final[key] is the GET reply after failover, "NOTFOUND" or "OK v").
// lost counts acknowledged SETs whose value is not there; divergent
// counts GET replies the final state contradicts (each key is written
// once, so a value seen must be the final one, and NOTFOUND is wrong
// for a key whose SET was acknowledged before the GET was sent).
func checkState(sets map[string]setRec, gets []getRec, final map[string]string) (lost, divergent int, detail []string) {
	keys := make([]string, 0, len(sets))
	for k := range sets {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		s := sets[k]
		if s.acked && final[k] != "OK "+s.value {
			lost++
			detail = append(detail, fmt.Sprintf("lost: SET %s %s was acknowledged; now %q", k, s.value, final[k]))
		}
	}
	for _, g := range gets {
		s, written := sets[g.key]
		switch {
		case strings.HasPrefix(g.reply, "OK "):
			if !written || g.reply != "OK "+s.value || final[g.key] != g.reply {
				divergent++
				detail = append(detail, fmt.Sprintf("divergent: GET %s answered %q; now %q", g.key, g.reply, final[g.key]))
			}
		case g.reply == "NOTFOUND":
			if written && s.acked && s.ackAt.Before(g.sentAt) {
				divergent++
				detail = append(detail, fmt.Sprintf("divergent: GET %s answered NOTFOUND after its SET was acknowledged", g.key))
			}
		default:
			divergent++
			detail = append(detail, fmt.Sprintf("divergent: GET %s answered %q", g.key, g.reply))
		}
	}
	return lost, divergent, detail
}

// firstReplyAfter is the earliest reply seen after t from a console other
// than skip (the killed node's); ok is false when there was none.
func firstReplyAfter(replies []kvReply, t time.Time, skip string) (time.Time, bool) {
	var first time.Time
	for _, r := range replies {
		if r.at.After(t) && r.addr != skip && (first.IsZero() || r.at.Before(first)) {
			first = r.at
		}
	}
	return first, !first.IsZero()
}

// percentile is the p-quantile (0..1) of sorted xs by nearest rank.
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// ---- the drill ----

type runResult struct {
	Run       int     `json:"run"`
	Killed    string  `json:"killed"`
	NewPri    string  `json:"new_primary,omitempty"`
	Gen       uint64  `json:"generation,omitempty"`
	RTOMs     float64 `json:"rto_ms"`
	Acked     int     `json:"acked_writes"`
	Lost      int     `json:"lost"`
	Divergent int     `json:"divergent"`
	// Verified and Mismatches are the killed primary's replica proof.
	Verified   uint64 `json:"verified_epochs"`
	Mismatches uint64 `json:"digest_mismatches"`
	OK         bool   `json:"ok"`
	Reason     string `json:"reason,omitempty"`
}

type rtoSummary struct {
	P50 float64 `json:"p50"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

type drillSummary struct {
	Runs             int         `json:"runs"`
	Guest            string      `json:"guest"`
	Seed             uint64      `json:"seed"`
	RTOMs            rtoSummary  `json:"rto_ms"`
	AckedWrites      int         `json:"acked_writes"`
	AckedWritesLost  int         `json:"acked_writes_lost"`
	DivergentReplies int         `json:"divergent_replies"`
	FailedRuns       int         `json:"failed_runs"`
	VerifiedEpochs   uint64      `json:"verified_epochs"`
	DigestMismatches uint64      `json:"digest_mismatches"`
	Dir              string      `json:"dir"`
	Results          []runResult `json:"results,omitempty"`
	// Scenarios: the results of --scenario, one per scenario run.
	Scenarios []scenarioResult `json:"scenarios,omitempty"`
}

func (s drillSummary) ok() bool {
	return s.FailedRuns == 0 && s.AckedWritesLost == 0 && s.DivergentReplies == 0 && s.DigestMismatches == 0
}

func (s drillSummary) print(w io.Writer) {
	if len(s.Scenarios) > 0 {
		printScenarios(w, s)
		return
	}
	fmt.Fprintf(w, "\n%d runs on %s (seed %d): RTO p50 %.0f ms, p99 %.0f ms, max %.0f ms; %d acknowledged writes, %d lost, %d divergent replies, %d failed runs; %d epochs verified, %d digest mismatches\n",
		s.Runs, s.Guest, s.Seed, s.RTOMs.P50, s.RTOMs.P99, s.RTOMs.Max, s.AckedWrites, s.AckedWritesLost, s.DivergentReplies, s.FailedRuns, s.VerifiedEpochs, s.DigestMismatches)
	for _, r := range s.Results {
		if !r.OK {
			fmt.Fprintf(w, "  run %d failed: %s\n", r.Run, r.Reason)
		}
	}
}

// drill runs failover runs against one trio, restarting it when a run
// leaves it unusable.
type drill struct {
	bin, kind, memory string
	image             string
	dir               string
	keepDir           bool
	rng               *rand.Rand
	seed              uint64
	out               io.Writer
	clients           int
	trios             int
	t                 *trio
	// loadPatience, loadBackoff and loadPace set the kv clients' (kvClient).
	loadPatience, loadBackoff, loadPace time.Duration
	// narrate, when set, is told what happens (the demo's voice).
	narrate func(format string, a ...any)
	// certDir holds the CA and the certificates of a, b, w and the
	// operator; tls is the operator's identity. "" and nil: plaintext.
	certDir string
	tls     *trust.Identity
}

func newDrill(kind, memory, keep string, seed uint64, out io.Writer, plaintext bool) (*drill, error) {
	bin, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find this binary: %w", err)
	}
	d := &drill{bin: bin, kind: kind, memory: memory, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		seed: seed, out: out, clients: 2}
	if kind == kvm.Kind {
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
	if keep != "" {
		if err := os.MkdirAll(keep, 0o755); err != nil {
			return nil, err
		}
		d.dir, d.keepDir = keep, true
	} else if d.dir, err = os.MkdirTemp("", "tandem-drill-"); err != nil {
		return nil, err
	}
	if !plaintext {
		// The secure path: a CA of the drill's own, a certificate per
		// node ID and one for the drill's clients.
		d.certDir = filepath.Join(d.dir, "tls")
		if err := makeClusterCerts(d.certDir, "a", "b", "w", drillOperator); err != nil {
			return nil, fmt.Errorf("drill certificates: %w", err)
		}
		if d.tls, err = loadCert(d.certDir, drillOperator); err != nil {
			return nil, fmt.Errorf("drill certificates: %w", err)
		}
	}
	return d, nil
}

func (d *drill) close() {
	if d.t != nil {
		d.t.killAll()
	}
}

// cleanup removes the temp dir unless asked to keep it or something failed.
func (d *drill) cleanup(failed bool) {
	if !d.keepDir && !failed {
		os.RemoveAll(d.dir)
	}
}

func (d *drill) say(format string, a ...any) {
	if d.narrate != nil {
		d.narrate(format, a...)
	}
}

// freshTrio starts a new cluster in a new subdirectory, retrying on a
// port race, and waits until it is protected.
func (d *drill) freshTrio(ctx context.Context) (*trioNode, memberStatus, error) {
	if d.t != nil {
		d.t.killAll()
	}
	var last error
	for attempt := 0; attempt < 3; attempt++ {
		d.trios++
		t, err := newTrio(d.bin, filepath.Join(d.dir, fmt.Sprintf("trio%d", d.trios)), d.kind, d.memory)
		if err != nil {
			return nil, memberStatus{}, err
		}
		t.image = d.image
		t.setTLS(d.certDir, d.tls)
		if err := os.MkdirAll(t.dir, 0o755); err != nil {
			return nil, memberStatus{}, err
		}
		d.t = t
		if err := t.startAll(); err != nil {
			return nil, memberStatus{}, err
		}
		p, st, err := t.waitProtected(ctx, drillStartTimeout)
		if err == nil {
			return p, st, nil
		}
		last = err
		clash := t.portClash()
		t.killAll()
		if !clash {
			break
		}
	}
	return nil, memberStatus{}, fmt.Errorf("trio did not start: %v (logs in %s)", last, d.t.dir)
}

func (d *drill) logTails() string {
	var b strings.Builder
	for _, n := range d.t.nodes {
		fmt.Fprintf(&b, "---- %s (%s)\n%s\n", n.logPath(), n.role, n.tail(15))
	}
	return b.String()
}

func (d *drill) run(runs int) drillSummary {
	ctx := context.Background()
	sum := drillSummary{Runs: runs, Guest: d.kind, Seed: d.seed, Dir: d.dir}
	fmt.Fprintf(d.out, "tandem drill: %d runs, %s guest (%s), seed %d, logs in %s\n", runs, d.kind, d.memory, d.seed, d.dir)
	fmt.Fprintf(d.out, "%4s  %-6s  %-7s  %8s  %6s  %5s  %9s  %s\n", "run", "killed", "primary", "rto_ms", "acked", "lost", "divergent", "ok")
	var rtos []float64
	needFresh := true
	for i := 1; i <= runs; i++ {
		var r runResult
		if needFresh {
			if _, _, err := d.freshTrio(ctx); err != nil {
				r = runResult{Run: i, Reason: err.Error()}
				d.record(&sum, r)
				fmt.Fprintf(d.out, "%s\n", d.logTails())
				continue
			}
			needFresh = false
		}
		r, needFresh = d.once(ctx, i)
		if r.OK {
			rtos = append(rtos, r.RTOMs)
		} else {
			fmt.Fprintf(d.out, "run %d failed: %s\nlogs in %s; their tails:\n%s", i, r.Reason, d.t.dir, d.logTails())
		}
		d.record(&sum, r)
	}
	slices.Sort(rtos)
	if len(rtos) > 0 {
		sum.RTOMs = rtoSummary{P50: percentile(rtos, 0.5), P99: percentile(rtos, 0.99), Max: rtos[len(rtos)-1]}
	}
	d.cleanup(!sum.ok())
	return sum
}

// tally adds one run's writes and verdict to the summary and returns the
// verdict as the report prints it.
func (sum *drillSummary) tally(acked, lost, divergent int, ok bool) string {
	sum.AckedWrites += acked
	sum.AckedWritesLost += lost
	sum.DivergentReplies += divergent
	if !ok {
		sum.FailedRuns++
		return "FAIL"
	}
	return "ok"
}

func (d *drill) record(sum *drillSummary, r runResult) {
	sum.Results = append(sum.Results, r)
	sum.VerifiedEpochs += r.Verified
	sum.DigestMismatches += r.Mismatches
	ok := sum.tally(r.Acked, r.Lost, r.Divergent, r.OK)
	rto := "-"
	if r.RTOMs > 0 {
		rto = strconv.FormatFloat(r.RTOMs, 'f', 0, 64)
	}
	fmt.Fprintf(d.out, "%4d  %-6s  %-7s  %8s  %6d  %5d  %9d  %s\n", r.Run, r.Killed, r.NewPri, rto, r.Acked, r.Lost, r.Divergent, ok)
}

// once is one run on a protected trio: load, kill -9 the primary at a
// random moment, measure the RTO, check the state, restart the old
// primary and wait for protection. fresh says the trio must be rebuilt.
func (d *drill) once(ctx context.Context, run int) (r runResult, fresh bool) {
	r.Run = run
	p, pst, err := d.t.waitProtected(ctx, drillReprotect)
	if err != nil {
		r.Reason = err.Error()
		return r, true
	}
	r.Killed = p.id
	lg, stopLoad := d.startLoad(ctx, run, p)
	defer stopLoad()

	delay := 300*time.Millisecond + time.Duration(d.rng.Int64N(int64(1700*time.Millisecond)))
	d.say("the guest serves kv requests; the primary is %s (generation %d, epoch %d); killing it in %v",
		p.id, pst.Cluster.Generation, pst.LastCommittedEpoch, delay.Round(time.Millisecond))
	time.Sleep(delay)
	lg.mu.Lock()
	ackedBefore := len(lg.replies)
	lg.mu.Unlock()
	// The primary's replica proof over its reign (its epoch loop's
	// counters), read just before it dies: every run's primary is killed,
	// so the runs add up to every reign but the last one.
	if st, err := d.t.fetchStatus(p.api); err == nil {
		r.Verified, r.Mismatches = st.VerifiedEpochs, st.DigestMismatches
	}
	killAt := time.Now()
	if err := p.kill(); err != nil {
		r.Reason = err.Error()
		return r, true
	}
	d.say("SIGKILL sent to %s after %d replies", p.id, ackedBefore)

	// The RTO is the first reply from another node's console.
	var rto time.Duration
	deadline := killAt.Add(drillFailoverLimit)
	for {
		lg.mu.Lock()
		first, ok := firstReplyAfter(lg.replies, killAt, p.console)
		errs := slices.Clone(lg.errs)
		lg.mu.Unlock()
		if ok {
			rto = first.Sub(killAt)
			break
		}
		if len(errs) > 0 || time.Now().After(deadline) {
			r.Reason = fmt.Sprintf("no failover within %v", drillFailoverLimit)
			if len(errs) > 0 {
				r.Reason = "client: " + errs[0]
			}
			return r, true
		}
		time.Sleep(5 * time.Millisecond)
	}
	r.RTOMs = float64(rto.Microseconds()) / 1000
	// A little load on the new primary too, then stop and check.
	time.Sleep(150 * time.Millisecond)
	stopLoad()

	np, npst, err := d.currentPrimary()
	if err != nil {
		r.Reason = err.Error()
		return r, true
	}
	r.NewPri, r.Gen = np.id, npst.Cluster.Generation
	d.say("%s is primary now (generation %d); first reply %d ms after the kill", np.id, npst.Cluster.Generation, int(r.RTOMs))

	lost, div, detail, err := d.verify(ctx, run, lg)
	if err != nil {
		r.Reason = "verify: " + err.Error()
		return r, true
	}
	for _, s := range lg.sets {
		if s.acked {
			r.Acked++
		}
	}
	r.Lost, r.Divergent = lost, div
	if len(detail) > 0 {
		r.Reason = strings.Join(detail[:min(len(detail), 3)], "; ")
	}
	lg.mu.Lock()
	if len(lg.errs) > 0 && r.Reason == "" {
		r.Reason = "client: " + lg.errs[0]
	}
	lg.mu.Unlock()
	d.say("%d acknowledged writes checked on %s: %d missing, %d contradicted replies", r.Acked, np.id, lost, div)

	// The old primary comes back as secondary with the same command.
	if err := d.t.start(p); err != nil {
		r.Reason = err.Error()
		return r, true
	}
	t0 := time.Now()
	if _, st, err := d.t.waitProtected(ctx, drillReprotect); err != nil {
		r.Reason = fmt.Sprintf("restarted %s: %v", p.id, err)
		return r, true
	} else {
		d.say("%s restarted with the same command: it rejoined as secondary; protected again in %v (epoch %d)",
			p.id, time.Since(t0).Round(time.Millisecond), st.LastCommittedEpoch)
	}
	if r.Mismatches > 0 && r.Reason == "" {
		r.Reason = fmt.Sprintf("%s's replica failed verification %d times", p.id, r.Mismatches)
	}
	r.OK = r.Reason == "" && lost == 0 && div == 0 && r.Mismatches == 0
	// A failed run leaves a guest whose state is in question: rebuild.
	return r, !r.OK
}

// startLoad starts the drill's kv clients of one run, beginning at the
// primary p's console; stop ends them and waits until they have.
func (d *drill) startLoad(ctx context.Context, run int, p *trioNode) (lg *runLog, stop func()) {
	lg = newRunLog()
	lctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for c := 0; c < d.clients; c++ {
		kc := newKVClient(fmt.Sprintf("dc%d", c), d.t.consoles(), d.tls)
		kc.seq = runSeqBase(run)
		kc.next = max(0, slices.Index(kc.addrs, p.console))
		kc.patience, kc.backoff, kc.pace = d.loadPatience, d.loadBackoff, d.loadPace
		rng := rand.New(rand.NewPCG(d.rng.Uint64(), uint64(c)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			load(lctx, kc, fmt.Sprintf("k%d_", c), fmt.Sprintf("r%d", run), rng, lg)
		}()
	}
	return lg, func() { cancel(); wg.Wait() }
}

// currentPrimary is the running node the cluster names primary and that
// says it runs the guest.
func (d *drill) currentPrimary() (*trioNode, memberStatus, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, n := range d.t.nodes {
			if n.role == "witness" || !n.running() {
				continue
			}
			if st, err := d.t.fetchStatus(n.api); err == nil && st.Role == "primary" && st.State == "running" && st.Cluster.Primary == n.id {
				return n, st, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, memberStatus{}, errors.New("no node says it is the running primary")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// verify reads back every key the run wrote, through a fresh client id,
// and checks the run's log against it.
func (d *drill) verify(ctx context.Context, run int, lg *runLog) (lost, divergent int, detail []string, err error) {
	c := newKVClient("dv", d.t.consoles(), d.tls)
	c.seq = runSeqBase(run)
	defer c.close()
	lg.mu.Lock()
	keys := make([]string, 0, len(lg.sets))
	for k := range lg.sets {
		keys = append(keys, k)
	}
	for _, g := range lg.gets {
		if _, ok := lg.sets[g.key]; !ok {
			keys = append(keys, g.key)
		}
	}
	lg.mu.Unlock()
	slices.Sort(keys)
	keys = slices.Compact(keys)
	final := map[string]string{}
	for len(keys) > 0 {
		batch := keys[:min(len(keys), 64)]
		keys = keys[len(batch):]
		cmds := make([]string, len(batch))
		for i, k := range batch {
			cmds[i] = "GET " + k
		}
		reps, err := c.doBatch(ctx, cmds, time.Now().Add(drillFailoverLimit))
		if err != nil {
			return 0, 0, nil, err
		}
		for i, k := range batch {
			final[k] = reps[i].text
		}
	}
	lg.mu.Lock()
	lost, divergent, detail = checkState(lg.sets, lg.gets, final)
	lg.mu.Unlock()
	// The next run writes the same key names: delete them, so the guest's
	// table (a fixed number of slots) holds one run's keys at a time.
	var dels []string
	for k := range final {
		dels = append(dels, "DEL "+k)
	}
	for len(dels) > 0 {
		batch := dels[:min(len(dels), 64)]
		dels = dels[len(batch):]
		if _, err := c.doBatch(ctx, batch, time.Now().Add(drillFailoverLimit)); err != nil {
			return lost, divergent, detail, fmt.Errorf("delete the run's keys: %w", err)
		}
	}
	return lost, divergent, detail, nil
}

// runSeqBase is where a run's clients start their seqs: the drill's
// client ids are the same every run (the guest has a fixed number of
// client slots), and a seq must rise above every earlier run's.
func runSeqBase(run int) uint64 { return uint64(run) << 32 }
