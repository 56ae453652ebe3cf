package ft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/fsperm"
	"github.com/tandemvm/tandem/internal/netlimit"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

// RaftConfig configures a member of a raft trio: a primary or secondary
// whose part raft decides.
type RaftConfig struct {
	Node NodeConfig
	// Failover configures the raft node; its APIAddr and ConsoleAddr are
	// filled in with the addresses the node's listeners got.
	Failover failover.Config
	// DataAddr is where this node listens for a primary's epochs.
	DataAddr string
	// DataDir holds the committed image and the disk copy (created,
	// private, if missing).
	DataDir string
	// Boot, if set, builds the guest a fresh cluster's configured primary
	// runs first, with BootConfig; nil: this node never boots one.
	Boot       func() (guest.Guest, error)
	BootConfig guest.Config
	Epochs     EpochSettings
	// Receiver builds the guest of a received image (a secondary's).
	Receiver *replica.Receiver
	// StopHandover, if positive, is how long a protected primary stopped
	// by its context (SIGTERM) spends handing the guest to the secondary
	// before it stops (0: it stops at once and the secondary takes over
	// as after a crash). Force, if set, cuts the handover short (a
	// second signal).
	StopHandover time.Duration
	Force        context.Context
}

// RunRaftMember runs a raft trio member until ctx ends or POST /quit:
// the Member driver with a RaftCoordinator.
func RunRaftMember(ctx context.Context, cfg RaftConfig) error {
	log := cfg.Node.Log
	fcfg := cfg.Failover
	n, err := NewNode(cfg.Node)
	if err != nil {
		return err
	}
	defer n.Close()
	// The data directory holds the committed image and the disk copy.
	if err := fsperm.PrivateDir(cfg.DataDir, log); err != nil {
		return fmt.Errorf("--data-dir: %w", err)
	}
	fcfg.APIAddr, fcfg.ConsoleAddr = n.APIAddr(), n.ConsoleAddr()
	dataLn, err := cfg.Node.Trust.Listen(log, "--data", cfg.DataAddr, "data", netlimit.DataCap)
	if err != nil {
		return err
	}
	_, statErr := os.Stat(fcfg.DataDir)
	fresh := errors.Is(statErr, os.ErrNotExist)
	node, err := failover.Open(fcfg)
	if err != nil {
		dataLn.Close()
		return err
	}
	coord := &RaftCoordinator{Node: node}
	m := NewMember(MemberConfig{Node: n, Coordinator: coord, Epochs: cfg.Epochs, Receiver: cfg.Receiver,
		DataDir: cfg.DataDir, Data: dataLn, Boot: cfg.Boot, BootConfig: cfg.BootConfig, Fresh: fresh, Log: log})
	n.HandleFunc("POST /switchover", m.handleSwitchover)
	m.Start()
	n.Start()
	n.Wait(ctx)
	if ctx.Err() != nil && cfg.StopHandover > 0 {
		force := cfg.Force
		if force == nil {
			force = context.Background()
		}
		m.HandOverOnStop(force, cfg.StopHandover)
	}
	m.Stop() // closes the raft node, then joins
	return nil
}

// WitnessConfig configures the third raft voter.
type WitnessConfig struct {
	Failover failover.Config
	// DataDir holds the raft log (created, private, if missing).
	DataDir string
	// APIAddr, if set, serves GET /status.
	APIAddr string
	Trust   Trust
	Log     *slog.Logger
}

// RunWitness runs the third raft voter, which decides and never runs the
// guest, until ctx ends or POST /quit.
func RunWitness(ctx context.Context, cfg WitnessConfig) error {
	log := cfg.Log
	if err := fsperm.PrivateDir(cfg.DataDir, log); err != nil {
		return fmt.Errorf("--data-dir: %w", err)
	}
	node, err := failover.Open(cfg.Failover)
	if err != nil {
		return err
	}
	defer node.Close()
	var quit <-chan struct{} // nil without an API: only ctx stops it
	if cfg.APIAddr != "" {
		srv, err := newWitnessAPI(node, cfg.APIAddr, log, cfg.Trust)
		if err != nil {
			return err
		}
		srv.Start()
		defer srv.Close()
		quit = srv.Quit()
	}
	log.Info("witness running", "raft", cfg.Failover.Peers[cfg.Failover.ID], "tls", cfg.Trust.TLSOn())
	WaitStop(ctx, quit, log)
	return nil
}

// witnessStatus is the witness's GET /status: the same keys as every
// node's, its raft view under "cluster", the guest's fields null.
func witnessStatus(node *failover.Node) api.Status {
	st := node.State()
	nodes, quorum := raftNodes(node, nil, nil)
	return api.Status{Role: "witness", Build: version.Build(), Cluster: clusterView(node, false), Nodes: nodes, Quorum: quorum,
		Witness: &api.WitnessStatus{Protected: st.Protected, LastCommittedEpoch: st.Epoch}}
}

// newWitnessAPI is the witness's API: GET /status and the role metrics
// (not started).
func newWitnessAPI(node *failover.Node, addr string, log *slog.Logger, nt Trust) (*APIServer, error) {
	srv, err := NewAPIServer(addr, log, nt)
	if err != nil {
		return nil, err
	}
	srv.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		WriteJSON(w, http.StatusOK, witnessStatus(node))
	})
	srv.HandleFunc("POST /switchover", func(w http.ResponseWriter, r *http.Request) {
		WriteError(w, http.StatusConflict, api.CodeNotPrimary, notPrimaryError(node.State(), "switchover (the witness never runs the guest)"))
	})
	registerRoleMetrics(srv.reg, metricSource{
		role: func() string { return "witness" },
		cluster: func() (failover.FSMState, int, bool) {
			return node.State(), node.ReachableVoters(), true
		},
	})
	return srv, nil
}
