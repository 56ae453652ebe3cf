package replica

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"
	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/precopy"
)

// Image is the receiving side's copy of a guest: the memory of a paused,
// never-run guest of the right kind and layout, plus the last committed
// machine state. It implements checkpoint.Target: a stream's pages,
// devices and disk writes are staged and reach the image only in EndEpoch,
// all together, so a partly received epoch is never visible. A migration
// destination's pages skip staging (WriteThrough,
// image_writethrough.go): its guest is discarded if an epoch fails.
//
// An epoch that carries device state was taken at a pause, so after it
// commits the image is a consistent guest (Consistent). Epochs of a live
// sync (a migration's rounds, a joining secondary's catch-up) carry pages
// read while the guest ran and leave the image inconsistent until the
// next epoch with state.
//
// The receiving goroutine calls the Target methods; Snapshot-style readers
// (status, activation) take mu.
type Image struct {
	g       guest.Guest
	regions []guest.Region

	// Staging, owned by the receiving goroutine.
	staged      map[uint64]stagedPage
	stagedPeak  int // the most pages staged since staged was made (trimStaging)
	smallEpochs int // epochs in a row under a quarter of stagedPeak, and the largest of them
	smallPeak   int
	free        [][]byte
	stagedState *guest.MachineState
	stagedDisk  []guest.DiskWrite
	// stagedBytes is what the open epoch holds (PageSize per staged
	// page, each disk write's data plus diskWriteOverhead); budget bounds
	// it (0: no bound).
	stagedBytes uint64
	budget      uint64

	// mu guards everything below and the guest's memory against
	// activation while an epoch commits. It is never held across disk
	// I/O: EndEpoch writes the disk with committing set instead, and
	// Activate and Close wait (idle) for it to clear.
	mu         sync.Mutex
	idle       sync.Cond // on mu: signalled when committing, reading or activating clears
	committing bool      // EndEpoch is writing the epoch's disk writes, or its pages wait for Settle
	reading    bool      // a Store is reading the disk (beginRead)
	// activating: Activate is loading the state into the guest, without
	// mu; commits, the Store's copies and Close wait for it (idle).
	activating bool
	state      guest.MachineState
	hasState   bool
	consistent bool
	epoch      uint64
	hash       *guest.MemHash
	committed  uint64 // epochs committed
	handedOver bool   // Activate succeeded: the guest is no longer ours

	// With record set, EndEpoch keeps what the epoch changed for a Store
	// (receiving goroutine only).
	record    bool
	lastPages []uint64
	lastState *guest.MachineState
	lastDisk  []guest.DiskWrite

	// Write-through (WriteThrough), receiving goroutine only: the open
	// epoch's pages, already in memory, for the digest at EndEpoch; torn
	// once an epoch failed after writing memory.
	writeThrough bool
	written      []writtenPage
	// mw writes pages into the guest's memory from the kernel's side
	// (guest.MemWriter): write-through pages of a section between the
	// Reader's BatchPages and FlushPages (batching), a commit's staged
	// pages at once; empty at any other time (a delta's base, PageBase,
	// is read while a section decodes, before its BatchPages). Receiving goroutine only, or mu held with
	// committing set, or Close's discard once the receiving goroutine
	// has ended (Secondary.Close and keep wait for it).
	mw       guest.MemWriter
	batching bool
	torn     bool

	// populated records the pages this Image has populated ahead of its
	// writes, fresh the open epoch's staged pages not among them
	// (image_prefault.go); receiving goroutine only.
	populated *precopy.Bitmap
	fresh     []uint64
	huge      bool                  // populate huge pages: the memory takes them (guest.HugePagesOK) and the kernel does not write the pages (NewImage)
	hugeRuns  int                   // runs advised so (maxHugeRuns)
	ahead     atomic.Pointer[ahead] // a populateAhead started (image_ahead.go)
	// wholeAdvised: adviseWholeWrites has run (receiving goroutine only).
	wholeAdvised bool

	// ackBeforeCopy and copyPending: see Settle (image_settle.go);
	// receiving goroutine only.
	ackBeforeCopy bool
	copyPending   bool
}

