package test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/e2e"
)

// tandemBin is the binary under test: $TANDEM_BIN (make test sets it) or
// one built once for this package by TestMain.
var tandemBin string

// Parallel tests: a test that mostly waits on its processes and whose
// verdict survives a second's stall (a pair's failover, the drill's
// double failures with their 10-15 s windows, trust deadlines of
// seconds) calls t.Parallel(), and runs beside one other (-parallel
// defaults to GOMAXPROCS) once the sequential ones are done. A test that
// a brief stall can fail stays sequential: a migration's downtime against
// its 300 ms limit, link cuts and repeated kill -9 on a raft trio (a
// 150 ms lease expired by a busy CPU leaves the cluster unprotected, and
// then, rightly, nobody takes over). Ports stay apart across parallel
// tests: freeAddr never hands an address out twice in this process (a
// drill picks its own, and starts its trio again on fresh ones if one was
// taken).

// kinds are the guest backends every end-to-end test runs on.
var kinds = []string{"synth", "kvm"}

// longRun is TANDEM_LONG=1: the full-size cases (1 GiB guests, a 60 s
// flush stall) instead of the ones sized for make test.
var longRun = os.Getenv("TANDEM_LONG") == "1"

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	tandemBin = os.Getenv("TANDEM_BIN")
	if tandemBin == "" {
		dir, err := os.MkdirTemp("", "tandem-e2e-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "e2e: temp dir:", err)
			return 1
		}
		defer os.RemoveAll(dir)
		tandemBin = filepath.Join(dir, "tandem")
		build := exec.Command("go", "build", "-o", tandemBin, "../cmd/tandem")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: building tandem:", err)
			return 1
		}
	}
	// The KVM backend finds the micro-guest through $TANDEM_KVM_IMAGE or
	// relative to the working directory; tests run in test/, so say where.
	if os.Getenv("TANDEM_KVM_IMAGE") == "" {
		if img, err := filepath.Abs("../guest/kvm/microguest/microguest.bin"); err == nil {
			if _, err := os.Stat(img); err == nil {
				os.Setenv("TANDEM_KVM_IMAGE", img)
			}
		}
	}
	return m.Run()
}

var kvmOnce struct {
	sync.Once
	why string
}

// skipUnlessKind skips a kvm (sub)test with a one-line reason when this
// host cannot run the KVM guest.
func skipUnlessKind(t testing.TB, kind string) {
	t.Helper()
	if kind != "kvm" {
		return
	}
	kvmOnce.Do(func() {
		f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
		if err != nil {
			kvmOnce.why = fmt.Sprintf("kvm guest unusable: %v", err)
			return
		}
		f.Close()
		img := os.Getenv("TANDEM_KVM_IMAGE")
		if img == "" {
			kvmOnce.why = "kvm guest unusable: micro-guest image not built (make guest-image)"
			return
		}
		if _, err := os.Stat(img); err != nil {
			kvmOnce.why = fmt.Sprintf("kvm guest unusable: image: %v", err)
		}
	})
	if kvmOnce.why != "" {
		t.Skip(kvmOnce.why)
	}
}

// forEachKind runs f as a subtest per guest kind.
func forEachKind(t *testing.T, f func(t *testing.T, kind string)) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			skipUnlessKind(t, kind)
			f(t, kind)
		})
	}
}

