package kvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/block"
	"github.com/tandemvm/tandem/internal/timing"
)

// Kind is what Guest.Kind returns.
const Kind = "kvm"

// closeTimeout bounds how long Close waits for vCPU threads.
const closeTimeout = 5 * time.Second

// ErrUnavailable is returned when /dev/kvm cannot be used.
var ErrUnavailable = errors.New("kvm: /dev/kvm not usable")

// DirtyMethod selects how SyncDirty reads KVM's dirty log.
type DirtyMethod int

const (
	// DirtyGetLog uses plain KVM_GET_DIRTY_LOG, which copies, clears and
	// write-protects the dirty pages of a slot in one call. The default:
	// on this project's hosts it is as fast at 1 GiB and faster at 16 GiB
	// (doc.go has the figures).
	DirtyGetLog DirtyMethod = iota
	// DirtyManualClear uses KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (without
	// INITIALLY_SET): GET_DIRTY_LOG only copies, and CLEAR_DIRTY_LOG
	// re-protects just the 64-page runs found dirty.
	DirtyManualClear
	// DirtyRing uses a per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
	// or plain _RING): KVM pushes each page a vCPU dirties into that
	// vCPU's ring, SyncDirty harvests the rings and calls
	// KVM_RESET_DIRTY_RINGS, so its cost follows the dirty pages rather
	// than RAM. KVM_GET_DIRTY_LOG is not used (KVM answers ENXIO with the
	// ring on). A full ring stops its vCPU with KVM_EXIT_DIRTY_RING_FULL;
	// the vCPU harvests its own ring and re-enters.
	DirtyRing
)

// ParseDirtyMethod reads a --dirty-log value: get, clear or ring.
func ParseDirtyMethod(s string) (DirtyMethod, error) {
	switch s {
	case "get":
		return DirtyGetLog, nil
	case "clear":
		return DirtyManualClear, nil
	case "ring":
		return DirtyRing, nil
	}
	return DirtyGetLog, fmt.Errorf("--dirty-log %q: want get, clear or ring", s)
}

func (m DirtyMethod) String() string {
	switch m {
	case DirtyGetLog:
		return "get-dirty-log"
	case DirtyManualClear:
		return "manual-protect+clear"
	case DirtyRing:
		return "ring"
	}
	return fmt.Sprintf("DirtyMethod(%d)", int(m))
}

// Options are the less common knobs of NewWithOptions.
type Options struct {
	// NoBoot creates the VM and its vCPUs but leaves memory zero and the
	// vCPUs in their reset state: the caller writes memory into Regions()
	// and calls LoadState before Resume (restore from a received image).
	NoBoot bool
	// DirtyMethod chooses the dirty-log method.
	DirtyMethod DirtyMethod
	// DirtyRingEntries is the per-vCPU ring size for DirtyRing, a power of
	// two of at least 64; 0 means DefaultDirtyRingEntries. It should hold
	// the pages one vCPU dirties between two syncs: fewer cost a
	// ring-full exit each time it fills.
	DirtyRingEntries int
	// Disk, if set, is used instead of opening cfg.Disk (tests inject a
	// disk with a stalled flush). The guest closes it.
	Disk *block.Disk
	// faultTest makes the micro-guest raise #UD once its workload starts.
	faultTest bool
}