// stagedPage is a page of the open epoch with the XXH64 of its content
// (the Reader's, so the commit does not hash it again); zero: all zero.
type stagedPage struct {
	data []byte
	sum  uint64
	zero bool
}

// NewImage wraps a paused guest built empty by a Factory: its memory is
// all zero, so the digest starts empty rather than scanning it (reading a
// 64 GiB MAP_NORESERVE guest end to end costs seconds and maps every
// page). The guest must not run until the Image hands it over
// (Activate).
//
// Its pages go into memory from the kernel's side (guest.MemWriter), so
// it populates 4 KiB pages ahead of them, not huge pages, unless the
// kernel refuses such writes: huge pages were there to spare a copy from
// user space its fault per 4 KiB page, which a kernel-side write does
// not take, and on a host that is itself a virtual machine allocating a
// 2 MiB page the host has handed back costs more than it saves (a
// migration of 512 MiB of random pages, `BenchmarkMigrateHonest/synth`,
// none: destination CPU 1.3 to 1.7 s with huge pages, about 0.8 s
// without, 2026-12-01).
func NewImage(g guest.Guest) *Image {
	im := &Image{
		g: g, regions: g.Regions(), staged: map[uint64]stagedPage{},
		hash: guest.NewMemHash(),
	}
	im.idle.L = &im.mu
	if h, ok := g.(guest.HugePagesOK); ok && !guest.KernelWrites() {
		im.huge = h.HugePagesOK()
	}
	return im
}

// waitIdleLocked waits, mu held, until no EndEpoch is writing the disk,
// no Store is reading it and no Activate is loading the state.
func (im *Image) waitIdleLocked() {
	for im.committing || im.reading || im.activating {
		im.idle.Wait()
	}
}

// lockOwned takes mu once no Activate is loading the state, and says
// whether the guest is still the image's (not handed over). A copy of
// its memory is made only then.
func (im *Image) lockOwned() bool {
	im.mu.Lock()
	for im.activating {
		im.idle.Wait()
	}
	return !im.handedOver
}

// beginRead lets the receiving goroutine read the guest's disk without
// mu: it fails with ErrHandedOver once the guest is handed over, and
// until endRead an Activate or Close waits (the guest is not handed over,
// run or closed under a read, which would then read a running guest's
// disk or a closed one).
func (im *Image) beginRead() error {
	owned := im.lockOwned()
	defer im.mu.Unlock()
	if !owned {
		return ErrHandedOver
	}
	im.reading = true
	return nil
}

// endRead ends beginRead.
func (im *Image) endRead() {
	im.mu.Lock()
	im.reading = false
	im.idle.Broadcast()
	im.mu.Unlock()
}

// ErrStagingBudget is an epoch that stages more than the Image's budget
// before its EPOCH-END: the stream is refused, the staged part dropped,
// the committed image untouched.
var ErrStagingBudget = errors.New("replica: epoch exceeds the staging budget")

// diskWriteOverhead is what one staged disk write costs beyond its data
// (its slice header and offset), counted so that a flood of empty writes
// is bounded too.
const diskWriteOverhead = 48

// SetBudget bounds what one epoch may stage before its EPOCH-END, in
// bytes: a receiver gives the guest's memory (pages are staged at most
// once each) plus its disk-write budget. A Store or a Reader call that
// would go past it fails with ErrStagingBudget before copying anything.
// 0 means no bound.
func (im *Image) SetBudget(bytes uint64) { im.budget = bytes }

// what names the addition for the error; it is called only on refusal,
// so the per-page path builds no message.
//
// A write-through image stages no pages (they go to the guest's memory),
// so its budget is the disk's share alone: the budget less the guest's
// memory.
func (im *Image) overBudget(more uint64, what func() string) error {
	b, of := im.budget, "guest memory plus --max-epoch-disk"
	if im.writeThrough {
		b, of = b-min(b, im.pages()<<guest.PageShift), "--max-epoch-disk: pages go straight to memory"
	}
	if im.budget == 0 || im.stagedBytes+more <= b {
		return nil
	}
	return fmt.Errorf("%w: %s would make the open epoch hold %d bytes, over its budget of %d (%s)",
		ErrStagingBudget, what(), im.stagedBytes+more, b, of)
}

