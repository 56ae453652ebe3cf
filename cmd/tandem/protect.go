package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/ft"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

func init() {
	register("primary", "run a guest protected by a secondary (epochs, output commit)", cmdPrimary)
	register("secondary", "keep a committed replica of a primary's guest, ready to activate", cmdSecondary)
	register("activate", "resume a secondary's guest from its last committed epoch", cmdActivate)
	register("protect", "point a primary without raft at a (new) secondary", cmdProtect)
}

// epochFlags are the protection flags of `tandem primary` (and of a
// secondary, which protects once activated).
type epochFlags struct {
	ft.EpochSettings
	verifySlice uint64 // --verify-slice in bytes (the settings take pages)
	throttle    bool   // --epoch-throttle (the settings take NoThrottle)
}

func addEpochFlags(fs interface {
	DurationVar(*time.Duration, string, time.Duration, string)
	BoolVar(*bool, string, bool, string)
	IntVar(*int, string, int, string)
	Float64Var(*float64, string, float64, string)
	Var(flag.Value, string, string)
}, ef *epochFlags) {
	fs.DurationVar(&ef.Interval, "epoch", 25*time.Millisecond, "epoch interval")
	fs.DurationVar(&ef.FlushBudget, "flush-budget", 5*time.Millisecond, "longest disk flush at an epoch pause before the capture is abandoned")
	fs.BoolVar(&ef.Verify, "verify-epochs", true, "prove every epoch: compare the primary's digest of what it shipped with the secondary's, and re-read a slice of memory at each pause (--verify-epochs=false turns it off)")
	ef.verifySlice = failover.DefaultVerifySlicePages * guest.PageSize
	fs.Var(sizeFlag{&ef.verifySlice}, "verify-slice", "memory re-read at each pause to catch writes the dirty log missed; every page is covered every memory/slice epochs")
	fs.BoolVar(&ef.throttle, "epoch-throttle", true, "throttle the guest's vCPUs when its dirty bytes outrun the link to the secondary (epochs stretch past 1.5x --epoch), instead of letting epochs stretch; status says how much (throttle_percent)")
	fs.IntVar(&ef.MaxInFlight, "max-in-flight", 4, "epochs shipped but not yet acknowledged before the primary waits")
	fs.DurationVar(&ef.AckTimeout, "ack-timeout", failover.DefaultAckTimeout, "no acknowledgement progress from the secondary this long while epochs are outstanding: drop the link and retry")
	ef.Trigger = failover.DefaultTrigger
	fs.Var(triggerFlag{&ef.Trigger}, "epoch-trigger", "what ends an epoch: clock (every --epoch) or output (as soon as the guest's output waits, within --max-pause-fraction; --epoch stays the longest, and is every epoch while the load is pipelined or the guest writes nothing)")
	fs.DurationVar(&ef.MaxOutputDelay, "max-output-delay", failover.DefaultMaxOutputDelay, "with --epoch-trigger output: the objective for how long output waits for its epoch to start (status says whether it holds)")
	fs.Float64Var(&ef.MaxPauseFraction, "max-pause-fraction", failover.DefaultMaxPauseFraction, "with --epoch-trigger output: the largest share of time the guest may spend held by the pauses of early epochs, in (0, 1] (a pause a kvm guest waits idle through holds nothing)")
}

// triggerFlag is --epoch-trigger.
type triggerFlag struct{ t *failover.EpochTrigger }

func (f triggerFlag) String() string {
	if f.t == nil {
		return ""
	}
	return f.t.String()
}

func (f triggerFlag) Set(s string) (err error) { *f.t, err = failover.ParseEpochTrigger(s); return err }

func (ef epochFlags) validate() error {
	switch {
	case ef.Interval < time.Millisecond || ef.Interval > time.Minute:
		return usagef("--epoch %v: want 1ms to 1m", ef.Interval)
	case ef.FlushBudget <= 0:
		return usagef("--flush-budget %v: want a positive duration", ef.FlushBudget)
	case ef.verifySlice < guest.PageSize || ef.verifySlice%guest.PageSize != 0 || ef.verifySlice > 1<<30:
		return usagef("--verify-slice %d: want a multiple of 4KiB from 4KiB to 1GiB", ef.verifySlice)
	case ef.MaxInFlight < 1 || ef.MaxInFlight > 1024:
		return usagef("--max-in-flight %d: want 1 to 1024", ef.MaxInFlight)
	case ef.AckTimeout < 100*time.Millisecond || ef.AckTimeout > time.Hour:
		return usagef("--ack-timeout %v: want 100ms to 1h", ef.AckTimeout)
	}
	if err := failover.CheckMaxOutputDelay(ef.MaxOutputDelay, ef.Interval); err != nil {
		return usagef("--max-output-delay: %v", err)
	}
	if err := failover.CheckMaxPauseFraction(ef.MaxPauseFraction); err != nil {
		return usagef("--max-pause-fraction: %v", err)
	}
	return nil
}

