package precopy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/internal/clock"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/timing"
)

// Phase names, used for timings, the slow log and downtime breakdowns.
const (
	PhasePause     = "pause"
	PhaseFlush     = "flush"
	PhaseDirtySync = "dirty_sync"
	PhaseStateSave = "state_save"
	PhaseCopy      = "copy"
	PhaseResume    = "resume"
	PhaseSend      = "final_send"
	PhaseDestLoad  = "destination_load"
	// PhaseHook is CaptureOptions.WhilePaused: an epoch loop's output
	// seal and its verification slice.
	PhaseHook = "paused_hook"
	// PhaseDiskResync reads the whole disk for a full disk resync.
	PhaseDiskResync = "disk_resync"
)

// Core is the dirty-tracking and capture machinery one guest needs for any
// precopy run (a migration or an FT epoch stream): the guest, its dirty
// Bitmap and the named timings. One goroutine drives a Core.
type Core struct {
	G       guest.Guest
	Dirty   *Bitmap
	Timings *timing.Recorder // nil: not recorded
	// Clock stamps each Capture's PausedAt (an epoch's acknowledgement
	// latency is measured from it); nil means clock.Real. Phase
	// durations are measurements only and stay on the time package.
	Clock clock.Clock

	// pageBuf is reused by Capture for staged page copies.
	pageBuf []byte

	// diskResync asks the next Capture to ship the whole disk (a
	// catch-up: the receiver's copy is of unknown age). diskDropped is
	// the guest's dropped-write count the last Capture saw: a rise means
	// writes are missing from the log, and forces the same.
	diskResync  bool
	diskDropped uint64
	// DiskResyncs counts the captures that shipped the whole disk.
	DiskResyncs uint64
	// tap, if set (SetTap), is given every page a sync of this Core
	// found dirty. From, if set, is where this Core's syncs take dirty
	// pages instead of the guest's log, which another Core reads (see
	// DirtyTap). Set From before the Core's first sync.
	tap  atomic.Pointer[DirtyTap]
	From *DirtyTap
}

// SetTap makes every later sync of c add what it found to t (nil: stop).
// Safe while c's owner syncs.
func (c *Core) SetTap(t *DirtyTap) { c.tap.Store(t) }

// syncDirty marks the pages written since the last sync: from the
// guest's log (and into the tap), or from From.
func (c *Core) syncDirty() (uint64, error) {
	if c.From != nil {
		return c.From.take(c.Dirty), nil
	}
	n, err := c.G.SyncDirty(c.Dirty)
	if t := c.tap.Load(); t != nil {
		t.add(c.Dirty) // even after an error: a superset is harmless
	}
	return n, err
}

// ResyncDisk makes the next Capture ship the guest's whole disk instead of
// the writes since the last one (guests implementing guest.DiskImage).
func (c *Core) ResyncDisk() { c.diskResync = true }

// NewCore prepares g for precopy runs. The bitmap spans every page below
// the end of the highest region.
func NewCore(g guest.Guest, t *timing.Recorder) *Core {
	return &Core{G: g, Dirty: NewBitmap(guest.PageLimit(g.Regions())), Timings: t}
}

// clock is c.Clock, or the real one.
func (c *Core) clock() clock.Clock { return clock.Or(c.Clock) }

func (c *Core) observe(name string, start time.Time, d time.Duration) {
	if c.Timings != nil {
		c.Timings.Observe(name, start, d)
	}
}

// Sync moves the guest's dirty log into the Bitmap and returns how many
// pages were newly dirty.
func (c *Core) Sync() (uint64, error) {
	t0 := time.Now()
	n, err := c.syncDirty()
	c.observe(PhaseDirtySync, t0, time.Since(t0))
	return n, err
}

// Page returns the guest's page at index, or nil if index lies in no
// region.
func (c *Core) Page(index uint64) []byte { return guest.PageOf(c.G.Regions(), index) }

// Breakdown is where one pause's time went. The fields sum to Total for
// the source's part; a migration adds the destination's part.
type Breakdown struct {
	Pause     time.Duration `json:"pause_vcpus_ns"`
	Flush     time.Duration `json:"flush_ns"`
	DirtySync time.Duration `json:"dirty_sync_ns"`
	StateSave time.Duration `json:"state_save_ns"`
	// DiskResync is reading the whole disk, when this capture ships it.
	DiskResync time.Duration `json:"disk_resync_ns,omitempty"`
	Copy       time.Duration `json:"copy_ns"`
	Hook       time.Duration `json:"hook_ns"`
	Resume     time.Duration `json:"resume_ns"`
}

