package synth

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/block"
	"github.com/tandemvm/tandem/internal/timing"
	"github.com/tandemvm/tandem/internal/uffd"
	"github.com/tandemvm/tandem/internal/vfs"
)

// Kind is the backend name in guest.MachineState.Kind.
const Kind = "synth"

// CloseTimeout bounds how long Close waits for vCPUs to stop (a vCPU can
// only be held up by an output sink that blocks, which the sink must not).
const CloseTimeout = 5 * time.Second

// Guest is the software guest. Its methods follow guest.Guest: they are
// called from one controlling goroutine; vCPUs are goroutines it owns.
type Guest struct {
	cfg     guest.Config
	mem     *memory
	regions []guest.Region
	vcpus   []*vcpu
	// exitTimes times the handler equivalents once TimeExits is called.
	exitTimes atomic.Pointer[timing.Exits]
	console   *console
	kv        *kvTable    // nil unless the workload is kv
	disk      *block.Disk // nil without --disk
	nic       *nic        // nil without --guest-ip

	// stopReq is the flag vCPUs look at between work units.
	stopReq  atomic.Bool
	throttle atomic.Int32
	// kick is closed by Pause to wake vCPUs sleeping in a work unit; a
	// fresh one is installed by Resume.
	kick    atomic.Pointer[chan struct{}]
	closing chan struct{} // closed by Close
	vcpuWG  sync.WaitGroup

	// ctl guards the run state below; vCPUs take it to park.
	ctl       sync.Mutex
	paused    bool
	closed    bool
	parked    int
	allParked chan struct{} // closed by the last vCPU to park in this pause
	resumeCh  chan struct{} // closed by Resume to release parked vCPUs

	// Controller-only state (touched while paused, or by the controller).
	booted        bool              // workload state exists in memory and vCPUs
	dirtyRange    [2]uint64         // first page and pages the dirtying vCPUs write
	diskResubmit  []guest.DiskWrite // pending writes from LoadState, issued on Resume
	diskSubmitErr atomic.Pointer[error]
}

var (
	_ guest.Guest     = (*Guest)(nil)
	_ guest.Throttler = (*Guest)(nil)
	_ guest.Disk      = (*Guest)(nil)
	_ guest.DiskImage = (*Guest)(nil)
	_ guest.Networked = (*Guest)(nil)
)

// New creates a paused guest: memory mapped and zero, vCPU goroutines
// parked, the disk opened if cfg.Disk is set. The workload boots (the kv
// table header is written; the dirty workload starts its touch phase) on
// the first Resume, unless LoadState ran before it, in which case the
// workload continues from the loaded state and the memory the caller
// wrote into Regions.
func New(cfg guest.Config) (*Guest, error) {
	return newGuest(cfg, Options{})
}

// Options are test and fault-injection hooks for NewWithOptions.
type Options struct {
	// DiskFS opens the disk file; nil means the real file system.
	DiskFS vfs.FS
}

// NewWithOptions is New with hooks.
func NewWithOptions(cfg guest.Config, opts Options) (*Guest, error) {
	return newGuest(cfg, opts)
}

// Restore builds a paused guest from a received image: New, then fill
// (which writes the image's pages into the regions; it need not mark them
// dirty), then LoadState(state). Resume starts it where the image left
// off. fill may be nil when the image's memory is all zero.
func Restore(cfg guest.Config, fill func(regions []guest.Region) error, state guest.MachineState) (*Guest, error) {
	g, err := New(cfg)
	if err != nil {
		return nil, err
	}
	if fill != nil {
		if err := fill(g.Regions()); err != nil {
			g.Close()
			return nil, fmt.Errorf("synth: restore memory: %w", err)
		}
	}
	if err := g.LoadState(state); err != nil {
		g.Close()
		return nil, err
	}
	return g, nil
}