// settings are the flags as the library takes them.
func (ef epochFlags) settings() ft.EpochSettings {
	s := ef.EpochSettings
	s.VerifySlicePages = int(ef.verifySlice / guest.PageSize)
	s.NoThrottle = !ef.throttle
	return s
}

func cmdActivate(args []string) error {
	fs := newFlagSet("activate")
	api := fs.String("api", defaultAPI, "API address of the secondary")
	force := fs.Bool("force", false, "activate even though the primary was heard within the secondary's --failure-timeout (split brain unless it is really gone)")
	id, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	st, err := newAPIClient(*api, id, 0).Activate(context.Background(), *force)
	if err != nil {
		return err
	}
	fmt.Printf("activated: role %v, guest resumed from committed epoch %v\n", st.Role, st.ActivatedEpoch)
	return nil
}

func cmdProtect(args []string) error {
	fs := newFlagSet("protect")
	api := fs.String("api", defaultAPI, "API address of the primary")
	secondary := fs.String("secondary", "", "the secondary's --data address (\"\" drops protection)")
	name := fs.String("secondary-name", "", "with TLS: the node the secondary's certificate must name (default: any certificate of the CA)")
	id, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if _, err := newAPIClient(*api, id, 0).Protect(context.Background(), *secondary, *name); err != nil {
		return err
	}
	fmt.Printf("protecting with %q\n", *secondary)
	return nil
}

func cmdPrimary(args []string) error {
	fs := newFlagSet("primary")
	var p primaryFlags
	addGuestFlags(fs, &p.gf)
	addEpochFlags(fs, &p.ef)
	p.apiAddr = fs.String("api", defaultAPI, "address of the HTTP API")
	p.consoleAddr = fs.String("console", "127.0.0.1:7071", "address of the console bridge")
	p.secondary = fs.String("secondary", "", "the secondary's --data address (a pair without raft)")
	p.secName = fs.String("secondary-name", "", "with TLS, a pair without raft: the node the secondary's certificate must name (default: any certificate of the CA)")
	p.allowFaults = fs.Bool("allow-faults", false, "serve fault-injection endpoints (tests)")
	addClusterFlags(fs, &p.cf, true)
	addStopHandoverFlag(fs, &p.cf)
	addEtcdFlags(fs, &p.etf)
	addReceiveFlags(fs, &p.rf, false) // a member's received disk is its --disk, else DATA_DIR/disk.img
	addSnapshotDirFlag(fs, &p.snapDir)
	addNetFlag(fs, &p.nf)
	addTLSFlags(fs, &p.tf)
	addInsecureFlag(fs, &p.tf)
	addLogFlags(fs)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	isEtcd, err := p.etf.etcd(p.cf)
	if err != nil {
		return err
	}
	if p.cf.id != "" || isEtcd {
		return p.runMember(isEtcd)
	}
	return p.runPair()
}

// primaryFlags are the parsed flags of `tandem primary`.
type primaryFlags struct {
	gf                   guestFlags
	ef                   epochFlags
	apiAddr, consoleAddr *string
	secondary, secName   *string
	allowFaults          *bool
	cf                   clusterFlags
	etf                  etcdFlags
	rf                   receiveFlags
	snapDir              string
	nf                   netFlag
	tf                   tlsFlags
}

// runMember runs a primary that a raft trio (--id) or etcd coordinates.
func (p *primaryFlags) runMember(isEtcd bool) error {
	if *p.secondary != "" || *p.secName != "" {
		return usagef("--secondary and --secondary-name are for a pair without raft; with --id the secondary is found through raft")
	}
	p.rf.disk = p.gf.cfg.Disk
	nt, err := p.tf.resolve("--api", *p.apiAddr, "--console", *p.consoleAddr, "--data", p.cf.data)
	if err != nil {
		return err
	}
	p.cf.tls, p.cf.insecure = nt.ID, nt.Insecure
	nc, err := p.nf.attach(nodeConfig("primary", *p.apiAddr, *p.consoleAddr, p.snapDir, *p.allowFaults, nt))
	if err != nil {
		return err
	}
	if isEtcd {
		return runEtcdMember(failover.RolePrimary, p.cf, p.etf, &p.gf, p.ef, p.rf, nc)
	}
	return runMember(failover.RolePrimary, p.cf, &p.gf, p.ef, p.rf, nc)
}

