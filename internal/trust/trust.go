package trust

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"time"
)

// Config names a node's PEM files. All three or none.
type Config struct {
	CAFile, CertFile, KeyFile string
	// Insecure lets a plaintext listener bind a non-loopback address.
	Insecure bool
}

// Enabled reports whether TLS files were given.
func (c Config) Enabled() bool { return c.CAFile != "" || c.CertFile != "" || c.KeyFile != "" }

// Errors. Each refusal wraps one of them, so callers can tell them apart.
var (
	// ErrConfig: the TLS files are incomplete or unreadable.
	ErrConfig = errors.New("trust: bad TLS configuration")
	// ErrPlaintext: a plaintext listener on a non-loopback address.
	ErrPlaintext = errors.New("trust: refusing a plaintext listener on a non-loopback address")
	// ErrPeer: the peer's certificate does not name the node expected.
	ErrPeer = errors.New("trust: peer certificate names another node")
)

// Identity is a node's loaded certificate and its cluster's CA. A nil
// *Identity means plaintext (loopback only unless Insecure).
type Identity struct {
	ca   *x509.CertPool
	cert tls.Certificate
	// Name is the node (or operator) this certificate names.
	Name string
}

// Load reads c's files. It returns nil, nil when no TLS file is given.
func Load(c Config) (*Identity, error) {
	if !c.Enabled() {
		return nil, nil
	}
	if c.CAFile == "" || c.CertFile == "" || c.KeyFile == "" {
		return nil, fmt.Errorf("%w: --tls-ca, --tls-cert and --tls-key go together (got ca=%q cert=%q key=%q)", ErrConfig, c.CAFile, c.CertFile, c.KeyFile)
	}
	caPEM, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, fmt.Errorf("%w: --tls-ca: %v", ErrConfig, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%w: --tls-ca %s: no PEM certificate in it", ErrConfig, c.CAFile)
	}
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("%w: --tls-cert/--tls-key: %v", ErrConfig, err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("%w: --tls-cert %s: %v", ErrConfig, c.CertFile, err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("%w: --tls-cert %s is not signed by --tls-ca %s: %v", ErrConfig, c.CertFile, c.CAFile, err)
	}
	cert.Leaf = leaf
	return &Identity{ca: pool, cert: cert, Name: certName(leaf)}, nil
}

// certName is the node a certificate names: its CN, else its first DNS SAN.
func certName(c *x509.Certificate) string {
	if c.Subject.CommonName != "" {
		return c.Subject.CommonName
	}
	if len(c.DNSNames) > 0 {
		return c.DNSNames[0]
	}
	return ""
}

// names is every name a certificate gives its holder.
func names(c *x509.Certificate) []string {
	out := slices.Clone(c.DNSNames)
	if c.Subject.CommonName != "" {
		out = append(out, c.Subject.CommonName)
	}
	return out
}

// ServerTLS is the configuration of a listener: TLS 1.3 and a client
// certificate chained to the CA, required.
func (id *Identity) ServerTLS() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    id.ca,
	}
}

// ServiceClientTLS is the configuration of a client of a service reached
// by host name or IP (etcd): the server's certificate must chain to the
// CA and name the host dialed (Go's standard verification; the caller's
// transport sets ServerName to each endpoint's host). A nil Identity
// gives nil: a plaintext client.
func (id *Identity) ServiceClientTLS() *tls.Config {
	if id == nil {
		return nil
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{id.cert}, RootCAs: id.ca}
}

// ClientTLS is the configuration of a client. The server's certificate
// must chain to the CA; if expect is not empty it must also name expect
// (the node the caller believes it dials). A nil Identity (no TLS flags)
// gives nil: a plaintext client.
func (id *Identity) ClientTLS(expect string) *tls.Config {
	if id == nil {
		return nil
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.cert},
		// Peers are addressed by IP: the host name check is replaced by
		// the chain and node-name check below, which always runs.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return id.verifyPeer(cs, expect, x509.ExtKeyUsageServerAuth)
		},
	}
}

// verifyPeer checks a peer's chain against the CA and, if expect is set,
// that the leaf names expect.
func (id *Identity) verifyPeer(cs tls.ConnectionState, expect string, usage x509.ExtKeyUsage) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("trust: the peer sent no certificate")
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: id.ca, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return fmt.Errorf("trust: peer certificate %q is not from this cluster's CA: %w", certName(leaf), err)
	}
	if expect != "" && !slices.Contains(names(leaf), expect) {
		return fmt.Errorf("%w: want %q, got %q", ErrPeer, expect, certName(leaf))
	}
	return nil
}