// Total is the sum of the phases.
func (b Breakdown) Total() time.Duration {
	return b.Pause + b.Flush + b.DirtySync + b.StateSave + b.DiskResync + b.Copy + b.Hook + b.Resume
}

// Capture is what one pause took from the guest: copies of the dirty pages
// as they were at the pause, the machine state and the disk writes.
type Capture struct {
	PausedAt time.Time
	Pages    []checkpoint.Page // Data points into the Core's buffer until the next Capture
	State    guest.MachineState
	Disk     []guest.DiskWrite
	// DiskResync, if set, says why Disk is the whole disk rather than
	// the writes since the last capture.
	DiskResync string
	Breakdown  Breakdown
	// Resumed is false when the capture left the guest paused.
	Resumed bool
	// Buffer backs Pages; hand it back as CaptureOptions.Buffer to reuse.
	Buffer []byte
}

// CaptureOptions tune one Capture.
type CaptureOptions struct {
	// FlushBudget bounds the flush; 0 means no flush at all.
	FlushBudget time.Duration
	// KeepPaused leaves the guest paused (a migration's final pause).
	KeepPaused bool
	// WhilePaused runs after the state save with the guest still paused
	// (an epoch loop seals its output gate and takes its digest here).
	WhilePaused func(*Capture) error
	// InPlace (only with KeepPaused) hands out the dirty pages as slices
	// of guest memory instead of copies: the guest stays paused, so they
	// hold still, and a migration's final pause skips a copy of every
	// remaining page. They are valid until the guest resumes.
	InPlace bool
	// Buffer, if non-nil, receives the page copies (grown when too small,
	// so an empty non-nil slice works), and a pipeline that gives each
	// capture in flight its own Buffer can keep several alive at once. A
	// nil Buffer means the Core's own buffer: every such Capture reuses
	// it, and the previous Capture's pages die. Never seed a pipeline with
	// nil buffers: they would all alias the Core's.
	Buffer []byte
}

// ErrFlushAborted wraps guest.ErrFlushDeadline when a capture gave up
// because the flush missed its budget; the guest has been resumed.
var ErrFlushAborted = errors.New("precopy: completion aborted: flush missed its deadline, guest resumed")

