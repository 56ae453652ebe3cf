package failover

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// pairKinds are the guest kinds an epoch-loop test runs on: synth always,
// kvm where /dev/kvm and the micro-guest image are there.
func pairKinds(t *testing.T) []string {
	kinds := []string{synth.Kind}
	if err := kvm.Available(); err != nil {
		t.Logf("kvm not tested: %v", err)
	} else if _, err := kvm.DefaultImage(); err != nil {
		t.Logf("kvm not tested: %v", err)
	} else {
		kinds = append(kinds, kvm.Kind)
	}
	return kinds
}

func bootTestGuest(kind string, cfg guest.Config) (guest.Guest, error) {
	if kind == kvm.Kind {
		return kvm.New(cfg)
	}
	return synth.New(cfg)
}

func emptyTestGuest(kind string, cfg guest.Config) (guest.Guest, error) {
	if kind == kvm.Kind {
		return kvm.NewEmpty(cfg)
	}
	return synth.New(cfg)
}

// testPair is a running guest protected by an EpochLoop, shipping over
// real TCP on loopback to a replica.Secondary in the same process
// (serveTestSecondary, epochs_trust_test.go).
type testPair struct {
	g    guest.Guest
	cfg  guest.Config
	loop *EpochLoop
	sec  *replica.Secondary
	ln   net.Listener

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func startTestPair(t testing.TB, kind string, cfg guest.Config, ec EpochConfig) *testPair {
	t.Helper()
	g, err := bootTestGuest(kind, cfg)
	if err != nil {
		t.Fatalf("boot %s guest: %v", kind, err)
	}
	sec, ln := serveTestSecondary(t)
	p := &testPair{g: g, cfg: cfg, ln: ln, sec: sec}
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	ec.Guest, ec.Config = g, cfg
	if ec.Log == nil {
		ec.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	p.loop = NewEpochLoop(ec)
	if _, err := g.Resume(); err != nil {
		p.stop()
		t.Fatalf("resume: %v", err)
	}
	p.loop.SetSecondary(ln.Addr().String())
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.loop.Run(ctx)
	}()
	return p
}

// stop ends the loop and the secondary, then closes both guests (the
// secondary's accept loop ends with the test: serveTestSecondary).
func (p *testPair) stop() {
	p.cancel()
	p.ln.Close()
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		panic("test pair did not stop within 10s")
	}
	p.sec.Close()
	p.g.Close()
}

// checkReplicaMatches ends protection with a final epoch (the guest stays
// paused), activates the secondary's committed image and compares both
// guests' memory page by page: an independent check of what the
// per-epoch digests claim. (Machine state is left to the digests: a
// paused KVM guest's saved TSC and clock move between two saves.)
func checkReplicaMatches(t *testing.T, p *testPair) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.loop.FinalEpoch(ctx); err != nil {
		t.Fatalf("final epoch: %v", err)
	}
	g2, _, c, err := p.sec.Activate()
	if err != nil {
		t.Fatalf("activate the secondary's image: %v", err)
	}
	defer g2.Close()
	if want := p.loop.Status().LastCommittedEpoch; c.Epoch != want {
		t.Errorf("secondary committed epoch %d, primary's last acknowledged %d", c.Epoch, want)
	}
	r1, r2 := p.g.Regions(), g2.Regions()
	differ := 0
	for i := range r1 {
		for pg := uint64(0); pg < r1[i].Pages(); pg++ {
			a := r1[i].Mem[pg<<guest.PageShift : (pg+1)<<guest.PageShift]
			b := r2[i].Mem[pg<<guest.PageShift : (pg+1)<<guest.PageShift]
			if !bytes.Equal(a, b) {
				if differ < 5 {
					t.Errorf("page %d differs between the primary and the replica", r1[i].FirstPage()+pg)
				}
				differ++
			}
		}
	}
	if differ > 0 {
		t.Errorf("%d pages differ: the replica diverged", differ)
	}
}

