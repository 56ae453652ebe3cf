package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/tandemvm/tandem/ft"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvm"
)

func init() {
	register("run", "run a guest with an HTTP API and a console bridge", cmdRun)
}

func newLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// kvmDirtyMethod is the dirty-log method of KVM guests this process
// boots (--dirty-log); guests built to receive an image use the default.
var kvmDirtyMethod = kvm.DirtyGetLog

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
func stopContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
}

func cmdRun(args []string) error {
	fs := newFlagSet("run")
	var gf guestFlags
	addGuestFlags(fs, &gf)
	apiAddr := fs.String("api", "127.0.0.1:7070", "address of the HTTP API")
	consoleAddr := fs.String("console", "127.0.0.1:7071", "address of the console bridge")
	allowFaults := fs.Bool("allow-faults", false, "serve fault-injection endpoints (tests)")
	var snapDir string
	addSnapshotDirFlag(fs, &snapDir)
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	addInsecureFlag(fs, &tf)
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
	g, err := bootGuest(kind, cfg)
	if err != nil {
		return err
	}
	n, err := ft.NewNode(nodeConfig("run", *apiAddr, *consoleAddr, snapDir, *allowFaults, nt))
	if err != nil {
		g.Close()
		return err
	}
	defer n.Close()
	n.Start()
	n.Attach(g, cfg)
	if _, err := g.Resume(); err != nil {
		return fmt.Errorf("start the guest: %w", err)
	}
	n.SetState("running")
	n.Log().Info("guest running", "kind", kind, "memory", guest.FormatSize(cfg.Memory), "vcpus", cfg.VCPUs,
		"workload", cfg.Workload.Kind, "api", n.APIAddr(), "console", n.ConsoleAddr(), "tls", nt.TLSOn())
	ctx, stop := stopContext()
	defer stop()
	n.Wait(ctx)
	return nil
}

// defaultGuestKind is kvm when /dev/kvm works and the micro-guest image is
// built, the software guest otherwise.
func defaultGuestKind() string { return ft.DefaultGuestKind() }

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}