// runPair runs the primary of a pair without a coordinator (--secondary).
func (p *primaryFlags) runPair() error {
	kind, cfg, err := p.gf.config()
	if err != nil {
		return err
	}
	if err := p.ef.validate(); err != nil {
		return err
	}
	nt, err := p.tf.resolve("--api", *p.apiAddr, "--console", *p.consoleAddr)
	if err != nil {
		return err
	}
	if err := checkPairSecondary(*p.secondary, nt); err != nil {
		return err
	}
	if *p.secName != "" && nt.ID == nil {
		return usagef("--secondary-name needs --tls-ca, --tls-cert and --tls-key (a name is checked on a certificate)")
	}
	nc, err := p.nf.attach(nodeConfig("primary", *p.apiAddr, *p.consoleAddr, p.snapDir, *p.allowFaults, nt))
	if err != nil {
		return err
	}
	g, err := bootGuest(kind, cfg)
	if err != nil {
		return err
	}
	ctx, stop := stopContext()
	defer stop()
	return ft.RunPairPrimary(ctx, ft.PairPrimaryConfig{
		Node:  nc,
		Guest: g, GuestConfig: cfg, Secondary: *p.secondary, SecondaryName: *p.secName, Epochs: p.ef.settings(),
	})
}

// checkPairSecondary checks a pair primary's --secondary: HOST:PORT, and
// in plaintext a loopback address unless --insecure.
func checkPairSecondary(addr string, nt nodeTrust) error {
	if addr == "" {
		return nil
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return usagef("--secondary %q: want HOST:PORT", addr)
	}
	if err := trust.CheckDial(nt.ID, nt.Insecure, "--secondary", addr); err != nil {
		return usagef("%v", err)
	}
	return nil
}

func cmdSecondary(args []string) error {
	fs := newFlagSet("secondary")
	data := fs.String("data", "127.0.0.1:7092", "this node's data address: where it listens for the primary's epochs (the same in a pair and in raft mode; the pair's primary names it in --secondary)")
	apiAddr := fs.String("api", defaultAPI, "address of the HTTP API")
	consoleAddr := fs.String("console", "127.0.0.1:7083", "address of the console bridge (serves once activated)")
	kind := fs.String("guest", "", "accept only this guest kind (kvm or synth); default: either")
	failureTimeout := fs.Duration("failure-timeout", ft.DefaultFailureTimeout, "tandem activate refuses (without --force) while the primary was heard within this long")
	var ef epochFlags
	addEpochFlags(fs, &ef)
	primaryName := fs.String("primary-name", "", "with TLS, a pair without raft: the node the primary's certificate must name (default: any certificate of the CA)")
	var cf clusterFlags
	addClusterFlags(fs, &cf, false)
	addStopHandoverFlag(fs, &cf)
	fs.StringVar(&cf.dataAdvertise, "data-advertise", "", "the --data address as other nodes reach it, if not the same (NAT, a proxy)")
	var etf etcdFlags
	addEtcdFlags(fs, &etf)
	var nf netFlag
	addNetFlag(fs, &nf)
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	addInsecureFlag(fs, &tf)
	addLogFlags(fs)
	var rf receiveFlags
	addReceiveFlags(fs, &rf, true)
	var snapDir string
	addSnapshotDirFlag(fs, &snapDir)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	nt, err := tf.resolve("--api", *apiAddr, "--console", *consoleAddr, "--data", *data)
	if err != nil {
		return err
	}
	cf.data = *data
	isEtcd, err := etf.etcd(cf)
	if err != nil {
		return err
	}
	if cf.id != "" || isEtcd {
		if *primaryName != "" {
			return usagef("--primary-name is for a pair without raft; with --id the primary is the one raft names")
		}
		cf.tls, cf.insecure = nt.ID, nt.Insecure
		nc, err := nf.attach(nodeConfig("secondary", *apiAddr, *consoleAddr, snapDir, false, nt))
		if err != nil {
			return err
		}
		if isEtcd {
			return runEtcdMember(failover.RoleSecondary, cf, etf, nil, ef, rf, nc)
		}
		return runMember(failover.RoleSecondary, cf, nil, ef, rf, nc)
	}
	if *primaryName != "" && nt.ID == nil {
		return usagef("--primary-name needs --tls-ca, --tls-cert and --tls-key (a name is checked on a certificate)")
	}
	if *kind != "" && *kind != "kvm" && *kind != "synth" {
		return usagef("--guest %q: want kvm or synth", *kind)
	}
	if err := ef.validate(); err != nil {
		return err
	}
	log := newLogger()
	r := rf.apply(&replica.Receiver{NewGuest: ft.EmptyGuest, Build: version.Build(), Log: log, Kind: *kind, Timeout: 5 * time.Second}, cf.dataDir)
	nc, err := nf.attach(nodeConfig("secondary", *apiAddr, *consoleAddr, snapDir, false, nt))
	if err != nil {
		return err
	}
	nc.Log = log
	ctx, stop := stopContext()
	defer stop()
	return ft.RunPairSecondary(ctx, ft.PairSecondaryConfig{
		Node: nc, DataAddr: *data, DataDir: cf.dataDir, Receiver: r, PrimaryName: *primaryName,
		FailureTimeout: *failureTimeout, Epochs: ef.settings(),
	})
}