func newGuest(cfg guest.Config, opts Options) (*Guest, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Image != "" {
		return nil, fmt.Errorf("%w: --image %s: only the kvm guest takes an image", guest.ErrConfig, cfg.Image)
	}
	var layout kvLayout
	if cfg.Workload.Kind == guest.WorkloadKV {
		l, err := layoutFor(cfg.Memory - cfg.KVDirtyBytes())
		if err != nil {
			return nil, err
		}
		layout = l
	}
	m, err := newMemory(cfg.Memory)
	if err != nil {
		return nil, err
	}
	g := &Guest{
		cfg:      cfg,
		mem:      m,
		regions:  []guest.Region{{GPA: 0, Mem: m.mem}},
		console:  newConsole(cfg.Workload.Kind == guest.WorkloadKV),
		closing:  make(chan struct{}),
		paused:   true,
		resumeCh: make(chan struct{}),
	}
	if cfg.Workload.Kind == guest.WorkloadKV {
		g.kv = &kvTable{m: m, l: layout}
	}
	if cfg.Net.Enabled() {
		ep, err := cfg.Net.Endpoint() // checked by Validate
		if err != nil {
			m.unmap()
			return nil, err
		}
		g.nic = newNIC(ep, g.console.notify)
	}
	if cfg.Disk != "" {
		d, err := block.Open(cfg.Disk, block.Options{FS: opts.DiskFS})
		if err != nil {
			m.unmap()
			return nil, fmt.Errorf("%w: --disk: %w", guest.ErrConfig, err)
		}
		g.disk = d
	}
	kick := make(chan struct{})
	close(kick) // parked vCPUs must not sleep in a unit before the first Resume
	g.kick.Store(&kick)
	g.stopReq.Store(true)

	g.startVCPUs()
	return g, nil
}

// startVCPUs makes the guest's vCPUs and starts them (parked until the
// first Resume). The dirtying vCPUs share the touched pages and the
// rate: every vCPU of a dirty guest over the first Touch bytes, or vCPUs
// 1 on of a kv guest with a rate over the top KVDirtyBytes (vCPU 0
// serves).
func (g *Guest) startVCPUs() {
	cfg := g.cfg
	touched := cfg.Workload.Touch >> guest.PageShift
	base, skip := uint64(0), uint64(0)
	switch {
	case cfg.KVDirtyBytes() > 0:
		touched = cfg.KVDirtyBytes() >> guest.PageShift
		base, skip = (cfg.Memory>>guest.PageShift)-touched, 1
	case cfg.Workload.Kind != guest.WorkloadDirty:
		touched = 0
	}
	g.dirtyRange = [2]uint64{base, touched}
	nv := uint64(cfg.VCPUs) - skip
	rate := cfg.Workload.DirtyRate
	for i := range uint64(cfg.VCPUs) {
		v := &vcpu{g: g, index: int(i)}
		if i >= skip {
			k := i - skip
			v.first = base + touched*k/nv
			v.n = touched*(k+1)/nv - touched*k/nv
			v.rate = rate / nv
			if k < rate%nv {
				v.rate++
			}
		}
		v.st.RNG = cfg.Workload.Seed ^ mix(i+1)
		g.vcpus = append(g.vcpus, v)
	}
	g.vcpuWG.Add(len(g.vcpus))
	for _, v := range g.vcpus {
		go v.run()
	}
}

// Kind is "synth".
func (g *Guest) Kind() string { return Kind }

// HugePagesOK implements guest.HugePagesOK: synth logs its own writes,
// whatever pages back its memory.
func (g *Guest) HugePagesOK() bool { return true }

// WholeWriteRanges implements guest.WholeWriter: the dirtying vCPUs'
// range, which they write every page of (a dirty guest touches it whole
// first). A protected primary and a secondary's adopted image advise it
// huge (guest.AdviseWholeWrites, from failover and replica); a guest
// that only runs or migrates does not (see failover's protect).
func (g *Guest) WholeWriteRanges() [][2]uint64 {
	if g.dirtyRange[1] == 0 {
		return nil
	}
	return [][2]uint64{g.dirtyRange}
}

// Config is the configuration the guest was built from.
func (g *Guest) Config() guest.Config { return g.cfg }

// Regions is the one region at GPA 0; nil after Close.
func (g *Guest) Regions() []guest.Region {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return nil
	}
	return g.regions
}

// BlockDisk is the guest's disk, for fault injection (StallFlush,
// FailNextWrite); nil when the guest has none.
func (g *Guest) BlockDisk() *block.Disk { return g.disk }

// Pause stops every vCPU at the end of its current work unit and returns
// when all have parked. If ctx ends first the vCPUs are let go again and
// the guest stays running.
func (g *Guest) Pause(ctx context.Context) (time.Duration, error) {
	g.ctl.Lock()
	if g.closed {
		g.ctl.Unlock()
		return 0, guest.ErrClosed
	}
	if g.paused {
		g.ctl.Unlock()
		return 0, nil
	}
	start := time.Now()
	done := make(chan struct{})
	g.parked, g.allParked, g.resumeCh = 0, done, make(chan struct{})
	g.stopReq.Store(true)
	close(*g.kick.Load())
	g.ctl.Unlock()

	select {
	case <-done:
		g.ctl.Lock()
		g.paused = true
		g.ctl.Unlock()
		return time.Since(start), nil
	case <-ctx.Done():
		g.ctl.Lock()
		g.release()
		g.ctl.Unlock()
		return time.Since(start), fmt.Errorf("synth: pause: vCPUs did not stop within the deadline: %w", ctx.Err())
	}
}

