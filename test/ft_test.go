package test

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// End-to-end tests of continuous micro-checkpointing (issue 6): a
// `tandem primary` protected by a `tandem secondary`, both real processes,
// on every guest kind.

// ftRuns is how many kill-the-primary runs each kind gets.
func ftRuns() int {
	if longRun {
		return 20
	}
	return 5
}

// 1. Clients write through the primary's console; the primary is killed
// with SIGKILL at a random moment; the activated secondary has every write
// a client was told about, and nothing any client saw contradicts it.
//
// The kill time is random (0.4 s to 2.4 s into the load), not aimed at a
// pause or a shipment: at 25 ms epochs with pipelined shipping an epoch is
// being captured, shipped or acknowledged at nearly every instant, so
// random kills land in each phase over the runs.
func TestFTFailoverKV(t *testing.T) {
	t.Parallel()
	forEachKind(t, func(t *testing.T, kind string) {
		for run := 0; run < ftRuns(); run++ {
			t.Run(fmt.Sprint("run", run), func(t *testing.T) {
				seed := uint64(time.Now().UnixNano())
				t.Logf("seed %d", seed)
				rng := rand.New(rand.NewPCG(seed, uint64(run)))
				pri, sec, _ := startPair(t, kind, primaryOpts{})

				log := newAckLog()
				stop := make(chan struct{})
				const clients = 4
				errs := make(chan error, clients)
				var wg sync.WaitGroup
				for i := 0; i < clients; i++ {
					c, err := dialConsoleErr(pri, fmt.Sprintf("w%d", i))
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { c.c.Close() })
					crng := rand.New(rand.NewPCG(seed, uint64(100+i)))
					wg.Add(1)
					go func() {
						defer wg.Done()
						errs <- kvWriter(c, log, stop, 5*time.Second, crng)
					}()
				}
				delay := 400*time.Millisecond + time.Duration(rng.Int64N(int64(2*time.Second)))
				time.Sleep(delay / 2)
				before := mustFT(t, pri, false)
				time.Sleep(delay - delay/2)
				pri.kill()
				killedAt := time.Now()
				close(stop)
				wg.Wait()
				close(errs)
				for err := range errs {
					// Every writer ends on the dead console (or on stop);
					// anything else is a wrong reply.
					if err != nil && !isConnEnd(err) {
						t.Errorf("client: %v", err)
					}
				}
				log.mu.Lock()
				nAcked, nSent, nGets := len(log.acked), len(log.sent), len(log.gets)
				log.mu.Unlock()
				if nAcked == 0 {
					t.Fatalf("no write was acknowledged in %v of load", delay)
				}
				// Output commit: replies waited for their epoch.
				if before.OutputDelayP50Ms <= 0 {
					t.Errorf("output_delay_p50_ms = %v while protected: replies were not held for their epoch", before.OutputDelayP50Ms)
				}
				activate(t, sec)
				took := time.Since(killedAt)
				checkAcked(t, sec, log)
				// A client that lost its reply resends the same seq to the
				// new primary: it is applied at most once and answered.
				c, err := dialConsoleErr(sec, "w0")
				if err != nil {
					t.Fatal(err)
				}
				defer c.c.Close()
				c.seq = 1 << 40
				if r, err := c.requestSeq(c.seq, "SET after failover", 10*time.Second); err != nil || r != "OK" {
					t.Errorf("write on the activated guest: %q, %v", r, err)
				}
				t.Logf("killed after %v: %d writes acked of %d sent, %d reads; output delay p50 %.1f ms; activated and checked in %v",
					delay, nAcked, nSent, nGets, before.OutputDelayP50Ms, took.Round(time.Millisecond))
			})
		}
	})
}

// isConnEnd says whether a console error is the connection going away
// (the primary was killed) rather than a wrong reply.
func isConnEnd(err error) bool {
	s := err.Error()
	return strings.Contains(s, "EOF") || strings.Contains(s, "reset by peer") ||
		strings.Contains(s, "broken pipe") || strings.Contains(s, "timeout") ||
		strings.Contains(s, "closed")
}