// freeAddr returns a loopback address nobody listened on a moment ago and
// that no earlier call of this test binary returned (e2e.FreeAddr). A
// race with another process is possible but rare; start retries.
func freeAddr(t testing.TB) string {
	t.Helper()
	a, err := e2e.FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// node is one tandem process started by a test: the harness's process
// (e2e.Proc) with the addresses the test talks to.
type node struct {
	*e2e.Proc
	t       testing.TB
	name    string
	api     string
	console string
	data    string // receive --listen address
}

// startProc starts tandem with args, output to a log file in the test's
// temp dir; cleanup kills the process group and prints the log if the
// test failed.
func startProc(t testing.TB, name string, args ...string) *node {
	t.Helper()
	return startCmd(t, name, append([]string{tandemBin}, args...), args)
}

// startProcIn is startProc inside network namespace ns (`ip netns exec`
// execs tandem in place, so the process and its group are tandem's).
func startProcIn(t testing.TB, ns, name string, args ...string) *node {
	t.Helper()
	return startCmd(t, name, append([]string{"ip", "netns", "exec", ns, tandemBin}, args...), args)
}

func startCmd(t testing.TB, name string, argv, args []string) *node {
	t.Helper()
	p, err := e2e.StartProc(name, filepath.Join(t.TempDir(), name+".log"), argv...)
	if err != nil {
		t.Fatal(err)
	}
	return adopt(t, p, args)
}

// adopt makes p a test's node: cleanup kills it and prints its log (with
// its command line args) if the test failed.
func adopt(t testing.TB, p *e2e.Proc, args []string) *node {
	n := &node{Proc: p, t: t, name: p.Name()}
	t.Cleanup(func() {
		n.kill()
		if t.Failed() {
			t.Logf("---- %s log (tandem %s)\n%s", n.name, strings.Join(args, " "), n.log())
		}
	})
	return n
}

// kill SIGKILLs the node's process group and waits (bounded) for it.
func (n *node) kill() {
	if err := n.Kill(); err != nil {
		n.t.Errorf("%v", err)
	}
}

func (n *node) log() string { return n.Log() }

func (n *node) running() bool { return n.Running() }

// waitReady polls /status until the node answers, the process exits or
// the deadline passes.
func (n *node) waitReady(timeout time.Duration) error {
	return e2e.WaitReady(context.Background(), n.Proc, func(context.Context) error {
		_, err := getStatus(n.api, false)
		return err
	}, timeout)
}

// startWithPorts starts tandem with fresh --api and --console addresses
// (and --listen for receive), retrying when a port was taken in between.
func startWithPorts(t testing.TB, name string, listen bool, args ...string) *node {
	t.Helper()
	return startWithPortsTLS(t, name, listen, nil, "", args...)
}

// startWithPortsTLS is startWithPorts with the TLS flags of pki's
// certificate cert (none if pki is nil); the harness then talks to the
// node's API and console as pki's operator.
func startWithPortsTLS(t testing.TB, name string, listen bool, pki *testPKI, cert string, args ...string) *node {
	t.Helper()
	var client *tls.Config
	if pki != nil {
		args = append(append([]string(nil), args...), pki.nodeArgs(cert)...)
		client = pki.client(operator)
	}
	return startOnFreshPorts(t, name, listen, client, args...)
}

// startOnFreshPorts starts tandem with args on fresh --api and --console
// addresses (and --listen when listen), talking to them over TLS with
// client (nil: plaintext), and starts it again on fresh ones when another
// process took a port in between (e2e.StartFresh).
func startOnFreshPorts(t testing.TB, name string, listen bool, client *tls.Config, args ...string) *node {
	t.Helper()
	f, err := e2e.StartFresh(context.Background(), e2e.FreshOptions{
		Name: name, Argv: append([]string{tandemBin}, args...), LogDir: t.TempDir(), Listen: listen,
		OnAddrs: func(api, con string) {
			if client != nil {
				useTLS(client, api, con)
			}
		},
		Ready: func(ctx context.Context, api string) error {
			_, err := getStatus(api, false)
			return err
		},
	})
	if err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	n := adopt(t, f.Proc, args)
	n.api, n.console, n.data = f.API, f.Console, f.Listen
	return n
}

// guestOpts are the guest flags of a source.
type guestOpts struct {
	memory, touch string
	workload      string
	dirtyRate     int
	vcpus         int
	disk          string
	allowFaults   bool
	snapshotDir   string
	pki           *testPKI // run with TLS, certificate "src"
}

func (o guestOpts) args(kind string) []string {
	a := []string{"run", "--guest", kind, "--memory", orStr(o.memory, "256MiB"), "--workload", orStr(o.workload, "dirty")}
	if o.touch != "" {
		a = append(a, "--touch", o.touch)
	}
	if o.workload == "" || o.workload == "dirty" {
		a = append(a, "--dirty-rate", fmt.Sprint(o.dirtyRate), "--dirty-pattern", "random")
	}
	if o.vcpus > 0 {
		a = append(a, "--vcpus", fmt.Sprint(o.vcpus))
	}
	if o.disk != "" {
		a = append(a, "--disk", o.disk)
	}
	if o.allowFaults {
		a = append(a, "--allow-faults")
	}
	if o.snapshotDir != "" {
		a = append(a, "--snapshot-dir", o.snapshotDir)
	}
	return a
}

func orStr(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func startSource(t testing.TB, kind string, o guestOpts) *node {
	t.Helper()
	return startWithPortsTLS(t, "source-"+kind, false, o.pki, "src", o.args(kind)...)
}

func startReceiver(t testing.TB, extra ...string) *node {
	t.Helper()
	return startWithPorts(t, "receiver", true, append([]string{"receive"}, extra...)...)
}

// breakdown and status mirror the JSON of GET /status (the command-line
// contract's field names).
type breakdown struct {
	PauseVCPUsMs      float64 `json:"pause_vcpus_ms"`
	FlushMs           float64 `json:"flush_ms"`
	DirtySyncMs       float64 `json:"dirty_sync_ms"`
	StateSaveMs       float64 `json:"state_save_ms"`
	FinalSendMs       float64 `json:"final_send_ms"`
	DestinationLoadMs float64 `json:"destination_load_ms"`
	ResumeMs          float64 `json:"resume_ms"`
	TotalMs           float64 `json:"total_ms"`
	Completed         bool    `json:"completed"`
}

type status struct {
	Role               string    `json:"role"`
	State              string    `json:"state"`
	GuestKind          string    `json:"guest_kind"`
	PageWrites         uint64    `json:"page_writes"`
	Paused             bool      `json:"paused"`
	Status             string    `json:"status"`
	TotalTimeMs        int64     `json:"total_time_ms"`
	SetupTimeMs        int64     `json:"setup_time_ms"`
	DowntimeMs         int64     `json:"downtime_ms"`
	ExpectedDowntimeMs int64     `json:"expected_downtime_ms"`
	TransferredBytes   uint64    `json:"transferred_bytes"`
	RemainingBytes     uint64    `json:"remaining_bytes"`
	TotalBytes         uint64    `json:"total_bytes"`
	ZeroPages          uint64    `json:"zero_pages"`
	NormalPages        uint64    `json:"normal_pages"`
	DirtyPagesRate     uint64    `json:"dirty_pages_rate"`
	Mbps               float64   `json:"mbps"`
	DirtySyncCount     uint64    `json:"dirty_sync_count"`
	ThrottlePercent    *int      `json:"throttle_percent"`
	CompletionAttempts int       `json:"completion_attempts"`
	AbortedCompletions int       `json:"aborted_completions"`
	Error              string    `json:"error"`
	DowntimeBreakdown  breakdown `json:"downtime_breakdown"`
	SwitchoverDigest   string    `json:"switchover_digest"`
	DestinationDigest  string    `json:"destination_digest"`
	MemoryDigest       string    `json:"memory_digest"`
	// Post-copy (docs/POSTCOPY.md).
	Round                  int     `json:"round"`
	PostcopyActive         bool    `json:"postcopy_active"`
	PostcopyPages          uint64  `json:"postcopy_pages"`
	PostcopyRemainingPages uint64  `json:"postcopy_remaining_pages"`
	PostcopyRequests       uint64  `json:"postcopy_requests"`
	PostcopyBlocktimeMs    []int64 `json:"postcopy_blocktime_ms"`
	PostcopyRefused        string  `json:"postcopy_refused"`
	PostcopySwitchReason   string  `json:"postcopy_switch_reason"`
	PostcopySwitchWhy      string  `json:"postcopy_switch_why"`
	PostcopyResumedAfterMs int64   `json:"postcopy_resumed_after_ms"`
	Attempts               []struct {
		ExpectedDowntimeMs float64 `json:"expected_downtime_ms"`
		FinalPages         uint64  `json:"final_pages"`
		FinalExpectedMs    float64 `json:"final_expected_ms"`
		ActualDowntimeMs   float64 `json:"actual_downtime_ms"`
		Outcome            string  `json:"outcome"`
	} `json:"attempts"`
}

func (s status) String() string {
	b, _ := json.Marshal(s)
	return string(b)
}

var httpClient = &http.Client{Timeout: 10 * time.Second}

// tlsPeers holds the API and console addresses of nodes that run with
// TLS, each with the client a test talks to it with (see tls_test.go);
// every other address is plaintext.
var tlsPeers sync.Map // addr -> *tlsPeer

type tlsPeer struct {
	cfg  *tls.Config
	http *http.Client
}

// useTLS makes the harness talk to addrs over TLS with cfg.
func useTLS(cfg *tls.Config, addrs ...string) {
	p := &tlsPeer{cfg: cfg, http: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}}
	for _, a := range addrs {
		tlsPeers.Store(a, p)
	}
}

// apiClient is the URL prefix and client for a node's API.
func apiClient(api string) (string, *http.Client) {
	if p, ok := tlsPeers.Load(api); ok {
		return "https://" + api, p.(*tlsPeer).http
	}
	return "http://" + api, httpClient
}

// dialAddr connects to a console (over TLS if the node runs with it).
func dialAddr(addr string, timeout time.Duration) (net.Conn, error) {
	if p, ok := tlsPeers.Load(addr); ok {
		return tls.DialWithDialer(&net.Dialer{Timeout: timeout}, "tcp", addr, p.(*tlsPeer).cfg)
	}
	return net.DialTimeout("tcp", addr, timeout)
}

func getStatus(api string, digest bool) (status, error) {
	var st status
	path := "/status"
	if digest {
		path += "?digest=1"
	}
	err := getJSON(api, path, &st)
	return st, err
}

// getJSON is GET path on the node whose API is at addr, its JSON answer
// decoded into out, through the typed client (over TLS when the node runs
// with it).
func getJSON(addr, path string, out any) error {
	return withCode("GET", path, nodeAPI(addr).Get(context.Background(), path, out))
}

// postJSON is POST path with body as JSON through the typed client.
func postJSON(addr, path string, body any) error {
	return withCode("POST", path, nodeAPI(addr).Post(context.Background(), path, body, nil))
}

// withCode names the request and, for an error the node answered, its
// HTTP status and error code (tests match on either).
func withCode(method, path string, err error) error {
	var ae *api.Error
	if errors.As(err, &ae) {
		return fmt.Errorf("%s %s: %d %s: %w", method, path, ae.HTTPStatus, ae.Code, err)
	}
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	return nil
}

// nodeAPI is the typed client of the node whose API is at addr.
func nodeAPI(addr string) *api.Client {
	base, hc := apiClient(addr)
	return api.NewClientHTTP(base, hc)
}

func mustStatus(t testing.TB, n *node) status {
	t.Helper()
	st, err := getStatus(n.api, false)
	if err != nil {
		t.Fatalf("%s status: %v", n.name, err)
	}
	return st
}

// waitStatus polls n's status until ok says so or the deadline passes.
func waitStatus(t testing.TB, n *node, timeout time.Duration, what string, ok func(status) bool) status {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var st status
	var err error
	for {
		st, err = getStatus(n.api, false)
		if err == nil && ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not %s after %v (last status %v, err %v)", n.name, what, timeout, st, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// cliResult is one finished tandem command.
type cliResult struct {
	code           int
	stdout, stderr string
}

// runCLI runs tandem to completion with a deadline.
func runCLI(t testing.TB, timeout time.Duration, args ...string) cliResult {
	t.Helper()
	r, err := startCLI(args...)(timeout)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// startCLI starts tandem and returns a function that waits for it (at
// most timeout, then kills it and reports an error). It does not touch
// the test, so it may be waited for from any goroutine.
func startCLI(args ...string) func(timeout time.Duration) (cliResult, error) {
	cmd := exec.Command(tandemBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return func(time.Duration) (cliResult, error) { return cliResult{}, fmt.Errorf("tandem %v: %v", args, err) }
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	return func(timeout time.Duration) (cliResult, error) {
		var err error
		select {
		case err = <-done:
		case <-time.After(timeout):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
			return cliResult{stdout: out.String(), stderr: errb.String()},
				fmt.Errorf("tandem %s: still running after %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), timeout, out.String(), errb.String())
		}
		r := cliResult{stdout: out.String(), stderr: errb.String()}
		var ee *exec.ExitError
		switch {
		case err == nil:
		case errors.As(err, &ee):
			r.code = ee.ExitCode()
		default:
			return r, fmt.Errorf("tandem %v: %v", args, err)
		}
		return r, nil
	}
}

// migrate runs `tandem migrate --json` from src to dest and returns the
// exit code, the output, and the final status it printed (if any).
func migrate(t testing.TB, src *node, to string, extra ...string) (cliResult, status) {
	t.Helper()
	args := append([]string{"migrate", "--from", src.api, "--to", to, "--json"}, extra...)
	r := runCLI(t, 5*time.Minute, args...)
	var st status
	if i := strings.Index(r.stdout, "\n{"); i >= 0 {
		if err := json.Unmarshal([]byte(r.stdout[i+1:]), &st); err != nil {
			t.Errorf("migrate --json output does not parse: %v\n%s", err, r.stdout)
		}
	}
	return r, st
}

// mustMigrate migrates and fails the test unless it completed.
func mustMigrate(t testing.TB, src *node, to string, extra ...string) status {
	t.Helper()
	r, st := migrate(t, src, to, extra...)
	if r.code != 0 || st.Status != "completed" {
		t.Fatalf("migrate exit %d, status %q\nstdout:\n%s\nstderr:\n%s", r.code, st.Status, r.stdout, r.stderr)
	}
	return st
}

// waitWorkload waits until a dirty guest has touched its memory (so a
// migration sends real pages rather than racing the first touch).
func waitWorkload(t testing.TB, src *node, touch uint64) {
	t.Helper()
	// Neither backend reports touch progress; the touch runs at memory
	// speed, so a short fixed wait per GiB is enough and bounded.
	time.Sleep(300*time.Millisecond + time.Duration(touch>>20)*2*time.Millisecond)
}

// console is a client of a node's console bridge speaking the kv line
// protocol; every reply is broadcast, so it keeps only its own lines.
type console struct {
	t    testing.TB
	c    net.Conn
	r    *bufio.Reader
	id   string
	seq  uint64
	name string
	// hist, when set, records every request whose reply is its own
	// (seq == replySeq) for a linearizability check.
	hist *e2e.History
}

func dialConsole(t testing.TB, n *node, id string) *console {
	t.Helper()
	c, err := dialAddr(n.console, 5*time.Second)
	if err != nil {
		t.Fatalf("console of %s: %v", n.name, err)
	}
	t.Cleanup(func() { c.Close() })
	return &console{t: t, c: c, r: bufio.NewReader(c), id: id, name: n.name}
}

// request sends "<id>:<seq> <cmd>" and returns the reply's text after the
// id, or an error when no reply came within the deadline.
func (k *console) requestSeq(seq uint64, cmd string, timeout time.Duration) (string, error) {
	return k.requestReplyTo(seq, seq, cmd, timeout)
}

// requestReplyTo sends a request with seq and waits for the reply tagged
// replySeq (a stale seq is answered with the record of the client's last
// reply, which carries that reply's seq).
func (k *console) requestReplyTo(seq, replySeq uint64, cmd string, timeout time.Duration) (string, error) {
	tag := fmt.Sprintf("%s:%d", k.id, seq)
	replyTag := fmt.Sprintf("%s:%d", k.id, replySeq)
	op := e2e.OpID(-1)
	if seq == replySeq {
		op = k.hist.Invoke(k.id, cmd, time.Now())
	}
	k.c.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(k.c, "%s %s\n", tag, cmd); err != nil {
		return "", fmt.Errorf("console %s: send %q: %w", k.name, cmd, err)
	}
	k.c.SetReadDeadline(time.Now().Add(timeout))
	for {
		line, err := k.r.ReadString('\n')
		if err != nil {
			return "", fmt.Errorf("console %s: waiting for the reply to %s %s: %w", k.name, tag, cmd, err)
		}
		line = strings.TrimRight(line, "\r\n")
		if rest, ok := strings.CutPrefix(line, replyTag+" "); ok {
			k.hist.Return(op, rest, time.Now())
			return rest, nil
		}
	}
}

// do sends the next request and fails the test without a reply.
func (k *console) do(cmd string) string {
	k.t.Helper()
	k.seq++
	r, err := k.requestSeq(k.seq, cmd, 10*time.Second)
	if err != nil {
		k.t.Fatal(err)
	}
	return r
}

func within(limitMs, tolMs int64, got int64) bool { return got <= limitMs+tolMs }