// isLoopback reports whether a listen address binds loopback only. An
// empty host (":7070") or a wildcard binds every interface.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil || host == "" {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// CheckListen is Listen's rule without the listen: plaintext (id nil)
// binds loopback only, unless insecure.
func CheckListen(id *Identity, insecure bool, what, addr string) error {
	if id == nil && !insecure && !isLoopback(addr) {
		return fmt.Errorf("%w: %s %s: give --tls-ca, --tls-cert and --tls-key, bind a loopback address, or pass --insecure", ErrPlaintext, what, addr)
	}
	return nil
}

// CheckDial is the same rule for a client: plaintext (id nil) reaches a
// loopback address only, unless insecure. Tandem's streams carry guest
// memory and disk, so a node without TLS flags must not send them across
// the network just because it was told an address.
func CheckDial(id *Identity, insecure bool, what, addr string) error {
	if id == nil && !insecure && !isLoopback(addr) {
		return fmt.Errorf("%w: %s %s: a plaintext stream would cross the network readable and forgeable; give --tls-ca, --tls-cert and --tls-key, use a loopback address, or pass --insecure", ErrPlaintext, what, addr)
	}
	return nil
}

// Listen opens a TCP listener for one of a node's channels (what names it
// in errors: "--api", "--data", ...). With an Identity every connection
// must complete a mutual TLS handshake; without one, addr must be a
// loopback address unless insecure.
func Listen(id *Identity, insecure bool, what, addr string) (net.Listener, error) {
	return ListenWrapped(id, insecure, what, addr, nil)
}

// ListenWrapped is Listen with wrap (if not nil) applied to the TCP
// listener under TLS: what wrap sees is the raw connections, the TLS
// handshake included (a cap on the connections still in their handshake,
// say). The connections Accept returns are TLS ones over wrap's.
func ListenWrapped(id *Identity, insecure bool, what, addr string, wrap func(net.Listener) net.Listener) (net.Listener, error) {
	if err := CheckListen(id, insecure, what, addr); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s: listen on %s: %w", what, addr, err)
	}
	if wrap != nil {
		ln = wrap(ln)
	}
	if id == nil {
		return ln, nil
	}
	return tls.NewListener(ln, id.ServerTLS()), nil
}

// Dial connects to addr within ctx, completing the TLS handshake (with an
// Identity) before it returns, so a refused certificate is this call's
// error. expect, if set, is the node the server's certificate must name.
func Dial(ctx context.Context, id *Identity, addr, expect string) (net.Conn, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	var d net.Dialer
	if id == nil {
		return d.DialContext(ctx, "tcp", addr)
	}
	td := tls.Dialer{NetDialer: &d, Config: id.ClientTLS(expect)}
	return td.DialContext(ctx, "tcp", addr)
}

// HandshakeTimeout is how long every Tandem listener gives an accepted
// connection to complete its TLS handshake (Handshake's d).
const HandshakeTimeout = 5 * time.Second

// Handshake completes a server-side TLS handshake within d (a listener's
// Accept returns before it), so a connection that never finishes one is
// dropped. Plaintext connections pass through.
func Handshake(conn net.Conn, d time.Duration) error {
	tc, ok := conn.(*tls.Conn)
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return tc.HandshakeContext(ctx)
}

// PeerName is the node named by the verified certificate of conn's peer;
// ok is false for a plaintext connection (or one whose handshake has not
// completed).
func PeerName(conn net.Conn) (name string, ok bool) {
	tc, isTLS := conn.(*tls.Conn)
	if !isTLS {
		return "", false
	}
	cs := tc.ConnectionState()
	if !cs.HandshakeComplete || len(cs.PeerCertificates) == 0 {
		return "", false
	}
	return certName(cs.PeerCertificates[0]), true
}

// PeerNames is every name the verified certificate of conn's peer gives
// it (CN and DNS SANs).
func PeerNames(conn net.Conn) []string {
	tc, isTLS := conn.(*tls.Conn)
	if !isTLS {
		return nil
	}
	cs := tc.ConnectionState()
	if !cs.HandshakeComplete || len(cs.PeerCertificates) == 0 {
		return nil
	}
	return names(cs.PeerCertificates[0])
}

// CheckPeer returns nil if conn is plaintext (nothing to check) or its
// peer's certificate names node; otherwise an error wrapping ErrPeer.
func CheckPeer(conn net.Conn, node string) error {
	ns := PeerNames(conn)
	if _, isTLS := conn.(*tls.Conn); !isTLS {
		return nil
	}
	if !slices.Contains(ns, node) {
		name, _ := PeerName(conn)
		return fmt.Errorf("%w: the peer claims to be %q, its certificate names %q", ErrPeer, node, name)
	}
	return nil
}