// Guest is a KVM virtual machine running the micro-guest. It implements
// guest.Guest, guest.Throttler and guest.Disk.
type Guest struct {
	cfg     guest.Config
	opts    Options
	flavour string
	tscKHz  uint64

	sysFd, vmFd int
	mmapSize    int
	regions     []guest.Region
	postcopy    atomic.Bool // pages may be missing (postcopy.go)
	slots       []*memSlot
	vmmDirty    []uint64 // pages the VMM wrote (and, with DirtyRing, pages harvested from rings), one bit per page of [0, topGPA)
	vmmSummary  []uint64 // bit w: vmmDirty[w] may be non-zero
	trackMask   []uint64 // TrackDirty's CLEAR_DIRTY_LOG mask, reused
	msrIndices  []uint32 // MSRs saved besides the TSC
	xsaveSize   int
	// syncRegs: KVM stores regs, sregs and events in kvm_run on request
	// (KVM_CAP_SYNC_REGS), which a pause uses (vcpu.runOnce).
	syncRegs bool

	vcpus   []*vcpu
	uart    *uart
	disk    *pvDisk
	nic     *nic // nil without --guest-ip
	console console
	sink    atomic.Pointer[func([]byte)]

	// ringMu guards every dirtyRing's fetch index and keeps a harvest and
	// its KVM_RESET_DIRTY_RINGS together, so pending pages taken by
	// SyncDirty are always re-protected already.
	ringMu      sync.Mutex
	ringEntries int           // per-vCPU ring size with DirtyRing, else 0
	ringBuf     []uint64      // takePending's run buffer, used under ringMu
	ringFulls   atomic.Uint64 // KVM_EXIT_DIRTY_RING_FULL exits served

	// ctl serialises the controlling calls (Pause, Resume, SaveState, ...).
	ctl    sync.Mutex
	paused bool
	closed bool
	// lastPageWrites is PageWrites's last figure read from guest memory
	// (under ctl).
	lastPageWrites uint64

	// mu guards resumeCh; pauseReq is written under it.
	mu       sync.Mutex
	resumeCh chan struct{}
	pauseReq atomic.Bool
	// lastPause is when Pause was last called (UnixNano): see cleanIdle.
	lastPause atomic.Int64
	// allClaimed: the last Pause found every vCPU idle (claimed it);
	// idleThrough: and every one was still waiting at the Resume (see
	// IdleThroughPause). Under ctl.
	allClaimed, idleThrough bool

	kickBuf []*vcpu // Pause's list of kicked vCPUs, under ctl

	closing    chan struct{}
	throttle   atomic.Int32
	thrOnce    sync.Once
	thrEpoch   time.Time     // set in New: throttle windows are aligned to it
	thrDone    chan struct{} // closed when throttleLoop returns
	thrStarted atomic.Bool

	progress atomic.Uint32 // the workload's last reported phase
	// exitTimes times vCPU exits once TimeExits has been called.
	exitTimes atomic.Pointer[timing.Exits]
	errMu     sync.Mutex
	err       error
	failed    chan struct{}
}

type memSlot struct {
	id      uint32
	gpa     uint64
	mem     []byte
	scratch []uint64 // GET_DIRTY_LOG buffer
}

var _ guest.Guest = (*Guest)(nil)
var _ guest.Throttler = (*Guest)(nil)
var _ guest.Disk = (*Guest)(nil)
var _ guest.DiskImage = (*Guest)(nil)
var _ guest.Networked = (*Guest)(nil)

// New creates a VM, loads the micro-guest named by cfg.Image (or
// DefaultImage) and prepares every vCPU to enter it. The guest is created
// paused; Resume runs it.
func New(cfg guest.Config) (*Guest, error) { return NewWithOptions(cfg, Options{}) }

// NewEmpty creates the VM without booting anything: memory is zero and the
// vCPUs are in reset state. The caller writes the received memory into
// Regions(), calls LoadState, then Resume.
func NewEmpty(cfg guest.Config) (*Guest, error) { return NewWithOptions(cfg, Options{NoBoot: true}) }