// Capture pauses the guest, flushes in-flight I/O within the budget, syncs
// the dirty log, saves state, copies the dirty pages and (unless
// KeepPaused) resumes. If the flush misses its budget the guest is resumed
// at once and the error wraps ErrFlushAborted: the guest is never held
// paused waiting for I/O. On any other error the guest is resumed too. On
// error the returned Capture (nil only if the pause itself failed) holds
// the breakdown of the aborted pause and nothing else is valid.
func (c *Core) Capture(ctx context.Context, o CaptureOptions) (*Capture, error) {
	cp := &Capture{PausedAt: c.clock().Now()}
	d, err := c.G.Pause(ctx)
	cp.Breakdown.Pause = d
	c.observe(PhasePause, cp.PausedAt, d)
	if err != nil {
		return nil, fmt.Errorf("pause: %w", err)
	}
	fail := func(err error) (*Capture, error) {
		t0 := time.Now()
		d, _ := c.G.Resume()
		cp.Breakdown.Resume = d
		c.observe(PhaseResume, t0, time.Since(t0))
		return cp, err
	}
	if o.FlushBudget > 0 {
		t0 := time.Now()
		fctx, cancel := context.WithTimeout(ctx, o.FlushBudget)
		err := c.G.Flush(fctx)
		cancel()
		cp.Breakdown.Flush = time.Since(t0)
		c.observe(PhaseFlush, t0, cp.Breakdown.Flush)
		if err != nil {
			if errors.Is(err, guest.ErrFlushDeadline) || errors.Is(err, context.DeadlineExceeded) {
				return fail(fmt.Errorf("%w (budget %v): %w", ErrFlushAborted, o.FlushBudget, err))
			}
			return fail(fmt.Errorf("flush: %w", err))
		}
	}
	t0 := time.Now()
	if _, err := c.syncDirty(); err != nil {
		return fail(fmt.Errorf("dirty sync: %w", err))
	}
	cp.Breakdown.DirtySync = time.Since(t0)
	c.observe(PhaseDirtySync, t0, cp.Breakdown.DirtySync)

	t0 = time.Now()
	st, err := c.G.SaveState()
	if err != nil {
		return fail(fmt.Errorf("state save: %w", err))
	}
	cp.State = st
	cp.Disk = c.G.TakeDiskWrites()
	cp.Breakdown.StateSave = time.Since(t0)
	c.observe(PhaseStateSave, t0, cp.Breakdown.StateSave)
	if err := c.resyncDisk(cp); err != nil {
		return fail(err)
	}

	t0 = time.Now()
	cp.Pages = c.takeDirty()
	if !(o.InPlace && o.KeepPaused) {
		cp.Buffer = c.copyPages(cp.Pages, o.Buffer)
	}
	cp.Breakdown.Copy = time.Since(t0)
	c.observe(PhaseCopy, t0, cp.Breakdown.Copy)

	if o.WhilePaused != nil {
		t0 = time.Now()
		err := o.WhilePaused(cp)
		cp.Breakdown.Hook = time.Since(t0)
		c.observe(PhaseHook, t0, cp.Breakdown.Hook)
		if err != nil {
			return fail(err)
		}
	}
	if !o.KeepPaused {
		t0 = time.Now()
		d, err := c.G.Resume()
		cp.Breakdown.Resume = d
		c.observe(PhaseResume, t0, time.Since(t0))
		if err != nil {
			return nil, fmt.Errorf("resume: %w", err)
		}
		cp.Resumed = true
	}
	return cp, nil
}

// diskResyncChunk is the piece in which a whole disk is read and shipped.
const diskResyncChunk = 1 << 20

// MaxDiskResync is the largest disk shipped whole in one epoch: a
// receiver stages an epoch whole, and its default bound on an epoch's
// disk writes (replica.DefaultMaxEpochDisk) is this.
const MaxDiskResync = 256 << 20

// resyncDisk replaces cp.Disk by the whole disk when a catch-up asked for
// it or the guest's disk-write log dropped writes since the last capture
// (the replica's copy then misses them: only the whole disk repairs it).
// Precondition: paused, writes flushed (the captured log is complete).
func (c *Core) resyncDisk(cp *Capture) error {
	d, ok := c.G.(guest.DiskImage)
	if !ok {
		return nil
	}
	// The trigger is consumed only once the whole disk is in cp (or
	// cannot be): a failed read leaves it for the next capture.
	why := ""
	dropped := d.DiskDropped()
	if dropped != c.diskDropped {
		why = fmt.Sprintf("the disk-write log dropped %d writes (over its bound)", dropped-c.diskDropped)
	} else if c.diskResync {
		why = "a catch-up: the replica's disk copy is of unknown age"
	}
	if why == "" {
		return nil
	}
	size, err := d.DiskSize()
	if err != nil {
		return fmt.Errorf("disk resync: %w", err)
	}
	consumed := func() { c.diskDropped, c.diskResync = dropped, false }
	if size == 0 {
		// No disk (or an empty one): nothing to ship, and a size mark
		// would be a disk write for a guest without a disk.
		consumed()
		return nil
	}
	if size > MaxDiskResync {
		// One epoch cannot carry it (a receiver stages an epoch whole):
		// ship the writes as before, and say the replica's copy must be
		// made equal by other means.
		slog.Error("precopy: the disk is too large to resync whole in one epoch; the replica's disk copy must already equal this one",
			"why", why, "bytes", size, "limit", MaxDiskResync)
		consumed()
		return nil
	}
	t0 := time.Now()
	whole := make([]byte, size) // one buffer, shipped in chunks after the resume
	ws := make([]guest.DiskWrite, 0, (size+diskResyncChunk-1)/diskResyncChunk+1)
	for off := uint64(0); off < size; off += diskResyncChunk {
		p := whole[off:min(off+diskResyncChunk, size):min(off+diskResyncChunk, size)]
		if err := d.ReadDisk(p, off); err != nil {
			return fmt.Errorf("disk resync: read at %d: %w", off, err)
		}
		ws = append(ws, guest.DiskWrite{Offset: off, Data: p})
	}
	// The size mark: a replica's longer disk file is cut to this size.
	ws = append(ws, guest.DiskWrite{Offset: size})
	cp.Disk = ws
	cp.DiskResync = why
	consumed()
	c.DiskResyncs++
	cp.Breakdown.DiskResync = time.Since(t0)
	c.observe(PhaseDiskResync, t0, cp.Breakdown.DiskResync)
	slog.Warn("precopy: shipping the whole disk", "why", why, "bytes", size, "took", time.Since(t0).Round(time.Microsecond))
	return nil
}

