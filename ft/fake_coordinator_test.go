package ft

import (
	"context"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/clock"
	"github.com/tandemvm/tandem/internal/tap"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

// fakeCoord is a Coordinator whose state the test sets and whose calls it
// reads back: the driver's decisions are checked against what it told
// its coordinator, with no raft underneath.
type fakeCoord struct {
	id     string
	events chan failover.Event

	// mu guards the fields below.
	mu       sync.Mutex
	st       failover.FSMState
	images   []failover.Image // every SetImage, in order
	cleared  int              // ClearImage calls
	records  []bool           // every SetProtected, in order
	reported uint64           // highest ReportEpoch
	sec      failover.NodeInfo
	// setProtected, if set, runs before a record is kept (a test blocks
	// it to hold a record "on its way").
	setProtected func(ctx context.Context, protected bool) error
	// switchover, if set, answers Switchover; reportedAtSwitch is the
	// epoch reported when it was called.
	switchover       func(ctx context.Context) error
	reportedAtSwitch uint64
	switchovers      int
}

func newFakeCoord(id string) *fakeCoord {
	return &fakeCoord{id: id, events: make(chan failover.Event, 16)}
}

func (f *fakeCoord) ID() string                                   { return f.id }
func (f *fakeCoord) WaitSynced(context.Context) error             { return nil }
func (f *fakeCoord) Events() <-chan failover.Event                { return f.events }
func (f *fakeCoord) CanRelease(uint64) bool                       { return true }
func (f *fakeCoord) SecondaryName(string) string                  { return "" }
func (f *fakeCoord) AdmitPrimary(context.Context, net.Conn) error { return nil }
func (f *fakeCoord) DataHeartbeat()                               {}

func (f *fakeCoord) State() failover.FSMState {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.st
}

func (f *fakeCoord) setState(st failover.FSMState) {
	f.mu.Lock()
	f.st = st
	f.mu.Unlock()
}

func (f *fakeCoord) SetProtected(ctx context.Context, protected bool) error {
	f.mu.Lock()
	hook := f.setProtected
	f.mu.Unlock()
	if hook != nil {
		if err := hook(ctx, protected); err != nil {
			return err
		}
	}
	f.mu.Lock()
	f.records = append(f.records, protected)
	f.mu.Unlock()
	return nil
}

func (f *fakeCoord) protectionRecords() []bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]bool(nil), f.records...)
}

func (f *fakeCoord) ReportEpoch(epoch uint64) {
	f.mu.Lock()
	f.reported = max(f.reported, epoch)
	f.mu.Unlock()
}

func (f *fakeCoord) SetImage(img failover.Image) {
	f.mu.Lock()
	f.images = append(f.images, img)
	f.mu.Unlock()
}

func (f *fakeCoord) ClearImage() {
	f.mu.Lock()
	f.cleared++
	f.mu.Unlock()
}

// lastImage is the last claim the driver made, and how many ClearImage
// calls there were.
func (f *fakeCoord) lastImage() (failover.Image, int, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.images) == 0 {
		return failover.Image{}, f.cleared, false
	}
	return f.images[len(f.images)-1], f.cleared, true
}

func (f *fakeCoord) Secondary() (failover.NodeInfo, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sec, f.sec.DataAddr != ""
}

func (f *fakeCoord) Switchover(ctx context.Context, to string) error {
	f.mu.Lock()
	f.switchovers++
	f.reportedAtSwitch = f.reported
	hook := f.switchover
	f.mu.Unlock()
	if hook == nil {
		return nil
	}
	return hook(ctx)
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// testGuestConfig is a small kv guest: a full sync takes milliseconds.
var testGuestConfig = guest.Config{Memory: 8 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}

func testEpochs() EpochSettings {
	return EpochSettings{Interval: 10 * time.Millisecond, FlushBudget: 50 * time.Millisecond, Verify: true,
		VerifySlicePages: 64, MaxInFlight: 4, AckTimeout: 5 * time.Second}
}

// testNode is a guest node on loopback ports, closed at the test's end
// (after any member built on it is stopped: cleanups run last first).
func testNode(t *testing.T, role string) *Node {
	t.Helper()
	return testNodeWith(t, NodeConfig{Role: role})
}

// testNodeWith is testNode with more of the configuration given.
func testNodeWith(t testing.TB, nc NodeConfig) *Node {
	t.Helper()
	nc.APIAddr, nc.ConsoleAddr, nc.Log = "127.0.0.1:0", "127.0.0.1:0", quietLog()
	n, err := NewNode(nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	return n
}

// bootCounter boots guests (synth unless kind says) and counts the boots.
type bootCounter struct {
	cfg   *guest.Config // nil: testGuestConfig
	kind  string        // "": synth
	mu    sync.Mutex
	boots int
	last  guest.Guest
}

func (b *bootCounter) boot() (guest.Guest, error) {
	cfg := testGuestConfig
	if b.cfg != nil {
		cfg = *b.cfg
	}
	kind := b.kind
	if kind == "" {
		kind = synth.Kind
	}
	g, err := BootGuest(kind, cfg, kvm.DirtyGetLog)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	b.boots++
	b.last = g
	b.mu.Unlock()
	return g, nil
}

func (b *bootCounter) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.boots
}

// memberOpts are what a test member differs in.
type memberOpts struct {
	boot     *bootCounter // nil: never boots
	fresh    bool
	data     bool // serve a data port (a secondary)
	keepAct  bool
	clock    clock.Clock
	coord    Coordinator
	receiver *replica.Receiver
	net      *tap.Device    // the node's guest network (nil: none)
	epochs   *EpochSettings // nil: testEpochs()
}

// startMember builds and starts a member on a fresh test node; it is
// stopped at the test's end.
func startMember(t testing.TB, role string, o memberOpts) (*Member, *Node) {
	t.Helper()
	n := testNodeWith(t, NodeConfig{Role: role, Net: o.net})
	cfg := MemberConfig{Node: n, Coordinator: o.coord, Epochs: testEpochs(), Fresh: o.fresh, KeepActivated: o.keepAct,
		Clock: o.clock, Log: quietLog(), BootConfig: testGuestConfig,
		Receiver: &replica.Receiver{NewGuest: EmptyGuest, Build: version.Build(), Log: quietLog(), Timeout: 5 * time.Second}}
	if o.epochs != nil {
		cfg.Epochs = *o.epochs
	}
	if o.boot != nil {
		cfg.Boot = o.boot.boot
		if o.boot.cfg != nil {
			cfg.BootConfig = *o.boot.cfg
		}
	}
	if o.data {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		cfg.Data = ln
	}
	m := NewMember(cfg)
	t.Cleanup(m.Stop)
	m.Start()
	return m, n
}

// eventually waits (at most 20 s) for cond, failing the test with what.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("never: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// nodeView is the part of a node's state the tests read, under its lock.
type nodeView struct {
	role, state, reason string
	g                   guest.Guest
	sec                 *replica.Secondary
	loop                *failover.EpochLoop
}

func viewOf(n *Node) nodeView {
	n.mu.Lock()
	defer n.mu.Unlock()
	return nodeView{role: n.role, state: n.state, reason: n.stateReason, g: n.g, sec: n.sec, loop: n.epochs}
}

// kept is the guest the member keeps paused (booted or fenced), and the
// generation it ran under.
func (m *Member) kept() (guest.Guest, uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.boot, m.bootGen
}