// 2. The secondary is killed while epochs flow and restarted on the same
// addresses. It keeps its image in memory only, so it comes back empty;
// the primary runs unprotected meanwhile, then re-syncs it on its own
// (joins counts it), epochs resume, and a failover still keeps every
// acknowledged write, including those acknowledged while unprotected.
func TestFTSecondaryRestart(t *testing.T) {
	t.Parallel()
	forEachKind(t, func(t *testing.T, kind string) { secondaryRestart(t, kind, false) })
}

// 2b. The same with the secondary first stopped (SIGSTOP) until the
// primary has its full window of epochs unacknowledged, then killed: the
// flights of the dead link must not count against the new one.
func TestFTSecondaryStalledRestart(t *testing.T) {
	t.Parallel()
	forEachKind(t, func(t *testing.T, kind string) { secondaryRestart(t, kind, true) })
}

func secondaryRestart(t *testing.T, kind string, stall bool) {
	{
		pri, sec, sa := startPair(t, kind, primaryOpts{})
		log := newAckLog()
		stop := make(chan struct{})
		done := make(chan error, 1)
		c, err := dialConsoleErr(pri, "w")
		if err != nil {
			t.Fatal(err)
		}
		defer c.c.Close()
		go func() { done <- kvWriter(c, log, stop, 10*time.Second, rand.New(rand.NewPCG(1, 2))) }()
		time.Sleep(500 * time.Millisecond)
		if stall {
			if err := syscall.Kill(sec.Pid(), syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			waitFT(t, pri, 10*time.Second, "with 4 epochs unacknowledged", func(s ftStatus) bool { return s.SecondaryLag >= 4 })
		}
		before := mustFT(t, pri, false)
		sec.kill()
		down := waitFT(t, pri, 10*time.Second, "unprotected after the secondary died", func(s ftStatus) bool {
			return s.Protection != "protected"
		})
		t.Logf("secondary killed at committed epoch %d; primary %s: %s", before.LastCommittedEpoch, down.Protection, down.ProtectionReason)
		time.Sleep(300 * time.Millisecond)
		if st := mustFT(t, pri, false); st.Protected {
			t.Errorf("primary reports protected with its secondary dead: %+v", st)
		}

		sec2 := startSecondary(t, "secondary-restarted-"+kind, sa)
		up := waitFT(t, pri, 30*time.Second, "protected again", func(s ftStatus) bool {
			return s.Protection == "protected" && s.Joins > before.Joins
		})
		s0 := waitFT(t, sec2, 10*time.Second, "consistent", func(s ftStatus) bool { return s.Consistent })
		time.Sleep(500 * time.Millisecond)
		s1 := mustFT(t, sec2, false)
		if s1.LastCommittedEpoch <= s0.LastCommittedEpoch || s1.Commits <= s0.Commits {
			t.Errorf("epochs do not resume after the re-sync: committed %d then %d, commits %d then %d",
				s0.LastCommittedEpoch, s1.LastCommittedEpoch, s0.Commits, s1.Commits)
		}
		close(stop)
		if err := <-done; err != nil {
			t.Fatalf("client during the secondary's restart: %v", err)
		}
		// More writes, acknowledged under the restored protection.
		w := dialConsole(t, pri, "after")
		w.hist = log.hist // its writes join the history checkAcked checks
		for i := 0; i < 10; i++ {
			k, v := fmt.Sprintf("k-after-%d", i), fmt.Sprintf("x%d", i)
			if r := w.do("SET " + k + " " + v); r != "OK" {
				t.Fatalf("SET %s: %q", k, r)
			}
			log.mu.Lock()
			log.acked[k], log.sent[k] = v, v
			log.mu.Unlock()
		}
		pri.kill()
		activate(t, sec2)
		checkAcked(t, sec2, log)
		t.Logf("joins %d -> %d; %d writes acked across the restart", before.Joins, up.Joins, len(log.acked))
	}
}

// verifyEpochs is how many verified epochs TestFTVerifyDigests wants.
func verifyEpochs() uint64 {
	if longRun {
		return 10000
	}
	return 1000
}

// 3. With --verify-epochs the primary digests memory and state at every
// pause and compares it with the secondary's digest of the committed
// image: over at least 1,000 epochs of a dirtying guest, every one
// matches.
func TestFTVerifyDigests(t *testing.T) {
	t.Parallel()
	forEachKind(t, func(t *testing.T, kind string) {
		want := verifyEpochs()
		pri, sec, _ := startPair(t, kind, primaryOpts{
			memory: "64MiB", workload: "dirty", touch: "16MiB", dirtyRate: 2000, epoch: "10ms", verify: true,
		})
		t0 := time.Now()
		st := waitFT(t, pri, time.Duration(want)*60*time.Millisecond+30*time.Second, fmt.Sprintf("%d verified epochs", want),
			func(s ftStatus) bool { return s.VerifiedEpochs >= want || s.DigestMismatches > 0 })
		if st.DigestMismatches != 0 {
			t.Fatalf("%d digest mismatches after %d verified epochs; last: %s", st.DigestMismatches, st.VerifiedEpochs, st.LastMismatch)
		}
		if st.EpochRawBytes == 0 {
			t.Errorf("no dirty pages shipped: the workload did not run")
		}
		ss := mustFT(t, sec, true)
		if !ss.Consistent || ss.CommittedDigest == "" {
			t.Errorf("secondary: consistent %v digest %q", ss.Consistent, ss.CommittedDigest)
		}
		t.Logf("%d epochs verified in %v (%.1f epochs/s), pause p99 %.2f ms, 0 mismatches",
			st.VerifiedEpochs, time.Since(t0).Round(time.Millisecond), st.EpochsPerSecond, st.PauseP99Ms)
	})
}

// 5a. A secondary that takes only kvm guests (and holds a committed kvm
// image) refuses a synth primary with a clear error, which the primary's
// status names; the secondary keeps its committed image and can still be
// activated with it.
func TestFTRefuseOtherKind(t *testing.T) {
	skipUnlessKind(t, "kvm")
	pri, sec, sa := startPair(t, "kvm", primaryOpts{}, "--guest", "kvm")
	w := dialConsole(t, pri, "w")
	if r := w.do("SET kept yes"); r != "OK" {
		t.Fatalf("SET: %q", r)
	}
	pri.kill()
	held := mustFT(t, sec, true)
	if !held.Consistent {
		t.Fatalf("secondary not consistent after its primary died: %+v", held)
	}
	other := startPrimary(t, "primary-synth", "synth", sa.data, primaryOpts{})
	st := waitFT(t, other, 20*time.Second, "refused", func(s ftStatus) bool {
		return s.Joins >= 1 && s.Protection == "unprotected" && strings.Contains(s.ProtectionReason, "synth")
	})
	t.Logf("synth primary: %s", st.ProtectionReason)
	if !strings.Contains(st.ProtectionReason, "kvm") {
		t.Errorf("refusal does not name the accepted kind: %q", st.ProtectionReason)
	}
	time.Sleep(300 * time.Millisecond)
	after := mustFT(t, sec, true)
	if after.LastCommittedEpoch != held.LastCommittedEpoch || after.CommittedDigest != held.CommittedDigest || !after.Consistent {
		t.Errorf("the refused primary changed the committed image: epoch %d digest %s -> epoch %d digest %s",
			held.LastCommittedEpoch, held.CommittedDigest, after.LastCommittedEpoch, after.CommittedDigest)
	}
	other.kill()
	activate(t, sec)
	c := dialConsole(t, sec, "check")
	if r := c.do("GET kept"); r != "OK yes" {
		t.Errorf("activated after the refusal: GET kept = %q", r)
	}
}

// 5b. A secondary holding a 256 MiB synth image refuses a 128 MiB guest
// and keeps its image.
func TestFTRefuseOtherMemory(t *testing.T) {
	pri, sec, sa := startPair(t, "synth", primaryOpts{memory: "256MiB"})
	w := dialConsole(t, pri, "w")
	if r := w.do("SET kept yes"); r != "OK" {
		t.Fatalf("SET: %q", r)
	}
	pri.kill()
	held := mustFT(t, sec, true)
	other := startPrimary(t, "primary-128", "synth", sa.data, primaryOpts{memory: "128MiB"})
	st := waitFT(t, other, 20*time.Second, "refused", func(s ftStatus) bool {
		return s.Joins >= 1 && s.Protection == "unprotected" && strings.Contains(s.ProtectionReason, "refus")
	})
	t.Logf("128 MiB primary: %s", st.ProtectionReason)
	if !strings.Contains(st.ProtectionReason, "256") || !strings.Contains(st.ProtectionReason, "128") {
		t.Errorf("refusal does not name both sizes: %q", st.ProtectionReason)
	}
	after := mustFT(t, sec, true)
	if after.LastCommittedEpoch != held.LastCommittedEpoch || after.CommittedDigest != held.CommittedDigest || !after.Consistent {
		t.Errorf("the refused primary changed the committed image: epoch %d -> %d", held.LastCommittedEpoch, after.LastCommittedEpoch)
	}
	other.kill()
	activate(t, sec)
	c := dialConsole(t, sec, "check")
	if r := c.do("GET kept"); r != "OK yes" {
		t.Errorf("activated after the refusal: GET kept = %q", r)
	}
}

// kvOp is one request of a deterministic kv script.
type kvOp struct {
	seq uint64
	cmd string
}

// kvScript is a deterministic mix of SET, GET and DEL over a few keys
// (so overwrites and deletes matter), with a deliberate retry of the
// previous request now and then, ending with a GET of every key.
func kvScript(seed uint64, n int) []kvOp {
	rng := rand.New(rand.NewPCG(seed, 7))
	const keys = 16
	var ops []kvOp
	seq := uint64(0)
	for i := 0; i < n; i++ {
		k := fmt.Sprintf("key%d", rng.IntN(keys))
		switch x := rng.IntN(100); {
		case x < 5 && len(ops) > 0:
			ops = append(ops, ops[len(ops)-1]) // a client's retry
		case x < 50:
			seq++
			ops = append(ops, kvOp{seq, fmt.Sprintf("SET %s v%d.%d", k, i, rng.Uint32())})
		case x < 85:
			seq++
			ops = append(ops, kvOp{seq, "GET " + k})
		default:
			seq++
			ops = append(ops, kvOp{seq, "DEL " + k})
		}
	}
	for k := 0; k < keys; k++ {
		seq++
		ops = append(ops, kvOp{seq, fmt.Sprintf("GET key%d", k)})
	}
	return ops
}

// target is the node a script client talks to now; a checkpoint cycle
// moves it.
type target struct {
	mu  sync.Mutex
	n   *node
	gen int
}

func (tg *target) get() (*node, int) {
	tg.mu.Lock()
	defer tg.mu.Unlock()
	return tg.n, tg.gen
}

func (tg *target) set(n *node) {
	tg.mu.Lock()
	tg.n = n
	tg.gen++
	tg.mu.Unlock()
}

// runScript sends ops one at a time, as a client that resends a request
// until it sees the reply (following tg to wherever the guest runs), and
// returns the reply to every op.
func runScript(tg *target, id string, ops []kvOp, pace time.Duration) ([]string, error) {
	replies := make([]string, len(ops))
	var c *console
	gen := -1
	defer func() {
		if c != nil {
			c.c.Close()
		}
	}()
	for i, op := range ops {
		deadline := time.Now().Add(90 * time.Second)
		for {
			n, g := tg.get()
			if c != nil && g != gen {
				c.c.Close()
				c = nil
			}
			if c == nil {
				var err error
				if c, err = dialConsoleErr(n, id); err != nil {
					c = nil
					if time.Now().After(deadline) {
						return replies, fmt.Errorf("op %d (%d %s): %w", i, op.seq, op.cmd, err)
					}
					time.Sleep(50 * time.Millisecond)
					continue
				}
				gen = g
			}
			r, err := c.requestSeq(op.seq, op.cmd, 1500*time.Millisecond)
			if err == nil {
				replies[i] = r
				break
			}
			// No reply: the node died or the guest moved. Resend (the
			// same seq) on a fresh connection to wherever it runs now.
			c.c.Close()
			c = nil
			if time.Now().After(deadline) {
				return replies, fmt.Errorf("op %d (%d %s): no reply by the deadline: %w", i, op.seq, op.cmd, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		time.Sleep(pace)
	}
	return replies, nil
}

// 4. A kv workload checkpointed and resumed at arbitrary points behaves
// exactly like one that never was. The reference run is a plain `tandem
// run`. The checked run starts on a protected pair; at random moments the
// primary is killed and the secondary activated (a failover), then the
// guest is live-migrated twice to fresh `tandem receive` nodes (an
// activated node cannot be given a new secondary from the command line,
// so further cycles are migrations). Every reply must equal the
// reference's.
func TestFTCheckpointCycles(t *testing.T) {
	t.Parallel()
	runs := 2
	if longRun {
		runs = 6
	}
	forEachKind(t, func(t *testing.T, kind string) {
		for run := 0; run < runs; run++ {
			t.Run(fmt.Sprint("run", run), func(t *testing.T) {
				seed := uint64(time.Now().UnixNano())
				t.Logf("seed %d", seed)
				rng := rand.New(rand.NewPCG(seed, 1))
				ops := kvScript(seed, 200)

				ref := startSource(t, kind, guestOpts{workload: "kv"})
				want, err := runScript(&target{n: ref}, "s", ops, 0)
				if err != nil {
					t.Fatalf("reference run: %v", err)
				}
				ref.kill()

				pri, sec, _ := startPair(t, kind, primaryOpts{})
				tg := &target{n: pri}
				type result struct {
					replies []string
					err     error
				}
				done := make(chan result, 1)
				go func() {
					r, err := runScript(tg, "s", ops, 15*time.Millisecond)
					done <- result{r, err}
				}()
				pause := func() time.Duration { return 200*time.Millisecond + time.Duration(rng.Int64N(int64(time.Second))) }
				var cycles []string
				finished := false
				var res result
				wait := func(d time.Duration) bool {
					select {
					case res = <-done:
						finished = true
					case <-time.After(d):
					}
					return finished
				}
				if !wait(pause()) {
					pri.kill()
					activate(t, sec)
					tg.set(sec)
					cycles = append(cycles, "failover")
				}
				cur := sec
				for m := 0; m < 2 && !wait(pause()); m++ {
					dst := startReceiver(t)
					r, err := startCLI("migrate", "--from", cur.api, "--to", dst.data, "--json")(2 * time.Minute)
					if err != nil || r.code != 0 {
						t.Fatalf("migration %d: exit %d, %v\n%s\n%s", m+1, r.code, err, r.stdout, r.stderr)
					}
					tg.set(dst)
					cur.kill()
					cur = dst
					cycles = append(cycles, "migration")
				}
				if !finished {
					select {
					case res = <-done:
					case <-time.After(3 * time.Minute):
						t.Fatal("script did not finish")
					}
				}
				if res.err != nil {
					t.Fatalf("checkpointed run: %v", res.err)
				}
				if len(cycles) == 0 {
					t.Errorf("the script ended before the first cycle: lengthen it")
				}
				diffs := 0
				for i := range ops {
					if res.replies[i] != want[i] {
						diffs++
						if diffs <= 10 {
							t.Errorf("op %d (%d %s): reply %q, without checkpoints %q", i, ops[i].seq, ops[i].cmd, res.replies[i], want[i])
						}
					}
				}
				t.Logf("%d ops, cycles %v, %d replies differ", len(ops), cycles, diffs)
			})
		}
	})
}

// Several clients pipelining large batches on one console: every line
// must reach the guest whole (the serial line is shared, so a client's
// partial line must not be interleaved with another client's bytes).
func TestConsolePipelinedClients(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		n := startSource(t, kind, guestOpts{workload: "kv"})
		const clients, lines = 4, 2000
		var wg sync.WaitGroup
		errs := make(chan error, clients)
		for c := 0; c < clients; c++ {
			k, err := dialConsoleErr(n, fmt.Sprintf("p%d", c))
			if err != nil {
				t.Fatal(err)
			}
			defer k.c.Close()
			wg.Add(1)
			go func() {
				defer wg.Done()
				var sb strings.Builder
				for i := 1; i <= lines; i++ {
					fmt.Fprintf(&sb, "%s:%d SET key%d-%s value%d\n", k.id, i, i, k.id, i)
				}
				k.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
				if _, err := k.c.Write([]byte(sb.String())); err != nil {
					errs <- err
					return
				}
				k.c.SetReadDeadline(time.Now().Add(20 * time.Second))
				got := 0
				for got < lines {
					line, err := k.r.ReadString('\n')
					if err != nil {
						errs <- fmt.Errorf("client %s after %d replies: %w", k.id, got, err)
						return
					}
					if !strings.HasPrefix(line, k.id+":") {
						continue
					}
					got++
					if want := fmt.Sprintf("%s:%d OK\n", k.id, got); line != want {
						errs <- fmt.Errorf("client %s: reply %q, want %q", k.id, line, want)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
}
