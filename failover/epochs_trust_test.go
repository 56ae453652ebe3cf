package failover

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// Tests of the epoch loop against secondaries that do not play along: one
// that never acknowledges, one that was activated, a target changed while
// protected, and a switchover whose requester goes away.

var trustCfg = guest.Config{Memory: 32 << 20, VCPUs: 1, Workload: guest.Workload{
	Kind: guest.WorkloadDirty, Touch: 4 << 20, DirtyRate: 1000, Pattern: guest.PatternRandom, Seed: 3}}

// serveSecondary runs a replica.Secondary on a fresh loopback listener
// until the test ends.
func serveTestSecondary(t testing.TB) (*replica.Secondary, net.Listener) {
	t.Helper()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sec := replica.NewSecondary(&replica.Receiver{NewGuest: emptyTestGuest, Log: log, Timeout: 5 * time.Second}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var serving sync.WaitGroup
		defer serving.Wait()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			serving.Add(1)
			go func() {
				defer serving.Done()
				defer conn.Close()
				sec.Serve(ctx, conn)
			}()
		}
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		sec.Close()
		wg.Wait()
	})
	return sec, ln
}

// startLoop runs an epoch loop over a fresh synth guest.
func startTrustLoop(t *testing.T, ec EpochConfig) (*EpochLoop, guest.Guest) {
	t.Helper()
	g, err := synth.New(trustCfg)
	if err != nil {
		t.Fatal(err)
	}
	ec.Guest, ec.Config = g, trustCfg
	ec.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	loop := NewEpochLoop(ec)
	if _, err := g.Resume(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		loop.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("epoch loop did not stop within 10s")
		}
		g.Close()
	})
	return loop, g
}

// A secondary that completes the handshake and then reads and discards
// everything, never acknowledging: the loop drops it after AckTimeout and
// retries, and output is never held meanwhile.
func TestEpochsSilentSecondaryIsRetried(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				if _, err := br.ReadString('\n'); err != nil {
					return
				}
				io.WriteString(c, `{"ok":true}`+"\n")
				io.Copy(io.Discard, br)
			}()
		}
	}()
	defer ln.Close()
	var released atomic.Int64
	loop, g := startTrustLoop(t, EpochConfig{AckTimeout: 400 * time.Millisecond,
		Release: func(p []byte) { released.Add(int64(len(p))) }})
	loop.SetSecondary(ln.Addr().String())
	waitFor(t, 20*time.Second, "three joins", func() bool { return loop.Status().Joins >= 3 })
	st := loop.Status()
	if st.Protected || st.AckedEpochs != 0 {
		t.Errorf("protected by a secondary that never acknowledged: %+v", st)
	}
	if !strings.Contains(st.ProtectionReason, "no acknowledgement") && st.Protection != StateJoining {
		t.Errorf("protection reason %q does not say the secondary was silent", st.ProtectionReason)
	}
	// Output flows while the silent secondary is retried: nothing is
	// held for epochs no one will acknowledge.
	before := released.Load()
	for i := 0; i < 20; i++ {
		loop.Gate().Write([]byte("hello\n"))
		time.Sleep(20 * time.Millisecond)
	}
	if got := released.Load() - before; got < 20*6 {
		t.Errorf("released %d bytes of 120 written while the secondary was silent (held: %d)", got, loop.Gate().Held())
	}
	if g.Paused() {
		t.Error("guest paused")
	}
}

