package ft

import (
	"context"
	"fmt"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/netlimit"
	"github.com/tandemvm/tandem/replica"
)

// GuestRunConfig configures a node running a guest unprotected.
type GuestRunConfig struct {
	Node NodeConfig
	// Guest is the booted guest (not yet run), of GuestConfig; RunGuest
	// closes it.
	Guest       guest.Guest
	GuestConfig guest.Config
}

// RunGuest runs cfg.Guest with the node's API and console bridge, and no
// protection, until ctx ends or POST /quit.
func RunGuest(ctx context.Context, cfg GuestRunConfig) error {
	g, gcfg := cfg.Guest, cfg.GuestConfig
	n, err := NewNode(cfg.Node)
	if err != nil {
		g.Close()
		return err
	}
	defer n.Close()
	n.Start()
	n.Attach(g, gcfg)
	if _, err := g.Resume(); err != nil {
		return fmt.Errorf("start the guest: %w", err)
	}
	n.net.announce(guest.NICOf(g))
	n.SetState("running")
	n.log.Info("guest running", "kind", g.Kind(), "memory", guest.FormatSize(gcfg.Memory), "vcpus", gcfg.VCPUs,
		"workload", gcfg.Workload.Kind, "api", n.APIAddr(), "console", n.ConsoleAddr(), "tls", n.trust.TLSOn())
	n.Wait(ctx)
	return nil
}

// ReceiveConfig configures a node that receives one guest.
type ReceiveConfig struct {
	Node     NodeConfig
	Receiver *replica.Receiver
	// Listen is the data address a migration arrives on (with TLS the
	// source must hold a certificate of the cluster's CA: any one, a
	// migration's source is whichever node runs the guest); "": restore
	// the snapshot file Snapshot instead.
	Listen, Snapshot string
	// CommitTimeout, NoPostcopy: see ReceiverConfig.
	CommitTimeout time.Duration
	NoPostcopy    bool
}

// RunReceive receives one guest, by migration or from a snapshot file,
// and runs it until ctx ends or POST /quit.
func RunReceive(ctx context.Context, cfg ReceiveConfig) error {
	n, err := NewNode(cfg.Node)
	if err != nil {
		return err
	}
	defer n.Close()
	if cfg.Listen == "" {
		n.Start()
		if err := n.RestoreFile(cfg.Receiver, cfg.Snapshot); err != nil {
			return err
		}
		n.Wait(ctx)
		return nil
	}
	ln, err := cfg.Node.Trust.Listen(n.log, "--listen", cfg.Listen, "receive", netlimit.DataCap)
	if err != nil {
		return err
	}
	n.ReceiveMigrations(ctx, ReceiverConfig{Listener: ln, Receiver: cfg.Receiver, CommitTimeout: cfg.CommitTimeout, NoPostcopy: cfg.NoPostcopy})
	return nil
}
