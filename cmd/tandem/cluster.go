package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/ft"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/stopsignal"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

func init() {
	register("witness", "the third raft voter: decides, never runs the guest", cmdWitness)
	register("switchover", "hand the guest to the warm secondary with about one epoch of pause", cmdSwitchover)
}

// clusterFlags are the raft flags shared by primary, secondary and witness.
type clusterFlags struct {
	id, raft, data, peers, dataDir string
	dataAdvertise                  string
	heartbeat, election, lease     time.Duration
	dataTimeout                    time.Duration
	stopHandover                   time.Duration
	// tls and insecure are the node's trust (from its TLS flags): the
	// raft port's as well as the other channels'.
	tls      *trust.Identity
	insecure bool
}

func addClusterFlags(fs *flag.FlagSet, cf *clusterFlags, withData bool) {
	fs.StringVar(&cf.id, "id", "", "this node's id in the cluster")
	fs.StringVar(&cf.raft, "raft", "", "this node's raft address (default: its entry in --peers)")
	if withData {
		fs.StringVar(&cf.data, "data", "", "raft mode (--peers): this node's own data address, where it listens for the primary's epochs whenever it is secondary (every member needs one); a pair (--secondary) does not use it")
		fs.StringVar(&cf.dataAdvertise, "data-advertise", "", "the --data address as other nodes reach it, if not the same (NAT, a proxy)")
	}
	fs.StringVar(&cf.peers, "peers", "", "every voter: ID=HOST:PORT,ID=HOST:PORT,ID=HOST:PORT")
	fs.StringVar(&cf.dataDir, "data-dir", "", "raft log, snapshots and (secondary) the committed image")
	fs.DurationVar(&cf.heartbeat, "heartbeat-timeout", failover.DefaultHeartbeatTimeout, "raft heartbeat timeout (the same on every node)")
	fs.DurationVar(&cf.election, "election-timeout", failover.DefaultElectionTimeout, "raft election timeout (the same on every node)")
	fs.DurationVar(&cf.lease, "lease-timeout", failover.DefaultLeaderLeaseTimeout, "leader lease: a primary that cannot reach a majority this long stops releasing output")
	fs.DurationVar(&cf.dataTimeout, "data-timeout", failover.DefaultDataTimeout, "no acknowledgement from the secondary this long: unprotected")
}

// addStopHandoverFlag adds --stop-handover (primary and secondary: either
// may be the primary when the signal comes).
func addStopHandoverFlag(fs *flag.FlagSet, cf *clusterFlags) {
	fs.DurationVar(&cf.stopHandover, "stop-handover", defaultStopHandover, "raft mode: on SIGTERM or SIGINT, a protected primary first hands the guest to the secondary (a switchover), for at most this long; a second signal, the timeout or a failed handover stop it at once (the secondary then takes over as after a crash); 0: no handover")
}

// defaultStopHandover bounds a stopping primary's handover: a switchover
// takes milliseconds; the bound leaves a supervisor's stop timeout
// (systemd's 90 s, a test harness's 10 s) room for the rest.
const defaultStopHandover = 5 * time.Second

