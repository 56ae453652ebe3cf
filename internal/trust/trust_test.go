package trust

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// newCluster makes a CA in a temp dir and certificates for names.
func newCluster(t *testing.T, names ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "certs")
	now := time.Now()
	if err := NewCA(dir, "tandem test CA", now); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if err := Issue(dir, n, IssueOptions{IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}, now); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func load(t *testing.T, dir, name string) *Identity {
	t.Helper()
	id, err := Load(Config{CAFile: filepath.Join(dir, CAFile), CertFile: filepath.Join(dir, CertFile(name)), KeyFile: filepath.Join(dir, KeyFile(name))})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// echoServer accepts on ln and answers one line with the client's
// certificate name, until ln closes.
func echoServer(t *testing.T, ln net.Listener) {
	t.Helper()
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				if err := Handshake(c, 2*time.Second); err != nil {
					return
				}
				name, _ := PeerName(c)
				c.Write([]byte("hello " + name + "\n"))
			}()
		}
	}()
}

func roundTrip(ctx context.Context, id *Identity, addr, expect string) (string, error) {
	c, err := Dial(ctx, id, addr, expect)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

func TestMutualTLS(t *testing.T) {
	dir := newCluster(t, "a", "b", "operator")
	other := newCluster(t, "a")
	a, b := load(t, dir, "a"), load(t, dir, "b")
	ln, err := Listen(a, false, "--data", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	echoServer(t, ln)
	addr := ln.Addr().String()
	ctx := context.Background()

	got, err := roundTrip(ctx, b, addr, "a")
	if err != nil || got != "hello b" {
		t.Fatalf("b dialing a: %q, %v", got, err)
	}
	if got, err := roundTrip(ctx, load(t, dir, "operator"), addr, ""); err != nil || got != "hello operator" {
		t.Fatalf("any certificate of the CA: %q, %v", got, err)
	}
	// The server is a, not b: a client that expects b must refuse it.
	if _, err := roundTrip(ctx, a, addr, "b"); !errors.Is(err, ErrPeer) {
		t.Errorf("expecting b, reached a: err %v, want ErrPeer", err)
	}
	// A certificate of another CA: the server must refuse the client, and
	// the client must refuse the server.
	foreign := load(t, other, "a")
	if got, err := roundTrip(ctx, foreign, addr, ""); err == nil {
		t.Errorf("a client of another CA got %q", got)
	}
	// The server's own refusals, with clients that accept any server:
	// a certificate of another CA, a TLS client without a certificate,
	// plain TCP.
	anyServer := func(cert *Identity) *tls.Config {
		c := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
		if cert != nil {
			c.Certificates = []tls.Certificate{cert.cert}
		}
		return c
	}
	for name, cfg := range map[string]*tls.Config{"another CA": anyServer(foreign), "no certificate": anyServer(nil)} {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, cfg)
		if err != nil {
			continue // refused in the handshake
		}
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if line, err := bufio.NewReader(c).ReadString('\n'); err == nil {
			t.Errorf("%s: the server answered %q", name, line)
		}
		c.Close()
	}
	if got, err := roundTrip(ctx, nil, addr, ""); err == nil {
		t.Errorf("a plaintext client got %q", got)
	}
}

func TestPlaintextListensOnLoopbackOnly(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:0", ":0", "[::]:0"} {
		if _, err := Listen(nil, false, "--api", addr); !errors.Is(err, ErrPlaintext) {
			t.Errorf("plaintext %s: err %v, want ErrPlaintext", addr, err)
		}
	}
	ln, err := Listen(nil, false, "--api", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("loopback: %v", err)
	}
	ln.Close()
	ln, err = Listen(nil, true, "--api", "0.0.0.0:0")
	if err != nil {
		t.Fatalf("--insecure: %v", err)
	}
	ln.Close()
}

func TestLoadRefusals(t *testing.T) {
	dir := newCluster(t, "a")
	other := newCluster(t, "b")
	cases := []struct {
		name string
		c    Config
		want string
	}{
		{"partial", Config{CAFile: filepath.Join(dir, CAFile)}, "go together"},
		{"missing ca", Config{CAFile: filepath.Join(dir, "nope.pem"), CertFile: filepath.Join(dir, "a.pem"), KeyFile: filepath.Join(dir, "a-key.pem")}, "--tls-ca"},
		{"foreign cert", Config{CAFile: filepath.Join(dir, CAFile), CertFile: filepath.Join(other, "b.pem"), KeyFile: filepath.Join(other, "b-key.pem")}, "not signed by"},
		{"key mismatch", Config{CAFile: filepath.Join(dir, CAFile), CertFile: filepath.Join(dir, "a.pem"), KeyFile: filepath.Join(other, "b-key.pem")}, "--tls-cert/--tls-key"},
	}
	for _, c := range cases {
		_, err := Load(c.c)
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want ErrConfig mentioning %q", c.name, err, c.want)
		}
	}
	if id, err := Load(Config{}); id != nil || err != nil {
		t.Errorf("no files: %v, %v; want plaintext", id, err)
	}
}

