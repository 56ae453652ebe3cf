package test

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/trust"
)

// End-to-end tests of mutual TLS (issue 10): every channel (data, API,
// console, migration) refuses a client without a certificate, with one
// from another CA, and (data) with one naming another node than the one
// expected, while the legitimate path works; a pair and a trio fail over
// under kv load over TLS with nothing lost; a plaintext listener beyond
// loopback is refused unless --insecure.

// operator names the certificate a test's own clients present.
const operator = "operator"

// testPKI is a cluster CA and certificates in a test's temp dir.
type testPKI struct{ dir string }

// newPKI makes a CA and certificates for names with `tandem certs`.
func newPKI(t testing.TB, names ...string) *testPKI {
	t.Helper()
	p := &testPKI{dir: filepath.Join(t.TempDir(), "pki")}
	if r := runCLI(t, 30*time.Second, "certs", "ca", "--dir", p.dir); r.code != 0 {
		t.Fatalf("tandem certs ca: exit %d: %s", r.code, r.stderr)
	}
	for _, n := range names {
		if r := runCLI(t, 30*time.Second, "certs", "issue", "--dir", p.dir, "--name", n, "--ip", "127.0.0.1"); r.code != 0 {
			t.Fatalf("tandem certs issue %s: exit %d: %s", n, r.code, r.stderr)
		}
	}
	return p
}

