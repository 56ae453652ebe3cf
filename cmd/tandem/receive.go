package main

import (
	"strings"

	"github.com/tandemvm/tandem/ft"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

func init() {
	register("receive", "wait for a migration (--listen) or restore a snapshot (--from file:PATH), then run the guest", cmdReceive)
}

func cmdReceive(args []string) error {
	fs := newFlagSet("receive")
	listen := fs.String("listen", "", "data address to receive a migration on")
	from := fs.String("from", "", "snapshot to restore: file:PATH")
	apiAddr := fs.String("api", defaultAPI, "address of the HTTP API")
	consoleAddr := fs.String("console", "127.0.0.1:7081", "address of the console bridge")
	kind := fs.String("guest", "", "accept only this guest kind (kvm or synth); default: either")
	allowFaults := fs.Bool("allow-faults", false, "serve fault-injection endpoints (tests)")
	var rf receiveFlags
	addReceiveFlags(fs, &rf, true)
	var snapDir string
	addSnapshotDirFlag(fs, &snapDir)
	postcopyOK := fs.Bool("postcopy", true, "take a source's switch to post-copy when the guest's memory can be registered with userfaultfd (false: refuse it; such migrations stay precopy-only)")
	commitTimeout := fs.Duration("commit-timeout", replica.DefaultCommitTimeout, "after answering ready, how long to wait on the connection for the source's commit before asking its API")
	var nf netFlag
	addNetFlag(fs, &nf)
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	addInsecureFlag(fs, &tf)
	addLogFlags(fs)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	switch {
	case (*listen == "") == (*from == ""):
		return usagef("want exactly one of --listen ADDR or --from file:PATH")
	case *from != "" && !strings.HasPrefix(*from, "file:"):
		return usagef("--from %q: want file:PATH", *from)
	case *kind != "" && *kind != "kvm" && *kind != "synth":
		return usagef("--guest %q: want kvm or synth", *kind)
	}
	nt, err := tf.resolve("--api", *apiAddr, "--console", *consoleAddr, "--listen", *listen)
	if err != nil {
		return err
	}
	nc, err := nf.attach(nodeConfig("receive", *apiAddr, *consoleAddr, snapDir, *allowFaults, nt))
	if err != nil {
		return err
	}
	r := rf.apply(&replica.Receiver{NewGuest: ft.EmptyGuest, Build: version.Build(), Log: nc.Log, Kind: *kind}, "")
	ctx, stop := stopContext()
	defer stop()
	return ft.RunReceive(ctx, ft.ReceiveConfig{Node: nc, Receiver: r, Listen: *listen, Snapshot: strings.TrimPrefix(*from, "file:"),
		CommitTimeout: *commitTimeout, NoPostcopy: !*postcopyOK})
}
