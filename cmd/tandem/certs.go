package main

import (
	"flag"
	"fmt"
	"path/filepath"
	"time"

	"github.com/tandemvm/tandem/ft"
	"github.com/tandemvm/tandem/internal/trust"
)

func init() {
	register("certs", "make a cluster CA (certs ca) and node or operator certificates (certs issue)", cmdCerts)
}

// tlsFlags are --tls-ca, --tls-cert and --tls-key: every command that
// listens or connects takes them.
type tlsFlags struct{ cfg trust.Config }

func addTLSFlags(fs *flag.FlagSet, tf *tlsFlags) {
	fs.StringVar(&tf.cfg.CAFile, "tls-ca", "", "PEM file of the cluster's CA: with --tls-cert and --tls-key, every connection is mutual TLS")
	fs.StringVar(&tf.cfg.CertFile, "tls-cert", "", "PEM certificate of this node (or operator), signed by --tls-ca")
	fs.StringVar(&tf.cfg.KeyFile, "tls-key", "", "PEM private key of --tls-cert")
}

// load reads the files; nil without TLS flags.
func (tf tlsFlags) load() (*trust.Identity, error) {
	id, err := trust.Load(tf.cfg)
	if err != nil {
		return nil, usagef("%v", err)
	}
	return id, nil
}

// parseClientFlags adds the TLS flags to a client command's flag set,
// parses args and loads the identity (nil without TLS flags).
func parseClientFlags(fs *flag.FlagSet, args []string) (*trust.Identity, error) {
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	if err := parseFlags(fs, args, 0); err != nil {
		return nil, err
	}
	return tf.load()
}

func cmdCerts(args []string) error {
	if len(args) == 0 {
		return usagef("tandem certs ca --dir DIR | tandem certs issue --dir DIR --name NAME [--ip IP,...] [--dns NAME,...]")
	}
	switch args[0] {
	case "ca":
		fs := newFlagSet("certs ca")
		dir := fs.String("dir", "", "directory for ca.pem and ca-key.pem (created 0700)")
		name := fs.String("name", "Tandem cluster CA", "the CA's common name")
		if err := parseFlags(fs, args[1:], 0); err != nil {
			return err
		}
		if *dir == "" {
			return usagef("certs ca: --dir is required")
		}
		if err := trust.NewCA(*dir, *name, time.Now()); err != nil {
			return err
		}
		fmt.Printf("CA written: %s (key %s, keep it off the nodes)\n", filepath.Join(*dir, trust.CAFile), filepath.Join(*dir, trust.CAKeyFile))
		return nil
	case "issue":
		fs := newFlagSet("certs issue")
		dir := fs.String("dir", "", "directory holding the CA; the certificate and key are written there")
		name := fs.String("name", "", "the node ID (or an operator's name) the certificate names")
		ips := fs.String("ip", "", "IP addresses to add as SANs, comma-separated")
		dns := fs.String("dns", "", "DNS names to add as SANs, comma-separated")
		if err := parseFlags(fs, args[1:], 0); err != nil {
			return err
		}
		if *dir == "" || *name == "" {
			return usagef("certs issue: --dir and --name are required")
		}
		o, err := trust.ParseIssueOptions(*ips, *dns)
		if err != nil {
			return usagef("certs issue: %v", err)
		}
		if err := trust.Issue(*dir, *name, o, time.Now()); err != nil {
			return err
		}
		fmt.Printf("certificate for %s written: %s, key %s\n", *name,
			filepath.Join(*dir, trust.CertFile(*name)), filepath.Join(*dir, trust.KeyFile(*name)))
		return nil
	}
	return usagef("certs %q: want ca or issue", args[0])
}

// addInsecureFlag adds --insecure to a command that listens.
func addInsecureFlag(fs *flag.FlagSet, tf *tlsFlags) {
	fs.BoolVar(&tf.cfg.Insecure, "insecure", false, "without TLS flags, let a listener bind a non-loopback address anyway (its traffic is then readable and forgeable on the network)")
}

// nodeTrust is how a node's listeners and clients authenticate (ft.Trust).
type nodeTrust = ft.Trust

// resolve loads the TLS files and checks every listen address up front
// (ft.ResolveTrust), so a plaintext non-loopback listen without --insecure
// is one line and exit 2 before anything starts.
func (tf tlsFlags) resolve(listens ...string) (nodeTrust, error) {
	nt, err := ft.ResolveTrust(tf.cfg, listens...)
	if err != nil {
		return nodeTrust{}, usagef("%v", err)
	}
	return nt, nil
}
