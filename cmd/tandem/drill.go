package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/tandemvm/tandem/internal/drill"
	"github.com/tandemvm/tandem/internal/e2e"
)

func init() {
	register("drill", "failover drill: a local trio under kv load, kill -9 the primary (or two nodes: --scenario), verify, repeat", cmdDrill)
}

// cmdDrill is `tandem drill`: flags, then internal/drill's runs, then
// the summary (the table goes to stdout as the runs go, or to stderr
// with --json).
func cmdDrill(args []string) error {
	fs := newFlagSet("drill")
	runs := fs.Int("runs", 10, "number of kill -9 failovers")
	kind := fs.String("guest", e2e.DefaultGuest(), "guest backend: kvm or synth")
	asJSON := fs.Bool("json", false, "print the summary as one JSON object (the table goes to stderr)")
	seed := fs.Uint64("seed", 0, "random seed for kill moments and values (0: from the clock)")
	keep := fs.String("keep", "", "keep the trio's data dirs and logs under this directory")
	memory := fs.String("memory", "128MiB", "guest memory")
	clients := fs.Int("clients", 2, "kv clients (1 or 2)")
	plaintext := fs.Bool("plaintext", false, "run the trio without TLS (loopback only); by default every channel is mutual TLS on a CA and certificates made for the drill")
	scenarioFlag := fs.String("scenario", "", "instead of --runs, double failures: two nodes go away one after the other and come back;\n"+
		"NAME is one of "+strings.Join(drill.ScenarioNames(), ", ")+",\n"+
		"an order (w-s, s-w, p-w: both return orders), all (each once), or a comma-separated list.\n"+
		"w-s: SIGTERM the witness, then kill -9 the secondary; s-w: kill -9 the secondary, then SIGTERM the witness;\n"+
		"p-w: kill -9 the primary, then SIGTERM the witness. /X-first names the node that returns first")
	coordinator := fs.String("coordinator", "raft", "raft (a trio with a witness) or etcd (a primary and a secondary on etcd: --etcd-endpoints, or the drill's own 3-member etcd in this process)")
	etcdEndpoints := fs.String("etcd-endpoints", "", "with --coordinator etcd: an etcd cluster to run the pairs on (client URLs; https:// unless --plaintext, with a certificate of the drill's CA); default: the drill's own")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	var scs []drill.Scenario
	if *scenarioFlag != "" {
		var err error
		if scs, err = drill.PickScenarios(*scenarioFlag); err != nil {
			return usagef("%v", err)
		}
	}
	switch {
	case *runs < 1 || *runs > 100000:
		return usagef("--runs %d: want 1 to 100000", *runs)
	case *kind != "kvm" && *kind != "synth":
		return usagef("--guest %q: want kvm or synth", *kind)
	case *clients < 1 || *clients > 2:
		return usagef("--clients %d: want 1 or 2", *clients)
	case *coordinator != "raft" && *coordinator != "etcd":
		return usagef("--coordinator %q: want raft or etcd", *coordinator)
	case *coordinator == "etcd" && scs != nil:
		return usagef("--scenario takes down the witness; --coordinator etcd has none: use --runs")
	case *coordinator == "raft" && *etcdEndpoints != "":
		return usagef("--etcd-endpoints is for --coordinator etcd")
	}
	if *seed == 0 {
		*seed = uint64(time.Now().UnixNano())
	}
	out := os.Stdout
	if *asJSON {
		out = os.Stderr
	}
	d, err := drill.New(drill.Config{Guest: *kind, Memory: *memory, Keep: *keep, Seed: *seed, Out: out,
		Plaintext: *plaintext, Clients: *clients, Coordinator: *coordinator, EtcdEndpoints: *etcdEndpoints})
	if err != nil {
		return err
	}
	defer d.Close()
	ctx := context.Background()
	var sum drill.Summary
	what := "runs"
	if scs != nil {
		sum, what = d.RunScenarios(ctx, scs), "scenarios"
	} else {
		sum = d.Run(ctx, *runs)
	}
	if *asJSON {
		sum.WriteJSON(os.Stdout)
	} else {
		sum.Print(out)
	}
	if !sum.OK() {
		return fmt.Errorf("drill failed: %d of %d %s failed, %d acknowledged writes lost, %d divergent replies, %d histories not linearizable (logs in %s)",
			sum.FailedRuns, sum.Runs, what, sum.AckedWritesLost, sum.DivergentReplies, sum.NonLinearizable, d.Dir())
	}
	return nil
}
