package ft

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/tandemvm/tandem/ft/etcdcoord"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/fsperm"
	"github.com/tandemvm/tandem/internal/netlimit"
	"github.com/tandemvm/tandem/replica"
)

var _ Coordinator = (*etcdcoord.Coordinator)(nil)

// EtcdConfig configures a primary or secondary whose record is kept in a
// shared etcd (--coordinator etcd): the same member as a raft trio's,
// with an etcdcoord.Coordinator.
type EtcdConfig struct {
	Node NodeConfig
	// Etcd configures the coordinator; Self's API and console addresses
	// are filled in from Node's, and its IdentityFile is
	// DataDir/etcd-identity.
	Etcd etcdcoord.Config
	// DataAddr is where this node listens for a primary's epochs.
	DataAddr string
	// DataDir holds the committed image, the disk copy and the cluster
	// identity (created, private, if missing).
	DataDir    string
	Boot       func() (guest.Guest, error)
	BootConfig guest.Config
	Epochs     EpochSettings
	Receiver   *replica.Receiver
	// StopHandover and Force: as RaftConfig's.
	StopHandover time.Duration
	Force        context.Context
}

// RunEtcdMember runs a member coordinated through etcd until ctx ends or
// POST /quit. It opens no port before it has joined the cluster's prefix,
// and runs the guest only while it holds an etcd lease.
func RunEtcdMember(ctx context.Context, cfg EtcdConfig) error {
	log := cfg.Node.Log
	_, statErr := os.Stat(cfg.DataDir)
	fresh := errors.Is(statErr, os.ErrNotExist)
	if err := fsperm.PrivateDir(cfg.DataDir, log); err != nil {
		return fmt.Errorf("--data-dir: %w", err)
	}
	if !fresh {
		// A data directory that never joined a cluster (its identity file
		// is written on the first join) still boots a fresh cluster's
		// guest: the configured primary killed before it joined once.
		_, err := os.Stat(filepath.Join(cfg.DataDir, etcdIdentityFile))
		fresh = errors.Is(err, os.ErrNotExist)
	}
	// Join first: while etcd cannot be reached nothing listens, so a
	// client of the API is refused at once instead of waiting on a port
	// nobody serves. The registered API and console addresses are the
	// flags' (what other nodes and operators dial).
	ecfg := cfg.Etcd
	ecfg.Self.APIAddr, ecfg.Self.ConsoleAddr = cfg.Node.APIAddr, cfg.Node.ConsoleAddr
	ecfg.IdentityFile = filepath.Join(cfg.DataDir, etcdIdentityFile)
	ecfg.Logger = log
	coord, err := etcdcoord.Open(ctx, ecfg)
	if err != nil {
		return err
	}
	n, err := NewNode(cfg.Node)
	if err != nil {
		coord.Close()
		return err
	}
	defer n.Close()
	dataLn, err := cfg.Node.Trust.Listen(log, "--data", cfg.DataAddr, "data", netlimit.DataCap)
	if err != nil {
		coord.Close()
		return err
	}
	m := NewMember(MemberConfig{Node: n, Coordinator: coord, Epochs: cfg.Epochs, Receiver: cfg.Receiver,
		DataDir: cfg.DataDir, Data: dataLn, Boot: cfg.Boot, BootConfig: cfg.BootConfig, Fresh: fresh, Log: log})
	n.HandleFunc("POST /switchover", m.handleSwitchover)
	m.Start()
	n.Start()
	log.Info("member running on etcd", "cluster", ecfg.Cluster, "endpoints", ecfg.Endpoints, "data", cfg.DataAddr)
	n.Wait(ctx)
	if ctx.Err() != nil && cfg.StopHandover > 0 {
		force := cfg.Force
		if force == nil {
			force = context.Background()
		}
		m.HandOverOnStop(force, cfg.StopHandover)
	}
	m.Stop() // closes the coordinator (revoking its lease), then joins
	return nil
}

// etcdIdentityFile, in a member's data directory, names the cluster
// identity it joined (etcdcoord.Config.IdentityFile).
const etcdIdentityFile = "etcd-identity"