// SetSecondary with a new address while protected moves the loop to the
// new secondary at once.
func TestEpochsSetSecondaryWhileProtected(t *testing.T) {
	secA, lnA := serveTestSecondary(t)
	secB, lnB := serveTestSecondary(t)
	loop, _ := startTrustLoop(t, EpochConfig{Verify: true})
	loop.SetSecondary(lnA.Addr().String())
	waitFor(t, 20*time.Second, "protected by A", func() bool {
		st := loop.Status()
		return st.Protected && st.Secondary == lnA.Addr().String()
	})
	// The same address again leaves the link alone.
	loop.SetSecondary(lnA.Addr().String())
	time.Sleep(200 * time.Millisecond)
	if st := loop.Status(); st.Joins != 1 || !st.Protected {
		t.Fatalf("the same secondary again: joins %d protected %v", st.Joins, st.Protected)
	}
	t0 := time.Now()
	loop.SetSecondary(lnB.Addr().String())
	took := waitFor(t, 20*time.Second, "protected by B", func() bool {
		st := loop.Status()
		return st.Protected && st.Secondary == lnB.Addr().String()
	})
	waitFor(t, 5*time.Second, "B to commit", func() bool { return secB.Status(false).Consistent })
	waitFor(t, 5*time.Second, "A to lose its primary", func() bool { return secA.Status(false).Primary == "" })
	t.Logf("moved to the new secondary in %v (%v)", took.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
}

// An activated secondary tells its primary over the data link: the loop
// fences itself (no output leaves, the guest is paused), and says so.
func TestEpochsFencedByActivatedSecondary(t *testing.T) {
	sec, ln := serveTestSecondary(t)
	var released atomic.Int64
	var fencedWhy atomic.Value
	loop, g := startTrustLoop(t, EpochConfig{
		Release:  func(p []byte) { released.Add(int64(len(p))) },
		OnFenced: func(why string) { fencedWhy.Store(why) },
	})
	loop.SetSecondary(ln.Addr().String())
	waitFor(t, 20*time.Second, "protected", func() bool { return loop.Status().Protected })
	g2, _, _, err := sec.Activate()
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Close()
	took := waitFor(t, 5*time.Second, "fenced", func() bool { return fencedWhy.Load() != nil })
	t.Logf("fenced %v after the activation: %v", took.Round(time.Microsecond), fencedWhy.Load())
	if st := loop.Status(); st.Protection != StateFenced || !strings.Contains(st.ProtectionReason, "activated") {
		t.Errorf("status after the fence: %q %q", st.Protection, st.ProtectionReason)
	}
	if !g.Paused() {
		t.Error("fenced primary's guest still runs")
	}
	before := released.Load()
	loop.Gate().Write([]byte("after the fence\n"))
	loop.Gate().Release(1 << 40)
	loop.Gate().Hold(false)
	if got := released.Load() - before; got != 0 {
		t.Errorf("%d bytes left a fenced primary", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := loop.FinalEpoch(ctx); err == nil || !strings.Contains(err.Error(), "fenced") {
		t.Errorf("final epoch of a fenced loop: %v", err)
	}
}

// A primary that connects to a secondary activated while it was away is
// refused with the activation and fences itself.
func TestEpochsFencedOnReconnect(t *testing.T) {
	sec, ln := serveTestSecondary(t)
	first, _ := startTrustLoop(t, EpochConfig{})
	first.SetSecondary(ln.Addr().String())
	waitFor(t, 20*time.Second, "protected", func() bool { return first.Status().Protected })
	first.SetSecondary("")
	waitFor(t, 5*time.Second, "link gone", func() bool { return sec.Status(false).Primary == "" })
	g2, _, _, err := sec.Activate()
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Close()
	first.SetSecondary(ln.Addr().String())
	waitFor(t, 5*time.Second, "fenced", func() bool { f, _ := first.Fenced(); return f })
}

// A switchover whose requester gives up after the final epoch was taken
// must not leave the guest paused: the loop resumes it and carries on,
// and a later switchover still works.
func TestFinalEpochRequesterGone(t *testing.T) {
	_, ln := serveTestSecondary(t)
	// The requester goes away exactly while the final epoch ships (the
	// guest is kept paused only for a final capture). The hook is set
	// before the loop starts: its shipper reads it for every epoch, and
	// a write while the shipper runs is a data race (make test found it).
	var cancelFinal atomic.Value
	var paused atomic.Value // func() bool: the loop's guest, once started
	testHookShip = func(uint64, *precopy.Capture) {
		p, _ := paused.Load().(func() bool)
		if c, ok := cancelFinal.Load().(context.CancelFunc); ok && c != nil && p != nil && p() {
			c()
		}
	}
	// Reset after the loop has stopped (startTrustLoop's cleanup, which
	// runs before this one).
	t.Cleanup(func() { testHookShip = nil })
	loop, g := startTrustLoop(t, EpochConfig{Verify: true})
	paused.Store(g.Paused)
	loop.SetSecondary(ln.Addr().String())
	waitFor(t, 20*time.Second, "protected", func() bool { return loop.Status().AckedEpochs >= 5 })
	for i := 0; i < 5; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		cancelFinal.Store(cancel)
		err := loop.FinalEpoch(ctx)
		cancel()
		if err == nil {
			t.Fatalf("attempt %d: final epoch succeeded for a requester that had gone", i)
		}
		waitFor(t, 2*time.Second, "the guest to run again", func() bool { return !g.Paused() })
	}
	cancelFinal.Store(context.CancelFunc(nil))
	// And at random moments: whatever the requester saw, a guest left
	// paused must have been handed over (nil).
	for i := 0; i < 10; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(i)*300*time.Microsecond)
		err := loop.FinalEpoch(ctx)
		cancel()
		if err == nil {
			t.Logf("attempt %d at %v: handed over", i, time.Duration(i)*300*time.Microsecond)
			return
		}
		waitFor(t, 2*time.Second, "the guest to run again", func() bool { return !g.Paused() })
	}
	acked := loop.Status().AckedEpochs
	waitFor(t, 5*time.Second, "epochs to go on", func() bool { return loop.Status().AckedEpochs > acked+5 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := loop.FinalEpoch(ctx); err != nil {
		t.Fatalf("a switchover after the abandoned ones: %v", err)
	}
	if !g.Paused() {
		t.Error("guest runs after a successful final epoch")
	}
}