func (cf clusterFlags) config(role failover.Role, apiAddr, consoleAddr string, log *slog.Logger) (failover.Config, error) {
	if cf.id == "" || cf.peers == "" || cf.dataDir == "" {
		return failover.Config{}, usagef("--id, --peers and --data-dir are required")
	}
	peers, err := failover.ParsePeers(cf.peers)
	if err != nil {
		return failover.Config{}, usagef("%v", err)
	}
	if _, ok := peers[cf.id]; !ok {
		return failover.Config{}, usagef("--id %q is not in --peers", cf.id)
	}
	if role != failover.RoleWitness {
		if _, _, err := net.SplitHostPort(cf.data); err != nil {
			return failover.Config{}, usagef("--data %q: want HOST:PORT", cf.data)
		}
		if cf.dataAdvertise != "" {
			if _, _, err := net.SplitHostPort(cf.dataAdvertise); err != nil {
				return failover.Config{}, usagef("--data-advertise %q: want HOST:PORT", cf.dataAdvertise)
			}
		}
	}
	return failover.Config{
		ID: cf.id, Role: role, RaftAddr: cf.raft, DataAddr: cmp.Or(cf.dataAdvertise, cf.data), APIAddr: apiAddr, ConsoleAddr: consoleAddr,
		Peers: peers, DataDir: filepath.Join(cf.dataDir, "raft"),
		HeartbeatTimeout: cf.heartbeat, ElectionTimeout: cf.election, LeaderLeaseTimeout: cf.lease,
		DataTimeout: cf.dataTimeout, Logger: log, // failover adds node= (and component=raft to raft's lines)
		TLS: cf.tls, Insecure: cf.insecure,
	}, nil
}

// switchoverTimeout bounds a switchover on the node (ft.SwitchoverTimeout).
const switchoverTimeout = ft.SwitchoverTimeout

// runMember runs a raft trio member (primary or secondary) from its flags.
func runMember(role failover.Role, cf clusterFlags, gf *guestFlags, ef epochFlags, rf receiveFlags, nc ft.NodeConfig) error {
	base := newLogger()
	log := base.With("node", cf.id)
	fcfg, err := cf.config(role, nc.APIAddr, nc.ConsoleAddr, base)
	if err != nil {
		return err
	}
	cfg := ft.RaftConfig{Failover: fcfg, DataAddr: cf.data, DataDir: cf.dataDir, Epochs: ef.settings(),
		Receiver: rf.apply(&replica.Receiver{NewGuest: ft.EmptyGuest, Build: version.Build(), Log: log, Timeout: 5 * time.Second}, cf.dataDir)}
	if gf != nil {
		kind, gcfg, err := gf.config()
		if err != nil {
			return err
		}
		cfg.Boot = func() (guest.Guest, error) { return bootGuest(kind, gcfg) }
		cfg.BootConfig = gcfg
	}
	if err := ef.validate(); err != nil {
		return err
	}
	nc.Log = log
	cfg.Node = nc
	if cf.stopHandover < 0 {
		return usagef("--stop-handover %v: want 0 or more", cf.stopHandover)
	}
	ctx, force, stop := stopsignal.Contexts()
	defer stop()
	cfg.StopHandover, cfg.Force = cf.stopHandover, force
	return ft.RunRaftMember(ctx, cfg)
}

func cmdWitness(args []string) error {
	fs := newFlagSet("witness")
	var cf clusterFlags
	addClusterFlags(fs, &cf, false)
	apiAddr := fs.String("api", defaultAPI, "address of the HTTP API (status, metrics); \"\": none")
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	addInsecureFlag(fs, &tf)
	addLogFlags(fs)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	nt, err := tf.resolve("--api", *apiAddr)
	if err != nil {
		return err
	}
	cf.tls, cf.insecure = nt.ID, nt.Insecure
	base := newLogger()
	log := base.With("node", cf.id)
	fcfg, err := cf.config(failover.RoleWitness, *apiAddr, "", base)
	if err != nil {
		return err
	}
	ctx, stop := stopContext()
	defer stop()
	return ft.RunWitness(ctx, ft.WitnessConfig{Failover: fcfg, DataDir: cf.dataDir, APIAddr: *apiAddr, Trust: nt, Log: log})
}

func cmdSwitchover(args []string) error {
	fs := newFlagSet("switchover")
	api := fs.String("api", defaultAPI, "API address of the primary")
	id, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	// The node may hold the request for its whole switchover timeout.
	out, err := newAPIClient(*api, id, switchoverTimeout+5*time.Second).Switchover(context.Background())
	if err != nil {
		return err
	}
	fmt.Printf("switched over: final epoch %v handed to the secondary in %v ms\n", out.FinalEpoch, out.TookMs)
	return nil
}