// Guest returns the wrapped guest (paused; not to be resumed while the
// Image receives).
func (im *Image) Guest() guest.Guest { return im.g }

func (im *Image) page(index uint64) []byte { return guest.PageOf(im.regions, index) }

// PageBase implements checkpoint.Target.
func (im *Image) PageBase(index uint64) ([]byte, error) {
	im.Settle()
	if p, ok := im.staged[index]; ok {
		return p.data, nil
	}
	p := im.page(index)
	if p == nil {
		return nil, fmt.Errorf("%w: page %d outside guest memory", checkpoint.ErrCorrupt, index)
	}
	return p, nil
}

// StorePage implements checkpoint.Target.
func (im *Image) StorePage(index uint64, data []byte) error {
	if guest.IsZeroPage(data) {
		return im.StorePageHashed(index, data, 0, true)
	}
	return im.StorePageHashed(index, data, xxhash.Sum64(data), false)
}

// StorePageHashed implements checkpoint.HashedTarget: the page is staged
// with its hash (or, write-through, written at once).
func (im *Image) StorePageHashed(index uint64, data []byte, sum uint64, zero bool) error {
	im.Settle()
	dst := im.page(index)
	if dst == nil {
		return fmt.Errorf("%w: page %d outside guest memory", checkpoint.ErrCorrupt, index)
	}
	if len(data) != guest.PageSize {
		return fmt.Errorf("%w: page %d has %d bytes", checkpoint.ErrCorrupt, index, len(data))
	}
	if im.writeThrough {
		im.writePage(dst, index, data, sum, zero)
		return nil
	}
	p, ok := im.staged[index]
	if !ok {
		if err := im.overBudget(guest.PageSize, func() string { return fmt.Sprintf("page %d", index) }); err != nil {
			return err
		}
		im.stagedBytes += guest.PageSize
		im.noteStaged(index)
		if n := len(im.free); n > 0 {
			p.data, im.free = im.free[n-1], im.free[:n-1]
		} else {
			p.data = make([]byte, guest.PageSize)
		}
	}
	copy(p.data, data)
	p.sum, p.zero = sum, zero
	im.staged[index] = p
	return nil
}

// StoreDevices implements checkpoint.Target.
func (im *Image) StoreDevices(ms guest.MachineState) error {
	if ms.Kind != im.g.Kind() {
		return fmt.Errorf("%w: device state of a %q guest for a %q guest", checkpoint.ErrCorrupt, ms.Kind, im.g.Kind())
	}
	im.Settle()
	cp := cloneState(ms)
	im.stagedState = &cp
	return nil
}

// StoreDisk implements checkpoint.Target.
func (im *Image) StoreDisk(ws []guest.DiskWrite) error {
	if _, ok := im.g.(guest.Disk); !ok && len(ws) > 0 {
		return checkpoint.ErrNoDisk
	}
	im.Settle()
	var more uint64
	for _, w := range ws {
		more += uint64(len(w.Data)) + diskWriteOverhead
	}
	if err := im.overBudget(more, func() string { return fmt.Sprintf("%d more disk writes", len(ws)) }); err != nil {
		return err
	}
	im.stagedBytes += more
	for _, w := range ws {
		im.stagedDisk = append(im.stagedDisk, guest.DiskWrite{Offset: w.Offset, Data: append([]byte(nil), w.Data...)})
	}
	return nil
}