// NewWithOptions is New with Options.
func NewWithOptions(cfg guest.Config, opts Options) (g *Guest, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Memory < MinMemory {
		return nil, fmt.Errorf("%w: --memory %s: the kvm micro-guest needs at least %s", guest.ErrConfig, guest.FormatSize(cfg.Memory), guest.FormatSize(MinMemory))
	}
	if cfg.Memory > MaxMemory {
		return nil, fmt.Errorf("%w: --memory %s: the kvm micro-guest maps at most %s", guest.ErrConfig, guest.FormatSize(cfg.Memory), guest.FormatSize(MaxMemory))
	}
	if cfg.VCPUs > maxVCPUs {
		return nil, fmt.Errorf("%w: --vcpus %d: the kvm micro-guest runs at most %d", guest.ErrConfig, cfg.VCPUs, maxVCPUs)
	}
	if d, most := cfg.KVDirtyBytes(), (cfg.Memory-dataGPA)/2&^(guest.PageSize-1); d > most {
		// The micro-guest's data range starts at dataGPA: its kv table
		// and the dirtied top half share that, not all of --memory, and
		// it would dirty less than asked without a word.
		return nil, fmt.Errorf("%w: --touch %s with --workload kv on the kvm guest: at most %s (half of --memory %s less the micro-guest's first %s)",
			guest.ErrConfig, guest.FormatSize(d), guest.FormatSize(most), guest.FormatSize(cfg.Memory), guest.FormatSize(dataGPA))
	}
	var img *image
	if !opts.NoBoot {
		if img, err = loadImage(cfg.Image); err != nil {
			return nil, err
		}
	}
	g = &Guest{cfg: cfg, opts: opts, flavour: Flavour(), sysFd: -1, vmFd: -1,
		closing: make(chan struct{}), failed: make(chan struct{}), thrDone: make(chan struct{}),
		resumeCh: make(chan struct{}), paused: true, thrEpoch: time.Now()}
	g.pauseReq.Store(true)
	// built, not the named result: `return nil, err` sets that to nil
	// before this runs.
	built := g
	defer func() {
		if err != nil {
			built.teardown()
		}
	}()
	if err := g.openVM(); err != nil {
		return nil, err
	}
	if err := g.setupMemory(); err != nil {
		return nil, err
	}
	g.uart = newUART()
	g.console = console{g}
	if cfg.Net.Enabled() {
		ep, err := cfg.Net.Endpoint() // checked by Validate
		if err != nil {
			return nil, err
		}
		g.nic = newNIC(g, ep)
	}
	if opts.Disk != nil || cfg.Disk != "" {
		d := opts.Disk
		if d == nil {
			if d, err = block.Open(cfg.Disk, block.Options{}); err != nil {
				return nil, err
			}
		}
		g.disk = newPVDisk(g, d)
	}
	if err := g.createVCPUs(); err != nil {
		return nil, err
	}
	if img != nil {
		if err := g.boot(img); err != nil {
			return nil, err
		}
	}
	for _, v := range g.vcpus {
		v.started = true
		go v.loop()
	}
	return g, nil
}

// Flavour reports how the host provides /dev/kvm: "pvm" (kvm-pvm, where
// CPL0 guest code is emulated), "vmx", "svm" or "unknown".
func Flavour() string {
	for _, m := range []struct{ mod, name string }{{"kvm_pvm", "pvm"}, {"kvm_intel", "vmx"}, {"kvm_amd", "svm"}} {
		if _, err := os.Stat("/sys/module/" + m.mod); err == nil {
			return m.name
		}
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		s := string(b)
		switch {
		case strings.Contains(s, " vmx"):
			return "vmx"
		case strings.Contains(s, " svm"):
			return "svm"
		}
	}
	return "unknown"
}

// DirtyMethod is the dirty-log method in use: the one asked for, except
// that DirtyManualClear falls back to DirtyGetLog on a kernel without it.
func (g *Guest) DirtyMethod() DirtyMethod { return g.opts.DirtyMethod }

// Flavour is the host flavour this guest runs on (see the function Flavour).
func (g *Guest) Flavour() string { return g.flavour }

// TSCKHz is the guest TSC frequency KVM reports.
func (g *Guest) TSCKHz() uint64 { return g.tscKHz }

// Kind implements guest.Guest.
func (g *Guest) Kind() string { return Kind }

// Regions implements guest.Guest.
func (g *Guest) Regions() []guest.Region { return g.regions }

// Console implements guest.Guest.
func (g *Guest) Console() guest.Console { return g.console }

// Progress is the last phase the workload reported (1: the dirty
// workload finished touching its range).
func (g *Guest) Progress() uint32 { return g.progress.Load() }

