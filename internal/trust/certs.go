package trust

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"github.com/tandemvm/tandem/internal/fsperm"
	"github.com/tandemvm/tandem/internal/vfs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// File names inside a certificate directory.
const (
	CAFile    = "ca.pem"
	CAKeyFile = "ca-key.pem"
)

// CertFile and KeyFile are the names of a certificate issued for name.
func CertFile(name string) string { return name + ".pem" }
func KeyFile(name string) string  { return name + "-key.pem" }

// Validity of what NewCA and Issue make.
const (
	caValidity   = 10 * 365 * 24 * time.Hour
	certValidity = 825 * 24 * time.Hour
)

// validName is a node ID or operator name usable as a file name and CN.
var validName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// ErrExists: the file to write is already there (nothing is overwritten).
var ErrExists = errors.New("trust: refusing to overwrite")

// NewCA makes dir (0700) and writes a new CA certificate and key into it
// (ECDSA P-256, files 0600). An existing CA in dir is never overwritten.
func NewCA(dir, name string, now time.Time) error {
	if err := fsperm.PrivateDir(dir, nil); err != nil {
		return err
	}
	for _, f := range []string{CAFile, CAKeyFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return fmt.Errorf("%w %s: a CA already exists in %s", ErrExists, f, dir)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	sn, err := serial()
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          sn,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"Tandem"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	if err := writeKey(filepath.Join(dir, CAKeyFile), key); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, CAFile), "CERTIFICATE", der)
}

// IssueOptions are the names a node certificate carries besides its own.
type IssueOptions struct {
	IPs []net.IP
	DNS []string
}

// ParseIssueOptions reads comma-separated IP addresses and DNS names
// (--ip, --dns) into IssueOptions; blanks are skipped.
func ParseIssueOptions(ips, dns string) (IssueOptions, error) {
	var o IssueOptions
	for _, s := range splitList(ips) {
		ip := net.ParseIP(s)
		if ip == nil {
			return o, fmt.Errorf("--ip %q is not an IP address", s)
		}
		o.IPs = append(o.IPs, ip)
	}
	o.DNS = splitList(dns)
	return o, nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// Issue writes a certificate and key for name (a node ID or an operator)
// signed by the CA in dir. The certificate names name as its CN and as a
// DNS SAN, plus o's addresses, and serves as server and client.
func Issue(dir, name string, o IssueOptions, now time.Time) error {
	if !validName.MatchString(name) {
		return fmt.Errorf("%w: --name %q: want 1-64 of A-Z a-z 0-9 _ . - (a node ID)", ErrConfig, name)
	}
	for _, f := range []string{CertFile(name), KeyFile(name)} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return fmt.Errorf("%w %s: a certificate for %q already exists in %s", ErrExists, f, name, dir)
		}
	}
	caCert, caKey, err := loadCA(dir)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	sn, err := serial()
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: sn,
		Subject:      pkix.Name{CommonName: name, Organization: []string{"Tandem"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(certValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     append([]string{name}, o.DNS...),
		IPAddresses:  o.IPs,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := writeKey(filepath.Join(dir, KeyFile(name)), key); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, CertFile(name)), "CERTIFICATE", der)
}

func loadCA(dir string) (*x509.Certificate, crypto.Signer, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CAFile))
	if err != nil {
		return nil, nil, fmt.Errorf("%w: no CA in %s (run `tandem certs ca --dir %s` first): %v", ErrConfig, dir, dir, err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, nil, fmt.Errorf("%w: CA key: %v", ErrConfig, err)
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, nil, fmt.Errorf("%w: %s or %s in %s is not PEM", ErrConfig, CAFile, CAKeyFile, dir)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %s: %v", ErrConfig, CAFile, err)
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %s: %v", ErrConfig, CAKeyFile, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("%w: %s: not a signing key", ErrConfig, CAKeyFile)
	}
	return cert, signer, nil
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der)
}

// writePEM creates path 0600, exclusively (an existing key or
// certificate is never replaced), fsyncs it and its directory; on error
// the partial file is removed. Through internal/vfs, as every file
// Tandem writes.
func writePEM(path, typ string, der []byte) (err error) {
	fsys := vfs.Default
	f, err := fsys.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, fsperm.File)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			fsys.Remove(path)
		}
	}()
	if err := pem.Encode(f, &pem.Block{Type: typ, Bytes: der}); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := fsys.SyncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("fsync directory of %s: %w", path, err)
	}
	return nil
}