// takeDirty takes every dirty page out of the Bitmap as slices of guest
// memory.
func (c *Core) takeDirty() []checkpoint.Page {
	pages := make([]checkpoint.Page, 0, c.Dirty.Count())
	idx := make([]uint64, 1024)
	for from := uint64(0); ; {
		k, next := c.Dirty.TakeBatch(idx, from)
		for _, p := range idx[:k] {
			if src := c.Page(p); src != nil {
				pages = append(pages, checkpoint.Page{Index: p, Data: src})
			}
		}
		if k < len(idx) {
			return pages
		}
		from = next
	}
}

// newCaptureBuffer allocates a capture buffer of size bytes with its
// memory populated (guest.PrefaultWrite: the whole pages it covers), so
// the copy into it does not take a page fault per page: a fresh 9 MiB
// buffer grown inside an epoch's pause made that pause 10 to 30 ms on a
// host where a fault costs 13 us.
func newCaptureBuffer(size int) []byte {
	buf := make([]byte, size)
	guest.PrefaultWrite(buf, false)
	return buf
}

// captureHeadroomMax bounds the room ReserveCapture keeps beyond the last
// epoch, and a buffer grown in a pause beyond its epoch: a catch-up's
// large captures do not double their buffers.
const captureHeadroomMax = 16 << 20

// captureShrinkFloor: ReserveCapture replaces a buffer four times larger
// than it needs only past this size (the first epochs after a join can
// be most of the guest, and a slot would keep that for the link's life).
const captureShrinkFloor = 64 << 20

// ReserveCapture returns buf, or a new empty buffer with room for an
// epoch of pages plus as much again (at most captureHeadroomMax more) when
// buf has less, or when buf is over four times that and over
// captureShrinkFloor. An epoch loop calls it on a capture's buffer after
// shipping it, outside any pause, so that the next capture into it does
// not grow it (and fault its memory in) with the guest paused.
func ReserveCapture(buf []byte, pages int) []byte {
	need := pages * guest.PageSize
	want := need + min(need, captureHeadroomMax)
	if cap(buf) >= want && (cap(buf) <= 4*want || cap(buf) <= captureShrinkFloor) {
		return buf
	}
	return newCaptureBuffer(want)[:0]
}

// GrowCapture returns buf, or a new empty buffer with room for pages
// pages and half as many again (at most captureHeadroomMax more) when buf
// has less. It never shrinks (ReserveCapture does, after shipping). An
// epoch loop about to pause after the guest ran longer than usual (it
// waited for room in its window) grows the buffer with it beforehand, for
// the epoch it predicts; the copy grows it the same way, with the guest
// stopped, when the prediction fell short.
func GrowCapture(buf []byte, pages int) []byte {
	need := pages * guest.PageSize
	if pages <= 0 || cap(buf) >= need {
		return buf
	}
	return newCaptureBuffer(need + min(need/2, captureHeadroomMax))[:0]
}

// copyPages copies pages into buf (grown if too small), or into the Core's
// reused buffer when buf is nil, and points them at their copies.
func (c *Core) copyPages(pages []checkpoint.Page, buf []byte) []byte {
	own := buf == nil
	if own {
		buf = c.pageBuf
	}
	buf = GrowCapture(buf, len(pages))
	if own {
		c.pageBuf = buf
	}
	buf = buf[:len(pages)*guest.PageSize]
	for i := range pages {
		dst := buf[i*guest.PageSize : (i+1)*guest.PageSize]
		copy(dst, pages[i].Data)
		pages[i].Data = dst
	}
	return buf
}
