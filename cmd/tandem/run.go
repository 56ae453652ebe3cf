package main

import (
	"flag"
	"log/slog"
	"os"

	"github.com/tandemvm/tandem/ft"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/internal/logging"
	"github.com/tandemvm/tandem/internal/stopsignal"
)

func init() {
	register("run", "run a guest with an HTTP API and a console bridge", cmdRun)
}

// logOpts are the long-running commands' --log-format and --log-level
// (one command runs per process).
var logOpts logging.Options

// addLogFlags adds --log-format and --log-level, checked as they are
// parsed (a bad value is a one-line usage error).
func addLogFlags(fs *flag.FlagSet) {
	fs.Func("log-format", "log lines as text (logfmt) or json, on stderr: "+logging.Formats+" (default text)", func(s string) error {
		f, err := logging.ParseFormat(s)
		logOpts.Format = f
		return err
	})
	fs.Func("log-level", "least severe level logged: "+logging.Levels+" (default info)", func(s string) error {
		_, err := logging.ParseLevel(s)
		logOpts.Level = s
		return err
	})
}

// newLogger logs to stderr as --log-format and --log-level say.
func newLogger() *slog.Logger {
	log, err := logging.New(os.Stderr, logOpts)
	if err != nil { // the flags were checked when parsed
		return slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	return log
}

// kvmDirtyMethod is the dirty-log method of KVM guests this process
// boots (--dirty-log); guests built to receive an image use the kvm
// package's default (get).
var kvmDirtyMethod = kvm.DirtyManualClear

// defaultDirtyLog is --dirty-log's default: manual protect, so that a
// migration's round 0 write-protects memory piece by piece as it sends
// it (guest.LazyDirtyLog) and the guest's rewrites of pages not yet sent
// take no fault; a sync costs about what KVM_GET_DIRTY_LOG's does
// (docs/PERFORMANCE.md, issue 11 item 2).
const defaultDirtyLog = "clear"

// bootGuest builds a guest that boots its workload on the first Resume.
func bootGuest(kind string, cfg guest.Config) (guest.Guest, error) {
	return ft.BootGuest(kind, cfg, kvmDirtyMethod)
}

// nodeConfig is a guest node's configuration from its flags (logging to
// stderr).
func nodeConfig(role, apiAddr, consoleAddr, snapDir string, allowFaults bool, nt nodeTrust) ft.NodeConfig {
	return ft.NodeConfig{Role: role, APIAddr: apiAddr, ConsoleAddr: consoleAddr, Log: newLogger(), Trust: nt,
		AllowFaults: allowFaults, SnapshotDir: snapDir}
}

// stopContext ends on SIGTERM or SIGINT: how every long-running command
// is stopped (besides POST /quit, which the node watches itself).
var stopContext = stopsignal.Context

func cmdRun(args []string) error {
	fs := newFlagSet("run")
	var gf guestFlags
	addGuestFlags(fs, &gf)
	apiAddr := fs.String("api", defaultAPI, "address of the HTTP API")
	consoleAddr := fs.String("console", "127.0.0.1:7071", "address of the console bridge")
	allowFaults := fs.Bool("allow-faults", false, "serve fault-injection endpoints (tests)")
	var snapDir string
	addSnapshotDirFlag(fs, &snapDir)
	var nf netFlag
	addNetFlag(fs, &nf)
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	addInsecureFlag(fs, &tf)
	addLogFlags(fs)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	kind, cfg, err := gf.config()
	if err != nil {
		return err
	}
	nt, err := tf.resolve("--api", *apiAddr, "--console", *consoleAddr)
	if err != nil {
		return err
	}
	nc, err := nf.attach(nodeConfig("run", *apiAddr, *consoleAddr, snapDir, *allowFaults, nt))
	if err != nil {
		return err
	}
	g, err := bootGuest(kind, cfg)
	if err != nil {
		return err
	}
	ctx, stop := stopContext()
	defer stop()
	return ft.RunGuest(ctx, ft.GuestRunConfig{Node: nc, Guest: g, GuestConfig: cfg})
}

// defaultGuestKind is kvm when /dev/kvm works and the micro-guest image is
// built, the software guest otherwise.
func defaultGuestKind() string { return ft.DefaultGuestKind() }
