package test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The replica-verification soak (issue 19, item 6): many fresh pair
// starts with --verify-epochs, each joined while the guest is still busy
// (the dirty guest in its touch phase, the kv guest under client load),
// and not one digest mismatch. `make soak` runs it; it is too long for
// `make test`.

const (
	soakDefaultRuns = 100
	soakRunFor      = 4 * time.Second  // protected, verifying, before the status is read
	soakProtectBy   = 60 * time.Second // primary start until protected
	soakStopBound   = 10 * time.Second // SIGTERM until the process must be gone
	soakMaxFailed   = 10               // failed runs after which a combination gives up
	soakKVClients   = 8                // concurrent kv writers: a few hundred requests/s
)

// soakRuns is $TANDEM_SOAK as a number of starts per combination (any
// other non-empty value: the default); 0 means the soak is off.
func soakRuns() int {
	v := os.Getenv("TANDEM_SOAK")
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(v); err == nil && n > 0 {
		return n
	}
	return soakDefaultRuns
}

// crashTrace matches the first line of a Go panic, a runtime fatal error
// or a signal trace in a process log.
var crashTrace = regexp.MustCompile(`(?m)^(panic: |fatal error: |\[signal |SIGSEGV|SIGBUS|unexpected fault address|goroutine \d+ \[running\]:)`)

// soakRun is what one pair start reported.
type soakRun struct {
	verified, mismatches, joins uint64
	epochsPerSec                float64
	protectAfter                time.Duration
	kvSets                      int           // acknowledged SETs
	kvFor                       time.Duration // how long the kv load ran
	lastMismatch                string
}

// TestSoakPairVerify starts a fresh secondary and a primary with
// --verify-epochs N times for each guest kind and workload, lets each
// pair run a few seconds after it is protected, and fails on any digest
// mismatch, on a run that verified nothing, and on a crash trace in
// either log or a process that outlives SIGTERM.
func TestSoakPairVerify(t *testing.T) {
	runs := soakRuns()
	if runs == 0 {
		t.Skip("soak: set TANDEM_SOAK (a number of starts per combination, default 100) to run; make soak does")
	}
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			skipUnlessKind(t, kind)
			for _, workload := range []string{"dirty", "kv"} {
				t.Run(workload, func(t *testing.T) { soakCombination(t, kind, workload, runs) })
			}
		})
	}
}

func soakCombination(t *testing.T, kind, workload string, runs int) {
	t0 := time.Now()
	var (
		done, failed, withRejoin, protected, kvSets int
		verified, mismatches                        uint64
		protectSum, kvFor                           time.Duration
	)
	for i := range runs {
		var r soakRun
		ok := t.Run(fmt.Sprintf("%03d", i), func(t *testing.T) { soakOne(t, kind, workload, i, &r) })
		done++
		verified += r.verified
		mismatches += r.mismatches
		kvSets += r.kvSets
		kvFor += r.kvFor
		if r.protectAfter > 0 {
			protected++
			protectSum += r.protectAfter
		}
		if r.joins > 1 {
			withRejoin++
		}
		if !ok {
			failed++
			if failed >= soakMaxFailed {
				t.Errorf("giving up on %s/%s after %d failed runs of %d", kind, workload, failed, done)
				break
			}
		}
	}
	wall := time.Since(t0)
	line := fmt.Sprintf("soak %s/%s: %d runs, %d failed, %d verified epochs, %d mismatches, %d runs with joins>1, wall %v (%.1f s/start, protected after %.2f s on average)",
		kind, workload, done, failed, verified, mismatches, withRejoin, wall.Round(time.Second),
		wall.Seconds()/float64(done), protectSum.Seconds()/float64(max(protected, 1)))
	if workload == "kv" && kvFor > 0 {
		line += fmt.Sprintf(", %.0f acknowledged SETs/s", float64(kvSets)/kvFor.Seconds())
	}
	t.Log(line)
	if mismatches != 0 {
		t.Errorf("%s/%s: %d digest mismatches over %d runs", kind, workload, mismatches, done)
	}
}

