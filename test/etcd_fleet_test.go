package test

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
)

// TestEtcdFleetMassFailover (TANDEM_FLEET=1, `make fleet`): 20 protected
// synth guests (16 MiB each, TANDEM_FLEET_GUESTS to change) share one
// 3-member etcd, each pair under its own prefix, each with a kv writer;
// every primary is killed with SIGKILL at once (25 ms epochs;
// TANDEM_FLEET_EPOCH to change). Every secondary must
// promote and hold every write its primary acknowledged. It logs the
// promotion times (kill to first reply) p50 and max. 40 processes: too
// heavy for make test on a 2-core machine.
func TestEtcdFleetMassFailover(t *testing.T) {
	if os.Getenv("TANDEM_FLEET") != "1" {
		t.Skip("TANDEM_FLEET=1 (make fleet) runs 20 pairs on one etcd")
	}
	n := 20
	if s := os.Getenv("TANDEM_FLEET_GUESTS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 || v > 100 {
			t.Fatalf("TANDEM_FLEET_GUESTS %q: want 1 to 100", s)
		}
		n = v
	}
	epoch := "25ms" // tandem's default --epoch
	if s := os.Getenv("TANDEM_FLEET_EPOCH"); s != "" {
		if d, err := time.ParseDuration(s); err != nil || d < time.Millisecond {
			t.Fatalf("TANDEM_FLEET_EPOCH %q: want a duration of 1ms or more", s)
		}
		epoch = s
	}
	ec := startEtcdLab(t)
	eps := strings.Join(ec.Endpoints(), ",")
	pairs := make([]*testTrio, n)
	for i := range pairs {
		pairs[i] = newEtcdPairSized(t, "synth", eps, fmt.Sprintf("fleet%d", i), "16MiB")
		for _, m := range pairs[i].m {
			m.Extra = []string{"--epoch", epoch}
		}
		pairs[i].startAll()
	}
	t0 := time.Now()
	for _, tr := range pairs {
		tr.waitProtected("a", "b", 120*time.Second)
	}
	t.Logf("%d pairs protected %v after their start", n, time.Since(t0).Round(time.Millisecond))
	type load struct {
		lg         *ackLog
		stop, done chan struct{}
	}
	loads := make([]load, n)
	for i, tr := range pairs {
		lg, stop, done := tr.startLoad("a", "w1")
		d := make(chan struct{})
		go func() { <-done; close(d) }()
		loads[i] = load{lg, stop, d}
	}
	for _, l := range loads {
		waitAcks(t, l.lg, 10, 30*time.Second)
	}
	// Only a protected pair's secondary may take over. On two loaded
	// cores a primary can miss its lease renewal during the start storm,
	// fence, claim the next generation under the same lease and record
	// the loss of protection before it re-protects: wait for every pair
	// to be protected again, then kill.
	for _, tr := range pairs {
		tr.waitProtected("a", "b", 60*time.Second)
	}
	killAt := time.Now()
	var wg sync.WaitGroup
	for _, tr := range pairs {
		wg.Add(1)
		go func() { defer wg.Done(); tr.m["a"].n.kill() }()
	}
	wg.Wait()
	rtos := make([]time.Duration, n)
	for i, tr := range pairs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tr.serveWithin("b", 60*time.Second)
			rtos[i] = time.Since(killAt)
		}()
	}
	wg.Wait()
	for i, tr := range pairs {
		<-loads[i].done
		close(loads[i].stop)
		st := tr.waitMember("b", 10*time.Second, "primary", func(s trioStatus) bool { return s.Role == "primary" && e2e.Cluster(s).Primary == "b" })
		if g := e2e.Cluster(st).Generation; g < 2 {
			t.Errorf("pair %d: generation %d after the failover", i, g)
		}
		checkAcked(t, tr.m["b"].n, loads[i].lg)
	}
	slices.Sort(rtos)
	acked := 0
	for _, l := range loads {
		acked += len(l.lg.acked)
	}
	t.Logf("%d primaries killed at once: every secondary serves; kill to first reply p50 %v, max %v; %d acknowledged writes, all present",
		n, rtos[n/2].Round(time.Millisecond), rtos[n-1].Round(time.Millisecond), acked)
}