// TestEpochsJoinWhileShippingIsSlow is the regression test for a replica
// that silently diverged after a join: every capture slot of the pipeline
// aliased one buffer, so an epoch captured while the shipper still
// encoded the previous one overwrote that epoch's pages. The hook makes
// the first epochs after the join ship slower than the interval (as a
// touch phase's large epochs did on the KVM guest), which made the
// overlap certain; every epoch must still verify and the final image
// must equal the primary's.
func TestEpochsJoinWhileShippingIsSlow(t *testing.T) {
	for _, kind := range pairKinds(t) {
		t.Run(kind, func(t *testing.T) {
			var slowed sync.Map
			testHookShip = func(gateEpoch uint64, _ *precopy.Capture) {
				// The first three epochs of the link each take three
				// intervals to ship.
				if gateEpoch <= 4 {
					if _, again := slowed.LoadOrStore(gateEpoch, true); !again {
						time.Sleep(75 * time.Millisecond)
					}
				}
			}
			defer func() { testHookShip = nil }()
			cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{
				Kind: guest.WorkloadDirty, Touch: 16 << 20, DirtyRate: 4000, Pattern: guest.PatternRandom, Seed: 7}}
			p := startTestPair(t, kind, cfg, EpochConfig{Verify: true})
			defer p.stop()
			waitFor(t, 30*time.Second, "40 verified epochs", func() bool { return p.loop.Status().VerifiedEpochs >= 40 })
			st := p.loop.Status()
			if st.DigestMismatches != 0 {
				t.Errorf("%d digest mismatches in %d verified epochs; last: %s", st.DigestMismatches, st.VerifiedEpochs, st.LastMismatch)
			}
			if st.Joins != 1 {
				t.Errorf("joins %d, want 1 (a stream torn under the encoder fails its checksum and reconnects)", st.Joins)
			}
			checkReplicaMatches(t, p)
		})
	}
}

// TestSecondaryCloseWhileStreaming stops a secondary while its primary
// streams epochs into it (a secondary stopped with SIGTERM died of SIGSEGV:
// its guest was unmapped under a commit in progress). Close must wait for
// the stream to let go; the primary carries on unprotected.
func TestSecondaryCloseWhileStreaming(t *testing.T) {
	for _, kind := range pairKinds(t) {
		t.Run(kind, func(t *testing.T) {
			cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{
				Kind: guest.WorkloadDirty, Touch: 16 << 20, DirtyRate: 4000, Pattern: guest.PatternSeq}}
			p := startTestPair(t, kind, cfg, EpochConfig{Verify: true})
			defer p.stop()
			waitFor(t, 20*time.Second, "protection", func() bool { return p.loop.Status().AckedEpochs >= 10 })
			p.ln.Close() // no reconnect into a closed secondary
			p.sec.Close()
			if st := p.sec.Status(false); st.Primary != "" {
				t.Errorf("secondary still serves %s after Close", st.Primary)
			}
			waitFor(t, 10*time.Second, "the primary to notice", func() bool { return !p.loop.Status().Protected })
		})
	}
}

// pageAt returns the guest page holding gpa.
func pageAt(t *testing.T, g guest.Guest, gpa uint64) []byte {
	t.Helper()
	for _, r := range g.Regions() {
		if gpa >= r.GPA && gpa < r.GPA+uint64(len(r.Mem)) {
			off := (gpa - r.GPA) &^ (guest.PageSize - 1)
			return r.Mem[off : off+guest.PageSize]
		}
	}
	t.Fatalf("no region holds %#x", gpa)
	return nil
}

// incidentRecorder keeps what the loop told the cluster.
type incidentRecorder struct {
	mu          sync.Mutex
	committed   []uint64
	unprotected []string
	protected   int
}

func (r *incidentRecorder) config(ec EpochConfig) EpochConfig {
	ec.OnCommitted = func(e uint64) {
		r.mu.Lock()
		r.committed = append(r.committed, e)
		r.mu.Unlock()
	}
	ec.OnProtected = func(p bool, why string) {
		r.mu.Lock()
		if p {
			r.protected++
		} else {
			r.unprotected = append(r.unprotected, why)
		}
		r.mu.Unlock()
	}
	return ec
}

// checkIncident waits for a mismatch to be found, handled as an incident
// and resolved by a re-sync, then proves the replica matches.
func checkIncident(t *testing.T, p *testPair, rec *incidentRecorder, wantDetail string) {
	t.Helper()
	waitFor(t, 20*time.Second, "the mismatch to be found", func() bool { return p.loop.Status().DigestMismatches > 0 })
	st := p.loop.Status()
	if !strings.Contains(st.LastMismatch, wantDetail) {
		t.Errorf("last mismatch %q, want it to say %q", st.LastMismatch, wantDetail)
	}
	if st.LastMismatchAt == "" || !strings.HasPrefix(st.LastMismatchResolution, "re-syncing") && !strings.HasPrefix(st.LastMismatchResolution, "resolved") {
		t.Errorf("status of the mismatch: at %q, resolution %q", st.LastMismatchAt, st.LastMismatchResolution)
	}
	bad := st.LastMismatchEpoch
	waitFor(t, 30*time.Second, "a verified re-sync", func() bool {
		st := p.loop.Status()
		return st.Protected && strings.HasPrefix(st.LastMismatchResolution, "resolved")
	})
	st = p.loop.Status()
	if st.Joins < 2 {
		t.Errorf("joins %d: the secondary was not re-synced", st.Joins)
	}
	if st.DigestMismatches != 1 {
		t.Errorf("%d mismatches counted for one incident", st.DigestMismatches)
	}
	rec.mu.Lock()
	unprotected, protected := len(rec.unprotected), rec.protected
	for _, e := range rec.committed {
		if e == bad && strings.HasPrefix(st.LastMismatch, fmt.Sprintf("epoch %d:", bad)) {
			t.Errorf("epoch %d failed verification but was reported committed", bad)
		}
	}
	rec.mu.Unlock()
	if unprotected < 1 || protected < 2 {
		t.Errorf("the cluster was told unprotected %d times and protected %d times; want the loss and the return", unprotected, protected)
	}
	t.Logf("mismatch at epoch %d; %s", bad, st.LastMismatchResolution)
	checkReplicaMatches(t, p)
}

