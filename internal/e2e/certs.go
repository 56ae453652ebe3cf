package e2e

import (
	"errors"
	"net"
	"path/filepath"
	"time"

	"github.com/tandemvm/tandem/internal/trust"
)

// Operator names the certificate the harness's own clients (status, kv,
// switchover) present.
const Operator = "operator"

// MakeCerts makes a CA in dir and a certificate for 127.0.0.1 for each
// name, keeping any already there (a --keep directory used again).
func MakeCerts(dir string, names ...string) error {
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

// LoadCert loads name's identity from a directory MakeCerts made.
func LoadCert(dir, name string) (*trust.Identity, error) {
	return trust.Load(trust.Config{CAFile: filepath.Join(dir, trust.CAFile),
		CertFile: filepath.Join(dir, trust.CertFile(name)), KeyFile: filepath.Join(dir, trust.KeyFile(name))})
}

// CertArgs are the TLS flags of a node whose certificate in dir is name's.
func CertArgs(dir, name string) []string {
	return []string{"--tls-ca", filepath.Join(dir, trust.CAFile),
		"--tls-cert", filepath.Join(dir, trust.CertFile(name)),
		"--tls-key", filepath.Join(dir, trust.KeyFile(name))}
}