// soakOne is one pair start; it fills in r as it goes, so a run that
// fails still counts what it saw.
func soakOne(t *testing.T, kind, workload string, run int, r *soakRun) {
	o := primaryOpts{memory: "512MiB", workload: workload, verify: true}
	if workload == "dirty" {
		// The join lands while the guest is still touching its 256 MiB:
		// that is where the mismatches this soak guards against began.
		o.touch, o.dirtyRate = "256MiB", 20000
	}
	// Even runs stop the primary first, odd runs the secondary while the
	// primary still streams to it. Registered as soon as there is a
	// process, so a failed run's processes are stopped and their logs
	// checked too.
	var pri, sec *node
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		order := []*node{pri, sec}
		if run%2 == 1 {
			order = []*node{sec, pri}
		}
		for _, n := range order {
			if n != nil {
				soakStop(t, n)
			}
		}
	}
	sa := newSecAddrs(t)
	sec = startSecondary(t, "secondary", sa)
	t.Cleanup(stop)
	t0 := time.Now()
	pri = startPrimary(t, "primary", kind, sa.data, o)
	t.Cleanup(stop) // again, to run before the harness's SIGKILL of the primary

	// kv load from the moment the primary serves, so the join happens
	// under it. Writers stop at the first error; one that stops before
	// it is told to is a failure.
	var (
		kvStop = make(chan struct{})
		kvWG   sync.WaitGroup
		kvLog  = newAckLog()
		kvErrs = make(chan error, soakKVClients)
	)
	stopKV := func() {
		select {
		case <-kvStop:
			return
		default:
		}
		close(kvStop)
		kvWG.Wait()
	}
	kvFrom := time.Now()
	if workload == "kv" {
		for c := range soakKVClients {
			cl, err := dialConsoleErr(pri, fmt.Sprintf("soak%d", c))
			if err != nil {
				t.Fatal(err)
			}
			kvWG.Add(1)
			go func() {
				defer kvWG.Done()
				defer cl.c.Close()
				rng := rand.New(rand.NewPCG(uint64(run), uint64(c)))
				if err := kvWriter(cl, kvLog, kvStop, 10*time.Second, rng); err != nil {
					kvErrs <- fmt.Errorf("kv client %d: %w", c, err)
				}
			}()
		}
		t.Cleanup(stopKV) // runs before stop: cleanups are last in, first out
	}

	waitFT(t, pri, soakProtectBy, "protected", func(s ftStatus) bool { return s.Protection == "protected" })
	r.protectAfter = time.Since(t0)

	// Run, watching that neither process dies.
	deadline := time.Now().Add(soakRunFor)
	for time.Now().Before(deadline) {
		for _, n := range []*node{pri, sec} {
			if !n.running() {
				t.Fatalf("%s exited while protected: %v", n.name, n.WaitErr())
			}
		}
		select {
		case err := <-kvErrs:
			t.Fatalf("kv load failed while protected: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	st := mustFT(t, pri, false)
	stopKV()
	r.kvFor = time.Since(kvFrom)
	select {
	case err := <-kvErrs:
		t.Errorf("kv load: %v", err)
	default:
	}
	kvLog.mu.Lock()
	r.kvSets = len(kvLog.acked)
	kvLog.mu.Unlock()
	r.verified, r.mismatches, r.joins = st.VerifiedEpochs, st.DigestMismatches, st.Joins
	r.epochsPerSec, r.lastMismatch = st.EpochsPerSecond, st.LastMismatch

	stop()
	t.Logf("protected after %.2fs; %d verified epochs (%.0f epochs/s), %d mismatches, joins %d, %d SETs acknowledged",
		r.protectAfter.Seconds(), r.verified, r.epochsPerSec, r.mismatches, r.joins, r.kvSets)
	if r.mismatches != 0 {
		t.Errorf("%d digest mismatches after %d verified epochs; last: %s", r.mismatches, r.verified, r.lastMismatch)
	}
	if r.verified == 0 {
		t.Errorf("no epoch verified in %v of protection (epochs %d, %.0f epochs/s): a run that verified nothing is not a pass",
			soakRunFor, st.Epochs, st.EpochsPerSecond)
	}
	if r.joins == 0 {
		t.Errorf("protected with 0 joins")
	}
}

// soakStop sends n SIGTERM, SIGKILLs it if it is still there after
// soakStopBound, and fails the test if it had to, if it died of a signal
// or if its log holds a crash trace.
func soakStop(t *testing.T, n *node) {
	t.Helper()
	if n.running() {
		syscall.Kill(n.Pid(), syscall.SIGTERM)
		select {
		case <-n.Exited():
		case <-time.After(soakStopBound):
			t.Errorf("%s: still running %v after SIGTERM; killed", n.name, soakStopBound)
			n.kill()
		}
	}
	if n.running() {
		return // not even SIGKILL ended it (reported by kill)
	}
	if ps := n.ProcessState(); ps != nil {
		ws, _ := ps.Sys().(syscall.WaitStatus)
		switch {
		case ws.Signaled() && ws.Signal() == syscall.SIGKILL:
			// Ours, after the bound (already reported).
		case ws.Signaled():
			t.Errorf("%s: died of %v", n.name, ws.Signal())
		case ps.ExitCode() != 0:
			t.Errorf("%s: exit status %d after SIGTERM", n.name, ps.ExitCode())
		}
	}
	if loc := crashTrace.FindStringIndex(n.log()); loc != nil {
		log := n.log()
		end := min(len(log), loc[0]+2000)
		t.Errorf("%s: crash trace in its log:\n%s", n.name, strings.TrimSpace(log[loc[0]:end]))
	}
}