// EndEpoch implements checkpoint.Target: it commits the staged epoch.
//
// The epoch commits as a whole: its disk writes first, then (under mu)
// its pages, state and epoch number; a failed disk write refuses the epoch
// with memory untouched. The disk write runs without mu, so status
// readers (Committed, Digest) do not wait for the disk; committing, set
// under mu after the handedOver check, keeps Activate and Close from
// interleaving: they wait for the commit to finish, so a guest is never
// handed over (or closed) between an epoch's disk and its memory.
//
// With AckBeforeCopy the epoch's pages are copied into memory by Settle
// rather than here (image_settle.go).
func (im *Image) EndEpoch(e checkpoint.EpochEnd) error {
	im.Settle()
	if !im.lockOwned() {
		im.discardLocked()
		im.mu.Unlock()
		return ErrHandedOver
	}
	if im.torn {
		im.mu.Unlock()
		return ErrTorn
	}
	im.committing = true
	im.mu.Unlock()
	im.FlushPages() // empty after a Reader's section; a commit never leaves a page queued
	deferCopy := im.ackBeforeCopy && len(im.staged) > 0
	if !deferCopy {
		im.prefaultStaged()
	}
	var derr error
	if len(im.stagedDisk) > 0 {
		// Staging is the receiving goroutine's own: no lock needed.
		derr = im.g.(guest.Disk).ApplyDiskWrites(im.stagedDisk)
	}
	if derr == nil {
		// A crash here leaves the disk file ahead of memory; the Store
		// rebuilds the disk on Load, so it never matters (crash sweep).
		derr = FPBetweenDiskAndMemory.Hit()
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if derr != nil {
		im.committing = false
		im.idle.Broadcast()
		// Memory is untouched; the epoch is refused as a whole.
		im.discardLocked()
		return fmt.Errorf("commit epoch %d: disk: %w", e.Epoch, derr)
	}
	im.lastPages, im.lastState, im.lastDisk = im.lastPages[:0], nil, nil
	for idx, p := range im.staged {
		im.hash.UpdateHashed(idx, p.sum, p.zero)
		if im.record {
			im.lastPages = append(im.lastPages, idx)
		}
	}
	im.commitWrittenLocked()
	if im.record {
		im.lastState, im.lastDisk = im.stagedState, im.stagedDisk
	}
	if deferCopy {
		im.copyPending = true // committing stays set until Settle
	} else {
		im.copyStaged()
		im.committing = false
		im.idle.Broadcast()
	}
	if im.stagedState != nil {
		im.state, im.hasState, im.consistent = *im.stagedState, true, true
	} else if e.Pages > 0 {
		im.consistent = false
	}
	im.stagedState, im.stagedDisk = nil, nil
	im.epoch = e.Epoch
	im.committed++
	return nil
}

// trimStaging empties the staging map for the next epoch. A map keeps
// the room of its largest epoch (a join's first epochs can be most of
// the guest), and every later epoch's lookups, its commit's walk and
// clear pay for that room: so past staleStagingPeak pages, once
// trimAfter epochs in a row were each under a quarter of the peak, the
// map is made anew and the free page buffers beyond twice the largest of
// those epochs go to the collector. Epochs that alternate large and
// small (a stalled window, then normal ones) keep theirs: remaking the
// map and the buffers every other epoch would cost more than it saves.
func (im *Image) trimStaging() {
	n := len(im.staged)
	if n > im.stagedPeak/4 {
		im.stagedPeak = max(im.stagedPeak, n)
		im.smallEpochs, im.smallPeak = 0, 0
		clear(im.staged)
		return
	}
	im.smallEpochs++
	im.smallPeak = max(im.smallPeak, n)
	if im.stagedPeak <= staleStagingPeak || im.smallEpochs < trimAfter {
		clear(im.staged)
		return
	}
	im.staged, im.stagedPeak = make(map[uint64]stagedPage, 2*im.smallPeak), im.smallPeak
	if keep := 2*im.smallPeak + 1024; len(im.free) > keep {
		clear(im.free[keep:])
		im.free = im.free[:keep]
	}
	im.smallEpochs, im.smallPeak = 0, 0
}

// staleStagingPeak is the staged page count up to which trimStaging
// keeps a map as it is; trimAfter how many small epochs in a row it
// waits for (about 1.6 s of 25 ms epochs).
const (
	staleStagingPeak = 16384
	trimAfter        = 64
)

// Record makes the Image keep what each commit changed, for LastCommit.
func (im *Image) Record() { im.record = true }

// LastCommit is what the last EndEpoch changed: page indices, the state if
// the epoch carried one, the disk writes. Valid until the next EndEpoch;
// receiving goroutine only.
func (im *Image) LastCommit() ([]uint64, *guest.MachineState, []guest.DiskWrite) {
	return im.lastPages, im.lastState, im.lastDisk
}

// Discard drops a partly received epoch (the stream failed before its
// EPOCH-END).
func (im *Image) Discard() {
	im.Settle()
	im.mu.Lock()
	im.discardLocked()
	im.mu.Unlock()
}

func (im *Image) discardLocked() {
	im.mw.Drop()
	im.batching = false
	for _, p := range im.staged {
		im.free = append(im.free, p.data)
	}
	im.trimStaging()
	im.fresh = im.fresh[:0]
	im.stagedState, im.stagedDisk, im.stagedBytes = nil, nil, 0
	im.tearLocked()
}

// Committed describes the committed image.
type Committed struct {
	Epoch      uint64
	Epochs     uint64 // epochs committed since the image was made
	Consistent bool
	HasState   bool
}

// Committed returns what the image holds.
func (im *Image) Committed() Committed {
	im.mu.Lock()
	defer im.mu.Unlock()
	return Committed{Epoch: im.epoch, Epochs: im.committed, Consistent: im.consistent, HasState: im.hasState}
}

// Digest is the committed image's digest (memory and state), kept up to
// date page by page as epochs commit.
func (im *Image) Digest() guest.Digest {
	im.mu.Lock()
	defer im.mu.Unlock()
	return guest.CombineDigest(im.hash.Sum(), im.state)
}

// Close releases the image's guest unless Activate handed it over; later
// commits fail with ErrHandedOver. It waits for a commit in progress. The
// guest is closed without mu (closing a large guest takes a while, and
// status readers need only mu): once handedOver is set nothing reads or
// writes its memory.
func (im *Image) Close() {
	im.mu.Lock()
	im.waitIdleLocked()
	if im.handedOver {
		im.mu.Unlock()
		return
	}
	im.handedOver = true
	im.discardLocked()
	im.mu.Unlock()
	im.stopAhead()
	im.g.Close()
}

// ErrInconsistent is returned by Activate when the image is not a
// consistent guest (no epoch with state committed since the last live
// sync).
var ErrInconsistent = errors.New("replica: the committed image is not a consistent guest yet")

// ErrHandedOver is returned by an Image whose guest has been activated:
// nothing may write its memory any more.
var ErrHandedOver = errors.New("replica: image already handed over to a running guest")

// Activate loads the committed state into the guest and returns it,
// paused, for the caller to resume. The Image must not be used afterwards.
//
// It waits for an epoch whose disk writes are being written (so the guest
// gets that epoch whole, or not at all), or whose pages wait to be copied
// into memory behind its acknowledgement (Settle), and for a chunk of the disk a
// Store's rewrite is reading, but never for the rest of a rewrite.
//
// The state is loaded without mu (status readers do not wait for it);
// meanwhile commits, the Store's copies and Close wait (activating), so
// the guest's memory is still that of the epoch whose state is loaded.
func (im *Image) Activate() (guest.Guest, Committed, error) {
	im.stopAhead() // the guest's next owner may close it
	im.mu.Lock()
	im.waitIdleLocked()
	c := Committed{Epoch: im.epoch, Epochs: im.committed, Consistent: im.consistent, HasState: im.hasState}
	if !im.consistent || !im.hasState {
		im.mu.Unlock()
		return nil, c, ErrInconsistent
	}
	if im.torn {
		im.mu.Unlock()
		return nil, c, ErrTorn
	}
	if im.handedOver {
		im.mu.Unlock()
		return nil, c, ErrHandedOver
	}
	st := cloneState(im.state)
	im.activating = true
	im.mu.Unlock()
	err := im.g.LoadState(st)
	im.mu.Lock()
	im.activating = false
	im.handedOver = err == nil
	im.idle.Broadcast()
	im.mu.Unlock()
	if err != nil {
		return nil, c, fmt.Errorf("replica: load state of epoch %d: %w", c.Epoch, err)
	}
	return im.g, c, nil
}

func cloneState(ms guest.MachineState) guest.MachineState {
	out := guest.MachineState{Kind: ms.Kind, Devices: make([]guest.DeviceState, len(ms.Devices))}
	for i, d := range ms.Devices {
		nd := d
		nd.Fields = append([]byte(nil), d.Fields...)
		nd.Subsections = make([]guest.Subsection, len(d.Subsections))
		for j, s := range d.Subsections {
			nd.Subsections[j] = guest.Subsection{Name: s.Name, Version: s.Version, Fields: append([]byte(nil), s.Fields...)}
		}
		out.Devices[i] = nd
	}
	return out
}