// otherPKI makes another CA (with internal/trust) and certificates for
// names: the same node names, not of the cluster.
func otherPKI(t testing.TB, names ...string) *testPKI {
	t.Helper()
	p := &testPKI{dir: filepath.Join(t.TempDir(), "other-pki")}
	if err := trust.NewCA(p.dir, "another CA", time.Now()); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if err := trust.Issue(p.dir, n, trust.IssueOptions{}, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// nodeArgs are the TLS flags of name's certificate.
func (p *testPKI) nodeArgs(name string) []string {
	return []string{"--tls-ca", filepath.Join(p.dir, trust.CAFile),
		"--tls-cert", filepath.Join(p.dir, trust.CertFile(name)), "--tls-key", filepath.Join(p.dir, trust.KeyFile(name))}
}

// client is the configuration a client holding name's certificate uses
// (the server's certificate must chain to p's CA).
func (p *testPKI) client(name string) *tls.Config {
	id, err := trust.Load(trust.Config{CAFile: filepath.Join(p.dir, trust.CAFile),
		CertFile: filepath.Join(p.dir, trust.CertFile(name)), KeyFile: filepath.Join(p.dir, trust.KeyFile(name))})
	if err != nil {
		panic(fmt.Sprintf("test PKI %s: %v", p.dir, err))
	}
	return id.ClientTLS("")
}

// keyPair is name's certificate, for a client that does not check the
// server (so the server alone decides).
func (p *testPKI) keyPair(t testing.TB, name string) tls.Certificate {
	t.Helper()
	c, err := tls.LoadX509KeyPair(filepath.Join(p.dir, trust.CertFile(name)), filepath.Join(p.dir, trust.KeyFile(name)))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// intruder is a client that tries a channel: plaintext, TLS without a
// certificate, or TLS with cert. It never checks the server's
// certificate, so whatever refuses it is the server.
type intruder struct {
	name  string
	plain bool
	cert  *tls.Certificate
}

func (in intruder) dial(addr string) (net.Conn, error) {
	if in.plain {
		return net.DialTimeout("tcp", addr, 3*time.Second)
	}
	cfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
	if in.cert != nil {
		cfg.Certificates = []tls.Certificate{*in.cert}
	}
	return tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", addr, cfg)
}

func (in intruder) httpClient() *http.Client {
	if in.plain {
		return &http.Client{Timeout: 5 * time.Second}
	}
	cfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
	if in.cert != nil {
		cfg.Certificates = []tls.Certificate{*in.cert}
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
}

// intruders are the three clients every channel must refuse: no TLS, TLS
// without a certificate, a certificate of another CA naming name.
func intruders(t testing.TB, other *testPKI, name string) []intruder {
	c := other.keyPair(t, name)
	return []intruder{{name: "plaintext", plain: true}, {name: "no certificate"}, {name: "another CA's " + name, cert: &c}}
}

// refusedConn sends send on a connection to addr and says why the server
// did not refuse it (nil: it was closed without an answer to send). A
// connection the server keeps open (a read timeout) or that answers is
// not refused.
func refusedConn(in intruder, addr string, send string) error {
	conn, err := in.dial(addr)
	if err != nil {
		return nil // refused during the handshake
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	conn.Write([]byte(send))
	b, err := io.ReadAll(conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%s: the connection stayed open (read %q)", in.name, b)
	}
	if strings.Contains(string(b), "OK") || strings.Contains(string(b), "{") {
		return fmt.Errorf("%s: answered %q", in.name, b)
	}
	return nil
}

// TestTLSPlaintextNonLoopback: a plaintext listener on a non-loopback
// address is refused with one line and exit 2, on every listening
// command; with --insecure it starts, with a warning in its log.
func TestTLSPlaintextNonLoopback(t *testing.T) {
	for _, args := range [][]string{
		{"run", "--guest", "synth", "--memory", "64MiB", "--api", "0.0.0.0:0", "--console", "127.0.0.1:0"},
		{"run", "--guest", "synth", "--memory", "64MiB", "--api", "127.0.0.1:0", "--console", ":0"},
		{"secondary", "--data", "0.0.0.0:0", "--api", "127.0.0.1:0", "--console", "127.0.0.1:0"},
		{"receive", "--listen", "0.0.0.0:0", "--api", "127.0.0.1:0", "--console", "127.0.0.1:0"},
		{"primary", "--guest", "synth", "--memory", "64MiB", "--api", "[::]:0", "--console", "127.0.0.1:0"},
	} {
		r := runCLI(t, 30*time.Second, args...)
		lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
		if r.code != 2 || len(lines) != 1 || !strings.Contains(lines[0], "non-loopback") {
			t.Errorf("tandem %s: exit %d, stderr %q; want exit 2 and one line refusing the plaintext listener", strings.Join(args, " "), r.code, r.stderr)
		}
	}
	n := startProc(t, "insecure", "run", "--guest", "synth", "--memory", "64MiB", "--api", "0.0.0.0:0", "--console", freeAddr(t), "--insecure")
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(n.log(), "WITHOUT TLS") {
		if !n.running() || time.Now().After(deadline) {
			t.Fatalf("--insecure on 0.0.0.0: no warning in the log (running %v):\n%s", n.running(), n.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestTLSAPIAndConsole: a node's API and console take any certificate of
// the cluster's CA and refuse everything else.
func TestTLSAPIAndConsole(t *testing.T) {
	t.Parallel()
	pki := newPKI(t, "src", operator)
	other := otherPKI(t, operator)
	src := startSource(t, "synth", guestOpts{memory: "64MiB", workload: "kv", pki: pki})

	// API: the legitimate path, from the harness and from the CLI.
	if st := mustStatus(t, src); st.State != "running" {
		t.Fatalf("status over TLS: state %q", st.State)
	}
	if r := runCLI(t, 30*time.Second, append([]string{"status", "--api", src.api, "--json"}, pki.nodeArgs(operator)...)...); r.code != 0 || !strings.Contains(r.stdout, `"running"`) {
		t.Errorf("tandem status with the operator's certificate: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// A node's certificate works as a client too.
	if r := runCLI(t, 30*time.Second, append([]string{"status", "--api", src.api}, pki.nodeArgs("src")...)...); r.code != 0 {
		t.Errorf("tandem status with a node's certificate: exit %d: %s", r.code, r.stderr)
	}
	for _, in := range intruders(t, other, operator) {
		resp, err := in.httpClient().Get(map[bool]string{true: "http", false: "https"}[in.plain] + "://" + src.api + "/status")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || strings.Contains(string(b), "running") {
				t.Errorf("API, %s: %s %q, want refused", in.name, resp.Status, b)
			}
		}
	}
	if r := runCLI(t, 30*time.Second, "status", "--api", src.api); r.code == 0 {
		t.Errorf("tandem status without TLS flags: exit 0\n%s", r.stdout)
	}
	if r := runCLI(t, 30*time.Second, append([]string{"status", "--api", src.api}, other.nodeArgs(operator)...)...); r.code == 0 {
		t.Errorf("tandem status with another CA's certificate: exit 0\n%s", r.stdout)
	}

	// Console.
	c := dialConsole(t, src, "legit")
	if r := c.do("SET tls-key tls-value"); r != "OK" {
		t.Fatalf("SET over a TLS console: %q", r)
	}
	for _, in := range intruders(t, other, operator) {
		if err := refusedConn(in, src.console, "x:1 GET tls-key\n"); err != nil {
			t.Errorf("console: %v", err)
		}
	}
	// The control: the same probe with a certificate of the CA is answered.
	op := pki.keyPair(t, operator)
	if err := refusedConn(intruder{name: "operator", cert: &op}, src.console, "x:1 GET tls-key\n"); err == nil {
		t.Errorf("console: the probe with the operator's certificate was refused too")
	}
	cmd := exec.Command(tandemBin, append([]string{"console", "--connect", src.console, "--timeout", "10s"}, pki.nodeArgs(operator)...)...)
	cmd.Stdin = strings.NewReader("cli:1 GET tls-key\n")
	out, err := cmd.Output()
	if err != nil || !strings.Contains(string(out), "cli:1 OK tls-value") {
		t.Errorf("tandem console over TLS: %v, output %q", err, out)
	}
	cmd = exec.Command(tandemBin, append([]string{"console", "--connect", src.console, "--timeout", "2s"}, other.nodeArgs(operator)...)...)
	cmd.Stdin = strings.NewReader("cli2:1 GET tls-key\n")
	if out, err := cmd.Output(); err == nil || strings.Contains(string(out), "OK") {
		t.Errorf("tandem console with another CA's certificate: %v, output %q, want refused", err, out)
	}
	// The node is unharmed by the refusals.
	if r := c.do("GET tls-key"); r != "OK tls-value" {
		t.Errorf("GET after the refused clients: %q", r)
	}
}

// startReceiverTLS starts `tandem receive --listen` with pki's
// certificate cert.
func startReceiverTLS(t testing.TB, pki *testPKI, cert string) *node {
	t.Helper()
	return startWithPortsTLS(t, "receiver", true, pki, cert, "receive")
}

// TestTLSMigration: a receiver takes a migration only from a source with
// a certificate of its CA; the legitimate migration completes over TLS.
func TestTLSMigration(t *testing.T) {
	pki := newPKI(t, "src", "dst", operator)
	other := otherPKI(t, "src", operator)
	dst := startReceiverTLS(t, pki, "dst")
	for _, in := range intruders(t, other, "src") {
		if err := refusedConn(in, dst.data, `{"proto":1,"purpose":"migrate"}`+"\n"); err != nil {
			t.Errorf("migration port: %v", err)
		}
	}
	// A real source of another cluster: its dial is refused.
	bad := startSource(t, "synth", guestOpts{memory: "64MiB", workload: "kv", pki: other})
	if r, st := migrate(t, bad, dst.data, other.nodeArgs(operator)...); r.code == 0 || st.Status == "completed" {
		t.Errorf("migration from another CA's node: exit %d, status %q", r.code, st.Status)
	}
	if st := mustStatus(t, dst); st.State != "waiting" {
		t.Fatalf("receiver after the refused sources: state %q, want waiting", st.State)
	}

	src := startSource(t, "synth", guestOpts{memory: "64MiB", workload: "kv", pki: pki})
	c := dialConsole(t, src, "m")
	if r := c.do("SET moved yes"); r != "OK" {
		t.Fatal(r)
	}
	c.c.Close()
	st := mustMigrate(t, src, dst.data, pki.nodeArgs(operator)...)
	if st.SwitchoverDigest == "" || st.SwitchoverDigest != st.DestinationDigest {
		t.Errorf("switchover digests: %q vs %q", st.SwitchoverDigest, st.DestinationDigest)
	}
	waitStatus(t, dst, 10*time.Second, "running", func(s status) bool { return s.State == "running" })
	d := dialConsole(t, dst, "m2")
	if r := d.do("GET moved"); r != "OK yes" {
		t.Errorf("GET on the destination: %q", r)
	}
}

// TestTLSPairFailover: a pair without raft over TLS. The secondary's data
// port refuses intruders and a primary whose certificate names another
// node than --primary-name; a primary refuses a secondary that is not
// --secondary-name; the legitimate pair is protected and, killed under kv
// load, loses no acknowledged write.
func TestTLSPairFailover(t *testing.T) {
	t.Parallel()
	forEachKind(t, func(t *testing.T, kind string) {
		pki := newPKI(t, "a", "b", "c", operator)
		other := otherPKI(t, "a")
		sa := newSecAddrs(t)
		useTLS(pki.client(operator), sa.api, sa.console)
		sec := startSecondary(t, "secondary", sa, append(pki.nodeArgs("b"), "--primary-name", "a")...)

		c := pki.keyPair(t, "c")
		for _, in := range append(intruders(t, other, "a"), intruder{name: "a certificate naming c", cert: &c}) {
			if err := refusedConn(in, sa.data, `{"proto":1,"purpose":"replicate"}`+"\n"); err != nil {
				t.Errorf("data port: %v", err)
			}
		}
		o := primaryOpts{memory: "128MiB", pki: pki}

		// A real primary with c's certificate: the secondary refuses it.
		o.cert, o.secName = "c", "b"
		imp := startPrimary(t, "impostor", kind, sa.data, o)
		time.Sleep(2 * time.Second)
		if st := mustFT(t, imp, false); st.Protected {
			t.Fatalf("a primary whose certificate names c is protected by a secondary that wants a")
		}
		if !strings.Contains(sec.log(), "data connection refused") {
			t.Errorf("the secondary's log does not say it refused c")
		}
		imp.kill()

		// The right primary expecting another secondary refuses b.
		o.cert, o.secName = "a", "x"
		wrong := startPrimary(t, "wrong-secondary", kind, sa.data, o)
		st := waitFT(t, wrong, 10*time.Second, "refusing b", func(s ftStatus) bool {
			return strings.Contains(s.ProtectionReason, "names another node")
		})
		if st.Protected {
			t.Fatal("protected by a secondary whose certificate names b, --secondary-name x")
		}
		wrong.kill()

		// The legitimate pair.
		o.cert, o.secName = "a", "b"
		pri := startPrimary(t, "primary", kind, sa.data, o)
		waitFT(t, pri, 60*time.Second, "protected", func(s ftStatus) bool { return s.Protection == "protected" })

		// Under TLS the connection caps still see through to their own
		// connections: a flood of idle ones displaces neither the
		// primary's data connection nor a console client that talked.
		st0 := mustFT(t, pri, false)
		talker := dialConsole(t, pri, "talker")
		if r := talker.do("SET before-flood 1"); r != "OK" {
			t.Fatalf("SET before the flood: %q", r)
		}
		for _, f := range []struct {
			addr string
			n    int
		}{{sa.data, 24}, {pri.console, 64}} {
			for i := 0; i < f.n; i++ {
				if c, err := net.DialTimeout("tcp", f.addr, time.Second); err == nil {
					t.Cleanup(func() { c.Close() })
				}
			}
		}
		time.Sleep(500 * time.Millisecond)
		if st1 := mustFT(t, pri, false); st1.Joins != st0.Joins || !st1.Protected {
			t.Errorf("after a flood of idle connections: joins %d -> %d, protected %v: the TLS data connection was displaced", st0.Joins, st1.Joins, st1.Protected)
		}
		if r := talker.do("GET before-flood"); r != "OK 1" {
			t.Errorf("the console client that talked, after the flood: %q", r)
		}
		log := newAckLog()
		stop := make(chan struct{})
		var wg sync.WaitGroup
		errs := make(chan error, 2)
		for i := 0; i < 2; i++ {
			cl, err := dialConsoleErr(pri, fmt.Sprintf("w%d", i))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cl.c.Close() })
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- kvWriter(cl, log, stop, 5*time.Second, rand.New(rand.NewPCG(uint64(i), 7)))
			}()
		}
		waitAcks(t, log, 50, 20*time.Second)
		pri.kill()
		close(stop)
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil && !isConnEnd(err) {
				t.Errorf("client: %v", err)
			}
		}
		if r := runCLI(t, 30*time.Second, append([]string{"activate", "--api", sa.api}, pki.nodeArgs(operator)...)...); r.code != 0 {
			t.Fatalf("tandem activate over TLS: exit %d: %s", r.code, r.stderr)
		}
		checkAcked(t, sec, log)
		t.Logf("%s: %d acknowledged writes kept through kill -9 of the primary, over TLS", kind, len(log.acked))
	})
}

// TestTLSTrio: a trio fully over TLS. Its secondary's data port refuses
// a certificate of the cluster naming the witness or an operator (only
// the primary raft names may stream to it) and intruders; kill -9 of the
// primary under kv load loses no acknowledged write, and the old primary
// rejoins as secondary over TLS.
func TestTLSTrio(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		pki := newPKI(t, "a", "b", "w", operator)
		other := otherPKI(t, "a")
		tr := newTestTrio(t, kind)
		tr.pki = pki
		tr.startAll()
		tr.waitProtected("a", "b", 30*time.Second)
		w, op := pki.keyPair(t, "w"), pki.keyPair(t, operator)
		for _, in := range append(intruders(t, other, "a"), intruder{name: "the witness's certificate", cert: &w}, intruder{name: "an operator's certificate", cert: &op}) {
			if err := refusedConn(in, tr.m["b"].Data, `{"proto":1,"purpose":"replicate"}`+"\n"); err != nil {
				t.Errorf("b's data port: %v", err)
			}
		}
		if st, err := trioStat(tr.m["a"].API); err != nil || !st.Protected() {
			t.Fatalf("a after the refused intruders: %+v %v", st, err)
		}

		lg, stop, done := tr.startLoad("a", "w1")
		waitAcks(t, lg, 20, 30*time.Second)
		tr.m["a"].n.kill()
		<-done
		close(stop)
		tr.serveWithin("b", 10*time.Second)
		checkAcked(t, tr.m["b"].n, lg)
		tr.start("a")
		tr.waitProtected("b", "a", 30*time.Second)
		t.Logf("%s: %d acknowledged writes kept through kill -9 of the primary; a rejoined over TLS", kind, len(lg.acked))
	})
}