func TestCertFilesAndNoOverwrite(t *testing.T) {
	dir := newCluster(t, "a")
	st, err := os.Stat(dir)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v, %v; want 0700", st.Mode().Perm(), err)
	}
	for _, f := range []string{CAFile, CAKeyFile, CertFile("a"), KeyFile("a")} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, %v; want 0600", f, st.Mode().Perm(), err)
		}
	}
	if err := NewCA(dir, "again", time.Now()); !errors.Is(err, ErrExists) {
		t.Errorf("second CA: %v, want ErrExists", err)
	}
	if err := Issue(dir, "a", IssueOptions{}, time.Now()); !errors.Is(err, ErrExists) {
		t.Errorf("second cert for a: %v, want ErrExists", err)
	}
	if err := Issue(dir, "../x", IssueOptions{}, time.Now()); !errors.Is(err, ErrConfig) {
		t.Errorf("name ../x: %v, want ErrConfig", err)
	}
}

// TestOpenSSLCertificates: a CA and node certificates made by openssl work
// like those of `tandem certs`.
func TestOpenSSLCertificates(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	dir := t.TempDir()
	run := func(args ...string) {
		t.Helper()
		cmd := exec.Command("openssl", args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca-key.pem")
	run("req", "-x509", "-new", "-key", "ca-key.pem", "-subj", "/CN=openssl CA", "-days", "30", "-out", "ca.pem")
	for _, n := range []string{"a", "b"} {
		run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", n+"-key.pem")
		run("req", "-new", "-key", n+"-key.pem", "-subj", "/CN="+n, "-out", n+".csr")
		os.WriteFile(filepath.Join(dir, n+".ext"), []byte("subjectAltName=DNS:"+n+",IP:127.0.0.1\n"), 0o600)
		run("x509", "-req", "-in", n+".csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "30", "-extfile", n+".ext", "-out", n+".pem")
	}
	a, b := load(t, dir, "a"), load(t, dir, "b")
	ln, err := Listen(a, false, "--raft", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	echoServer(t, ln)
	if got, err := roundTrip(context.Background(), b, ln.Addr().String(), "a"); err != nil || got != "hello b" {
		t.Fatalf("openssl certificates: %q, %v", got, err)
	}
}

// A client without an identity reaches loopback only, unless insecure:
// guest memory never crosses the network in plaintext by accident.
func TestPlaintextDialsLoopbackOnly(t *testing.T) {
	for _, addr := range []string{"192.0.2.1:7092", "[2001:db8::1]:7092", "example.com:7092", "nonsense"} {
		if err := CheckDial(nil, false, "--secondary", addr); !errors.Is(err, ErrPlaintext) || !strings.Contains(err.Error(), addr) {
			t.Errorf("plaintext dial %s: err %v, want ErrPlaintext naming the address", addr, err)
		}
	}
	for _, addr := range []string{"127.0.0.1:7092", "[::1]:7092", "localhost:7092"} {
		if err := CheckDial(nil, false, "--secondary", addr); err != nil {
			t.Errorf("plaintext dial %s: %v", addr, err)
		}
	}
	if err := CheckDial(nil, true, "--secondary", "192.0.2.1:7092"); err != nil {
		t.Errorf("--insecure: %v", err)
	}
	id := &Identity{}
	if err := CheckDial(id, false, "--secondary", "192.0.2.1:7092"); err != nil {
		t.Errorf("with an identity: %v", err)
	}
}

func TestParseIssueOptions(t *testing.T) {
	o, err := ParseIssueOptions(" 10.0.0.1,, ::1", "a.example, b")
	if err != nil || len(o.IPs) != 2 || !o.IPs[1].Equal(net.ParseIP("::1")) || strings.Join(o.DNS, "|") != "a.example|b" {
		t.Fatalf("%+v, %v", o, err)
	}
	if _, err := ParseIssueOptions("10.0.0.300", ""); err == nil || !strings.Contains(err.Error(), `--ip "10.0.0.300"`) {
		t.Fatalf("bad ip: %v", err)
	}
}
