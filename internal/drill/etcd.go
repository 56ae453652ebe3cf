package drill

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/tandemvm/tandem/internal/e2e"
	"github.com/tandemvm/tandem/internal/etcdlab"
	"github.com/tandemvm/tandem/internal/trust"
)

// etcdName names the certificate of the drill's own etcd members.
const etcdName = "etcd"

// startEtcd gives the drill its etcd when Config.Coordinator is etcd:
// Config.EtcdEndpoints if set (an etcd cluster the operator runs), else
// a 3-member cluster of its own in this process (etcdlab, etcd's default
// timings), over TLS with the drill's CA unless Plaintext.
func (d *Drill) startEtcd() error {
	if d.cfg.EtcdEndpoints != "" {
		d.etcdEndpoints = d.cfg.EtcdEndpoints
		return nil
	}
	lc := etcdlab.Config{Members: 3, Dir: filepath.Join(d.dir, "etcd")}
	if d.certDir != "" {
		if err := e2e.MakeCerts(d.certDir, etcdName); err != nil {
			return fmt.Errorf("drill etcd certificate: %w", err)
		}
		lc.TLS = &etcdlab.TLSFiles{CA: filepath.Join(d.certDir, trust.CAFile),
			Cert: filepath.Join(d.certDir, trust.CertFile(etcdName)), Key: filepath.Join(d.certDir, trust.KeyFile(etcdName))}
	}
	c, err := etcdlab.Start(lc)
	if err != nil {
		return fmt.Errorf("drill etcd: %w", err)
	}
	d.etcd = c
	d.etcdEndpoints = strings.Join(c.Endpoints(), ",")
	return nil
}

// trioEtcd is what a fresh trio's configuration takes from the etcd mode:
// the endpoints, and a cluster name of its own (a fresh prefix).
func (d *Drill) trioEtcd(cfg *e2e.TrioConfig) {
	if d.etcdEndpoints != "" {
		cfg.Etcd, cfg.Cluster = d.etcdEndpoints, fmt.Sprintf("drill%d-%d", d.cfg.Seed%100000, d.trios)
	}
}

// closeEtcd stops the drill's own etcd (not one it was given).
func (d *Drill) closeEtcd() {
	if d.etcd != nil {
		d.etcd.Close()
		d.etcd = nil
	}
}