// release lets parked vCPUs run. Precondition: ctl held.
func (g *Guest) release() {
	kick := make(chan struct{})
	g.kick.Store(&kick)
	g.allParked = nil
	g.stopReq.Store(false)
	close(g.resumeCh)
}

// park blocks a vCPU until Resume or Close; false means Close.
func (g *Guest) park() bool {
	g.ctl.Lock()
	if g.closed {
		g.ctl.Unlock()
		return false
	}
	if !g.stopReq.Load() {
		g.ctl.Unlock()
		return true
	}
	g.parked++
	if g.parked == len(g.vcpus) && g.allParked != nil {
		close(g.allParked)
		g.allParked = nil
	}
	resume := g.resumeCh
	g.ctl.Unlock()
	select {
	case <-resume:
		return true
	case <-g.closing:
		return false
	}
}

// sleep parks a vCPU inside a work unit for at most d; a Pause or Close
// cuts it short.
func (g *Guest) sleep(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-*g.kick.Load():
	case <-g.closing:
	}
}

// waitInput waits for console input, a Pause or Close.
func (g *Guest) waitInput() {
	select {
	case <-g.console.notify:
	case <-*g.kick.Load():
	case <-g.closing:
	}
}

// Resume boots the workload if this is the first run and no state was
// loaded, reissues disk writes that were pending in loaded state, and lets
// the vCPUs run.
func (g *Guest) Resume() (time.Duration, error) {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return 0, guest.ErrClosed
	}
	if !g.paused {
		return 0, nil
	}
	start := time.Now()
	if g.booted && g.kv != nil && g.mem.postcopy.Load() {
		// The kv header checked below may be a page a post-copy source
		// still owes: wait for it outside ctl, which status (Paused)
		// and Pause take, and with the source gone that wait has no end.
		hdr := g.mem.mem[:guest.PageSize]
		g.ctl.Unlock()
		_ = uffd.Populate(hdr) // an error leaves the check to fault by itself
		g.ctl.Lock()
		if g.closed {
			return 0, guest.ErrClosed
		}
		if !g.paused {
			return 0, nil
		}
	}
	if !g.booted {
		if g.kv != nil {
			g.kv.boot()
		}
		if err := g.fillFromFile(); err != nil {
			return 0, err
		}
		g.booted = true
	} else if g.kv != nil {
		if err := g.kv.check(); err != nil {
			return 0, err
		}
	}
	for _, w := range g.diskResubmit {
		g.diskWrite(w.Offset, w.Data)
	}
	g.diskResubmit = nil
	g.paused = false
	g.release()
	return time.Since(start), nil
}

// SetPostcopy turns the post-copy access path on or off. On, every access
// the guest makes faults its pages in through a system call first, so a
// page missing on a post-copy destination (registered with userfaultfd)
// is waited for in the kernel, where the Go runtime can run the goroutines
// that fetch it; each vCPU is locked to its OS thread meanwhile, so
// VCPUOfThread can attribute a fault to it. Off (the default), accesses
// are plain loads and stores. Turn it on before resuming a guest whose
// pages may be missing, and off once every page arrived.
func (g *Guest) SetPostcopy(on bool) { g.mem.postcopy.Store(on) }

// VCPUOfThread returns the vCPU running on OS thread tid while post-copy
// is on, or -1.
func (g *Guest) VCPUOfThread(tid uint32) int {
	for _, v := range g.vcpus {
		if t := v.tid.Load(); t != 0 && uint32(t) == tid {
			return v.index
		}
	}
	return -1
}

// Paused reports whether the guest is paused.
func (g *Guest) Paused() bool {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	return g.paused
}

// SetThrottle keeps the vCPUs from running percent% of each 10ms slice.
func (g *Guest) SetThrottle(percent int) {
	g.throttle.Store(int32(min(max(percent, 0), 99)))
}

// PageWrites implements guest.PageWriteCounter: the dirty workload's page
// writes over every vCPU (saved with each vCPU's state).
func (g *Guest) PageWrites() uint64 {
	var n uint64
	for _, v := range g.vcpus {
		n += v.writes.Load()
	}
	return n
}

// SyncDirty moves the dirty log into dst.
func (g *Guest) SyncDirty(dst guest.DirtyLog) (uint64, error) {
	if g.isClosed() {
		return 0, guest.ErrClosed
	}
	return g.mem.sync(dst), nil
}

// MarkDirty records that the caller wrote pages [first, first+n).
func (g *Guest) MarkDirty(first, n uint64) {
	if g.isClosed() {
		return
	}
	g.mem.markRange(first, n)
}

