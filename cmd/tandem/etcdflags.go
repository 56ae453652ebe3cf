package main

import (
	"cmp"
	"errors"
	"flag"
	"net"
	"strings"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/ft"
	"github.com/tandemvm/tandem/ft/etcdcoord"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/stopsignal"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

// etcdFlags are the flags of a primary or secondary coordinated through
// a shared etcd (--coordinator etcd) instead of a raft trio.
type etcdFlags struct {
	coordinator string
	endpoints   string
	cluster     string
	lease       time.Duration
}

func addEtcdFlags(fs *flag.FlagSet, ef *etcdFlags) {
	fs.StringVar(&ef.coordinator, "coordinator", "raft", "who decides which node runs the guest: raft (a trio of primary, secondary and witness, --peers) or etcd (a shared etcd cluster, --etcd-endpoints and --cluster; no witness)")
	fs.StringVar(&ef.endpoints, "etcd-endpoints", "", "with --coordinator etcd: the etcd cluster's client URLs, http://HOST:PORT,... (https:// with the --tls-* files)")
	fs.StringVar(&ef.cluster, "cluster", "", "with --coordinator etcd: the protected guest's name; its keys are under /tandem/NAME/ (the same on its primary and secondary)")
	fs.DurationVar(&ef.lease, "etcd-lease", etcdcoord.DefaultLeaseTTL, "with --coordinator etcd: the etcd lease (whole seconds): a primary that cannot renew it stops releasing output half a second before it runs out, and the secondary takes over once it has, so a failover takes about this long; the default outlasts two etcd leader elections at etcd's default 1 s election timeout (shorter only with a faster-electing etcd)")
}

// etcd reports whether --coordinator etcd was chosen, after checking the
// flags that go with each coordinator.
func (ef etcdFlags) etcd(cf clusterFlags) (bool, error) {
	switch ef.coordinator {
	case "raft":
		if ef.endpoints != "" || ef.cluster != "" {
			return false, usagef("--etcd-endpoints and --cluster are for --coordinator etcd")
		}
		return false, nil
	case "etcd":
	default:
		return false, usagef("--coordinator %q: want raft or etcd", ef.coordinator)
	}
	switch {
	case cf.peers != "" || cf.raft != "":
		return true, usagef("--peers and --raft are for --coordinator raft; with etcd the nodes find each other under /tandem/CLUSTER/")
	case ef.endpoints == "" || ef.cluster == "" || cf.id == "" || cf.dataDir == "":
		return true, usagef("--coordinator etcd needs --etcd-endpoints, --cluster, --id and --data-dir")
	}
	if _, _, err := net.SplitHostPort(cf.data); err != nil {
		return true, usagef("--data %q: want HOST:PORT", cf.data)
	}
	return true, nil
}

// config is the coordinator's configuration (its errors name the flags).
func (ef etcdFlags) config(role failover.Role, cf clusterFlags) etcdcoord.Config {
	var eps []string
	for _, e := range strings.Split(ef.endpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			eps = append(eps, e)
		}
	}
	return etcdcoord.Config{Endpoints: eps, Cluster: ef.cluster, LeaseTTL: ef.lease, DataTimeout: cf.dataTimeout,
		Self: failover.NodeInfo{ID: cf.id, Role: role, DataAddr: cmp.Or(cf.dataAdvertise, cf.data)},
		TLS:  cf.tls, Insecure: cf.insecure}
}

// runEtcdMember runs a primary or secondary coordinated through etcd.
func runEtcdMember(role failover.Role, cf clusterFlags, ef etcdFlags, gf *guestFlags, epf epochFlags, rf receiveFlags, nc ft.NodeConfig) error {
	log := newLogger().With("node", cf.id)
	cfg := ft.EtcdConfig{Etcd: ef.config(role, cf), DataAddr: cf.data, DataDir: cf.dataDir, Epochs: epf.settings(),
		Receiver: rf.apply(&replica.Receiver{NewGuest: ft.EmptyGuest, Build: version.Build(), Log: log, Timeout: 5 * time.Second}, cf.dataDir)}
	if gf != nil {
		kind, gcfg, err := gf.config()
		if err != nil {
			return err
		}
		cfg.Boot = func() (guest.Guest, error) { return bootGuest(kind, gcfg) }
		cfg.BootConfig = gcfg
	}
	if err := epf.validate(); err != nil {
		return err
	}
	if cf.stopHandover < 0 {
		return usagef("--stop-handover %v: want 0 or more", cf.stopHandover)
	}
	if err := cfg.Etcd.Check(); err != nil {
		return usagef("%v", err)
	}
	nc.Log = log
	cfg.Node = nc
	ctx, force, stop := stopsignal.Contexts()
	defer stop()
	cfg.StopHandover, cfg.Force = cf.stopHandover, force
	err := ft.RunEtcdMember(ctx, cfg)
	if errors.Is(err, etcdcoord.ErrConfig) {
		return usagef("%v", err)
	}
	return err
}