// PageWrites implements guest.PageWriteCounter: the dirty workload's page
// writes over every vCPU, as the micro-guest stores them in guest memory
// after each batch (statsGPA), so they move with the guest's memory.
func (g *Guest) PageWrites() uint64 {
	if g.cfg.Workload.Kind != guest.WorkloadDirty && g.cfg.KVDirtyBytes() == 0 {
		return 0
	}
	g.ctl.Lock() // the mapping goes with Close
	defer g.ctl.Unlock()
	if g.closed {
		return 0
	}
	// A page a post-copy source still owes is not waited for under ctl
	// (Pause, Close and status's Paused take it): the last figure read
	// stands until the page arrives.
	if !g.arrived(statsGPA, 64*maxVCPUs) {
		return g.lastPageWrites
	}
	low := g.lowMem()
	g.faultIn(low[statsGPA : statsGPA+64*maxVCPUs])
	var n uint64
	for i := 0; i < g.cfg.VCPUs && i < maxVCPUs; i++ {
		n += atomic.LoadUint64((*uint64)(unsafe.Pointer(&low[statsGPA+64*i])))
	}
	g.lastPageWrites = n
	return n
}

// Err is the guest's failure (an exception inside the guest, a triple
// fault, a KVM error), or nil while it is healthy.
func (g *Guest) Err() error {
	g.errMu.Lock()
	defer g.errMu.Unlock()
	return g.err
}

// Failed is closed when Err becomes non-nil.
func (g *Guest) Failed() <-chan struct{} { return g.failed }

func (g *Guest) fail(err error) {
	g.errMu.Lock()
	defer g.errMu.Unlock()
	if g.err == nil {
		g.err = err
		close(g.failed)
	}
}

// Close implements guest.Guest.
func (g *Guest) Close() error {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return nil
	}
	g.closed = true
	return g.teardown()
}

// teardown stops the vCPU threads and releases everything. Memory is only
// unmapped once every vCPU thread has left KVM_RUN.
func (g *Guest) teardown() error {
	select {
	case <-g.closing:
	default:
		close(g.closing)
	}
	var errs []error
	stuck := false
	if g.thrStarted.Load() {
		<-g.thrDone // it kicks vCPUs: it must be gone before they are released
	}
	// One deadline for all: once it fired (its channel is drained), the
	// vCPUs left are only checked, or a second stuck one (on a post-copy
	// destination, every vCPU waiting in KVM_RUN for a page that never
	// comes: a kick does not end that wait) would be waited for forever.
	deadline := time.NewTimer(closeTimeout)
	defer deadline.Stop()
	for _, v := range g.vcpus {
		if !v.started {
			continue
		}
		v.kick()
		if stuck {
			select {
			case <-v.exited:
			default:
			}
			continue
		}
		select {
		case <-v.exited:
		case <-deadline.C:
			stuck = true
		}
	}
	if stuck {
		errs = append(errs, fmt.Errorf("kvm: a vCPU thread did not stop within %v; guest memory left mapped", closeTimeout))
	}
	if g.disk != nil {
		if err := g.disk.close(); err != nil {
			errs = append(errs, err)
		}
	}
	if !stuck {
		if g.nic != nil {
			g.nic.close() // it reads guest memory: before the unmap
		}
		for _, v := range g.vcpus {
			v.release()
		}
		if g.vmFd >= 0 {
			unix.Close(g.vmFd)
			g.vmFd = -1
		}
		for _, s := range g.slots {
			if err := unix.Munmap(s.mem); err != nil {
				errs = append(errs, fmt.Errorf("kvm: munmap guest RAM: %w", err))
			}
		}
		g.slots, g.regions = nil, nil
	}
	if g.sysFd >= 0 {
		unix.Close(g.sysFd)
		g.sysFd = -1
	}
	return errors.Join(errs...)
}

// Pause implements guest.Guest: it asks every vCPU to leave KVM_RUN
// (immediate_exit plus a signal at its thread) and waits until each one has
// parked with its last port I/O completed.
func (g *Guest) Pause(ctx context.Context) (time.Duration, error) {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return 0, guest.ErrClosed
	}
	if g.paused {
		return 0, nil
	}
	start := time.Now()
	g.lastPause.Store(start.UnixNano())
	g.mu.Lock()
	g.pauseReq.Store(true)
	for _, v := range g.vcpus {
		select {
		case <-v.parked:
		default:
		}
	}
	g.mu.Unlock()
	// A vCPU waiting in an idle wait with its exit completed is parked
	// already (idle): claim it, after the request is set, so it parks if
	// it wakes before the resume. Kick the others and wait for them.
	kicked := g.kickBuf[:0]
	for _, v := range g.vcpus {
		if v.idleState.CompareAndSwap(idleClean, idleClaimed) || v.idleState.Load() == idleClaimed {
			continue
		}
		v.kick()
		kicked = append(kicked, v)
	}
	g.kickBuf = kicked // kept for the next pause: no allocation per pause
	g.allClaimed = len(kicked) == 0
	for _, v := range kicked {
		select {
		case <-v.parked:
		case <-v.exited:
		case <-ctx.Done():
			return time.Since(start), fmt.Errorf("kvm: pause: vCPU %d still running after %v: %w", v.id, time.Since(start).Round(time.Microsecond), ctx.Err())
		}
	}
	g.paused = true
	return time.Since(start), nil
}