func (g *Guest) isClosed() bool {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	return g.closed
}

// diskWrite submits a workload write. Submission fails only on a closed
// disk; a failed write is reported by the next Flush.
func (g *Guest) diskWrite(off uint64, data []byte) {
	if g.disk == nil {
		return
	}
	if err := g.disk.Write(off, data, nil); err != nil {
		g.diskSubmitErr.CompareAndSwap(nil, &err)
	}
}

// Flush makes the guest's disk writes durable, or returns an error
// wrapping guest.ErrFlushDeadline when ctx ends first.
func (g *Guest) Flush(ctx context.Context) error {
	if g.isClosed() {
		return guest.ErrClosed
	}
	if g.disk == nil {
		return nil
	}
	if p := g.diskSubmitErr.Swap(nil); p != nil {
		return *p
	}
	return g.disk.Flush(ctx)
}

// TakeDiskWrites returns the disk writes completed since the previous
// call. Precondition: paused.
func (g *Guest) TakeDiskWrites() []guest.DiskWrite {
	if g.disk == nil || g.isClosed() {
		return nil
	}
	return g.disk.TakeWrites()
}

// ApplyDiskWrites writes ws to the disk (replica side).
func (g *Guest) ApplyDiskWrites(ws []guest.DiskWrite) error {
	if g.isClosed() {
		return guest.ErrClosed
	}
	if g.disk == nil {
		if len(ws) == 0 {
			return nil
		}
		return fmt.Errorf("synth: %d disk writes for a guest without --disk", len(ws))
	}
	return g.disk.Apply(ws)
}

// DiskSize implements guest.DiskImage (0 without --disk).
func (g *Guest) DiskSize() (uint64, error) {
	if g.disk == nil {
		return 0, nil
	}
	return g.disk.Size()
}

// ReadDisk implements guest.DiskImage.
func (g *Guest) ReadDisk(p []byte, off uint64) error {
	if g.disk == nil {
		return fmt.Errorf("synth: read of a guest without --disk")
	}
	return guest.ReadFullAt(g.disk, p, off)
}

// DiskDropped implements guest.DiskImage.
func (g *Guest) DiskDropped() uint64 {
	if g.disk == nil {
		return 0
	}
	return g.disk.Dropped()
}

// Console is the guest's serial line.
func (g *Guest) Console() guest.Console { return g.console }

// NIC is the guest's network card, nil without --guest-ip.
func (g *Guest) NIC() guest.NIC {
	if g.nic == nil {
		return nil
	}
	return g.nic
}

// Close stops the vCPUs, closes the disk and unmaps memory. If a vCPU does
// not stop within CloseTimeout (a blocked output sink), memory stays
// mapped so the stuck vCPU cannot fault, and Close reports it.
func (g *Guest) Close() error {
	g.ctl.Lock()
	if g.closed {
		g.ctl.Unlock()
		return nil
	}
	g.closed = true
	g.stopReq.Store(true) // running vCPUs go to park, which sees closed
	close(g.closing)
	g.ctl.Unlock()
	g.console.close()
	if g.nic != nil {
		g.nic.close()
	}

	stopped := make(chan struct{})
	go func() { g.vcpuWG.Wait(); close(stopped) }()
	t := time.NewTimer(CloseTimeout)
	defer t.Stop()
	var errs []error
	if g.disk != nil {
		if err := g.disk.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	select {
	case <-stopped:
		if err := g.mem.unmap(); err != nil {
			errs = append(errs, err)
		}
	case <-t.C:
		errs = append(errs, fmt.Errorf("synth: close: vCPUs still running after %v; guest memory left mapped", CloseTimeout))
	}
	if len(errs) == 0 {
		return nil
	}
	if len(errs) == 1 {
		return errs[0]
	}
	return fmt.Errorf("%w; %w", errs[0], errors.Join(errs[1:]...))
}

// fillFromFile fills the dirty workload's touched range from the file of a
// file: fill, at boot, before the vCPUs run (their touch phase then only
// moves through the range). Only a booting guest reads the file: a
// restored or receiving one gets the pages with the image.
func (g *Guest) fillFromFile() error {
	w := g.cfg.Workload
	if w.Kind != guest.WorkloadDirty || guest.FillKind(w.Fill) != guest.FillKindFile {
		return nil
	}
	file, err := guest.LoadFillFile(w.Fill)
	if err != nil {
		return err
	}
	pages := min(w.Touch>>guest.PageShift, g.mem.pages())
	for p := uint64(0); p < pages; p++ {
		guest.FillFromFile(g.mem.mem[p<<guest.PageShift:(p+1)<<guest.PageShift], file, p)
	}
	g.mem.markRange(0, pages)
	return nil
}