// TestEscapedWriteIsAnIncident writes a page of the running primary
// behind the dirty log's back (as a dirty-tracking bug would): the
// rotating slice must find it, protection must end, and a full re-sync
// must bring back a replica that matches page for page.
func TestEscapedWriteIsAnIncident(t *testing.T) {
	for _, kind := range pairKinds(t) {
		t.Run(kind, func(t *testing.T) {
			cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{
				Kind: guest.WorkloadDirty, Touch: 16 << 20, DirtyRate: 4000, Pattern: guest.PatternSeq}}
			rec := &incidentRecorder{}
			p := startTestPair(t, kind, cfg, rec.config(EpochConfig{Verify: true}))
			defer p.stop()
			waitFor(t, 30*time.Second, "10 verified epochs", func() bool { return p.loop.Status().VerifiedEpochs >= 10 })
			// 48 MiB: past the touched range on both backends.
			page := pageAt(t, p.g, 48<<20)
			page[100] ^= 0x5a
			checkIncident(t, p, rec, "escaped dirty tracking")
		})
	}
}

// TestCorruptEpochIsAnIncident damages one page of one epoch after its
// digest was taken (as a bug in encoding or transport would): the
// secondary's digest must differ, that epoch must not count as
// committed, and the re-sync must restore a matching replica.
func TestCorruptEpochIsAnIncident(t *testing.T) {
	for _, kind := range pairKinds(t) {
		t.Run(kind, func(t *testing.T) {
			var once sync.Once
			var armed atomic.Bool
			testHookShip = func(_ uint64, cp *precopy.Capture) {
				if armed.Load() && len(cp.Pages) > 0 {
					once.Do(func() { cp.Pages[0].Data[7] ^= 0xff })
				}
			}
			defer func() { testHookShip = nil }()
			cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{
				Kind: guest.WorkloadDirty, Touch: 16 << 20, DirtyRate: 4000, Pattern: guest.PatternSeq}}
			rec := &incidentRecorder{}
			p := startTestPair(t, kind, cfg, rec.config(EpochConfig{Verify: true}))
			defer p.stop()
			waitFor(t, 30*time.Second, "10 verified epochs", func() bool { return p.loop.Status().VerifiedEpochs >= 10 })
			armed.Store(true)
			checkIncident(t, p, rec, "primary digest")
		})
	}
}

// TestSecondRefusedWhilePrimaryLive: a second sender (here with the same
// guest kind and size, as a forger would claim) is refused while the
// secondary's primary streams, and the primary stays protected on its
// one link.
func TestSecondSenderRefusedWhilePrimaryLive(t *testing.T) {
	cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{
		Kind: guest.WorkloadDirty, Touch: 16 << 20, DirtyRate: 4000, Pattern: guest.PatternSeq}}
	p := startTestPair(t, synth.Kind, cfg, EpochConfig{Verify: true})
	defer p.stop()
	waitFor(t, 30*time.Second, "10 verified epochs", func() bool { return p.loop.Status().VerifiedEpochs >= 10 })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hello := replica.Hello{Purpose: replica.PurposeReplicate, Kind: synth.Kind, Config: cfg}
	link, err := replica.Dial(ctx, p.ln.Addr().String(), hello, p.g.Regions(), replica.DialOptions{Timeout: 2 * time.Second})
	if err == nil {
		link.Close()
		t.Fatal("a second sender was accepted while the primary streams")
	}
	if !strings.Contains(err.Error(), "second sender") {
		t.Errorf("refusal %q does not say why", err)
	}
	before := p.loop.Status()
	time.Sleep(300 * time.Millisecond)
	st := p.loop.Status()
	if !st.Protected || st.Joins != 1 || st.AckedEpochs <= before.AckedEpochs {
		t.Errorf("the primary after the refused sender: protected %v, joins %d, acked %d -> %d", st.Protected, st.Joins, before.AckedEpochs, st.AckedEpochs)
	}
}