// cleanIdleWindow: a vCPU going idle completes its exit first (idle) while
// the last Pause is at most this old; a guest nobody pauses (unprotected)
// does not pay the extra KVM_RUN.
const cleanIdleWindow = time.Second

// cleanIdle reports whether a vCPU going idle should complete its exit
// first (see idle).
func (g *Guest) cleanIdle() bool {
	last := g.lastPause.Load()
	return last != 0 && time.Since(time.Unix(0, last)) < cleanIdleWindow
}

// Resume implements guest.Guest.
func (g *Guest) Resume() (time.Duration, error) {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return 0, guest.ErrClosed
	}
	start := time.Now()
	g.idleThrough = g.allClaimed
	for _, v := range g.vcpus {
		g.idleThrough = g.idleThrough && v.idleState.Load() == idleClaimed
	}
	g.allClaimed = false
	g.mu.Lock()
	if g.pauseReq.Load() {
		g.pauseReq.Store(false)
		close(g.resumeCh)
		g.resumeCh = make(chan struct{})
	}
	g.mu.Unlock()
	g.paused = false
	return time.Since(start), nil
}

// IdleThroughPause reports whether the last pause held no guest work:
// every vCPU was waiting idle when it began (Pause took each without a
// kick) and was still waiting when Resume ended it, so the guest neither
// ran nor wanted to run meanwhile. An epoch loop charges such a pause
// nothing against its pause fraction (failover: notePause).
func (g *Guest) IdleThroughPause() bool {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	return g.idleThrough
}

// Paused implements guest.Guest.
func (g *Guest) Paused() bool {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	return g.paused
}

// Flush implements guest.Guest.
func (g *Guest) Flush(ctx context.Context) error {
	if g.disk == nil {
		return nil
	}
	return g.disk.flush(ctx)
}

// TakeDiskWrites implements guest.Guest.
func (g *Guest) TakeDiskWrites() []guest.DiskWrite {
	if g.disk == nil {
		return nil
	}
	return g.disk.dev.TakeWrites()
}

// DiskSize implements guest.DiskImage (0 without a disk).
func (g *Guest) DiskSize() (uint64, error) {
	if g.disk == nil {
		return 0, nil
	}
	return g.disk.dev.Size()
}

// ReadDisk implements guest.DiskImage.
func (g *Guest) ReadDisk(p []byte, off uint64) error {
	if g.disk == nil {
		return fmt.Errorf("kvm: read of a guest without a disk")
	}
	return guest.ReadFullAt(g.disk.dev, p, off)
}

// DiskDropped implements guest.DiskImage.
func (g *Guest) DiskDropped() uint64 {
	if g.disk == nil {
		return 0
	}
	return g.disk.dev.Dropped()
}

// ApplyDiskWrites implements guest.Disk.
func (g *Guest) ApplyDiskWrites(ws []guest.DiskWrite) error {
	if g.disk == nil {
		if len(ws) == 0 {
			return nil
		}
		return fmt.Errorf("kvm: %d disk writes for a guest without a disk", len(ws))
	}
	return g.disk.dev.Apply(ws)
}

// Available reports whether /dev/kvm can be opened and speaks API 12.
func Available() error {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%w: open /dev/kvm: %v", ErrUnavailable, err)
	}
	defer unix.Close(fd)
	if v, err := ioctl(fd, kvmGetAPIVersion, 0); err != nil || v != 12 {
		return fmt.Errorf("%w: KVM API version %d (%v), want 12", ErrUnavailable, v, err)
	}
	return nil
}
