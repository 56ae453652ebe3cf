package guest

import (
	"context"
	"errors"
	"io"
	"time"
)

// PageSize is the unit of dirty tracking and of every page Tandem moves.
const PageSize = 4096

// PageShift is log2(PageSize).
const PageShift = 12

// Errors shared by every backend. Backends wrap them with %w and detail.
var (
	// ErrNotPaused is returned by calls that need a paused guest.
	ErrNotPaused = errors.New("guest: not paused")
	// ErrClosed is returned by any call on a closed guest.
	ErrClosed = errors.New("guest: closed")
	// ErrFlushDeadline is returned by Flush when its context ends before the
	// in-flight I/O is durable. The flush goes on in the background.
	ErrFlushDeadline = errors.New("guest: flush missed its deadline")
	// ErrState is returned by LoadState for state of another kind, an
	// unknown version or inconsistent fields.
	ErrState = errors.New("guest: bad state")
	// ErrConfig is returned for an invalid configuration.
	ErrConfig = errors.New("guest: bad config")
)

// Region is one contiguous range of guest-physical memory mapped into the
// host. Mem stays valid until Close; its length is a multiple of PageSize and
// GPA is page aligned. Reading Mem is always allowed; writing it is only
// allowed while the guest is paused and must be followed by MarkDirty if the
// write has to reach a replica (restore paths write before Start and need
// not mark).
type Region struct {
	GPA uint64
	Mem []byte
}

// FirstPage is the page index of the region's first page.
func (r Region) FirstPage() uint64 { return r.GPA >> PageShift }

// Pages is the number of pages the region covers.
func (r Region) Pages() uint64 { return uint64(len(r.Mem)) >> PageShift }

// Sub is r's pages [first, first+n) (relative to r) as a region of their
// own, for a scan of part of it (Populated).
func (r Region) Sub(first, n uint64) Region {
	return Region{GPA: r.GPA + first<<PageShift, Mem: r.Mem[first<<PageShift : (first+n)<<PageShift]}
}

// PageOf returns the memory of page index among regions, or nil if no
// region holds it.
func PageOf(regions []Region, index uint64) []byte {
	for _, r := range regions {
		if index >= r.FirstPage() && index < r.FirstPage()+r.Pages() {
			off := (index - r.FirstPage()) << PageShift
			return r.Mem[off : off+PageSize]
		}
	}
	return nil
}

// PageLimit is one past the highest page index of regions: the length of
// a bitmap of their pages.
func PageLimit(regions []Region) uint64 {
	var end uint64
	for _, r := range regions {
		end = max(end, r.FirstPage()+r.Pages())
	}
	return end
}

// DirtyLog is where SyncDirty puts what the guest dirtied. precopy.Bitmap
// implements it; guest cannot import precopy (precopy drives guests).
type DirtyLog interface {
	// OrWords ORs words into the log, bit i of words[j] standing for page
	// firstPage+64*j+i, and returns how many bits were newly set.
	// firstPage is a multiple of 64.
	OrWords(firstPage uint64, words []uint64) uint64
}

// DeviceState is the saved state of one device or vCPU: a plain struct
// encoded by its owner (msgpack), tagged with a name, an instance number and
// the version of the struct's schema. Subsections carry optional parts a
// reader may skip if it does not know them.
type DeviceState struct {
	Name        string
	Instance    uint32
	Version     uint32
	Fields      []byte
	Subsections []Subsection
}

// Subsection is an optional, separately versioned part of a DeviceState.
type Subsection struct {
	Name    string
	Version uint32
	Fields  []byte
}

// MachineState is everything about a guest beyond its memory.
type MachineState struct {
	Kind    string // backend: "synth" or "kvm"
	Devices []DeviceState
}

// DiskWrite is one write to the guest's disk since the last TakeDiskWrites.
//
// A DiskWrite without data is a size mark: applied on a replica
// (guest.Disk), it sets the disk's size to Offset. A whole-disk resync
// ends with one, so a replica's disk file longer than the disk is cut to
// it. A guest's own log never holds one (a write of nothing is dropped).
type DiskWrite struct {
	Offset uint64
	Data   []byte
}

// Guest is a virtual machine that Tandem can run, pause, capture and
// restore. A Guest is created paused (by a backend's New or Restore); Resume
// starts it. All methods are safe to call from one controlling goroutine;
// the vCPUs run on goroutines the backend owns and stops in Close.
type Guest interface {
	// Kind names the backend ("synth", "kvm"); a stream from one kind is
	// refused by the other.
	Kind() string

	// Regions lists guest memory in ascending GPA order. The slice and the
	// mappings are fixed for the guest's life.
	Regions() []Region

	// Pause stops every vCPU and returns once none runs guest code, with the
	// time it took. It does not wait for disk I/O. Pausing a paused guest is
	// a no-op returning 0.
	Pause(ctx context.Context) (time.Duration, error)

	// Resume lets the vCPUs run again and returns the time it took.
	Resume() (time.Duration, error)

	// Paused reports whether the guest is paused.
	Paused() bool

	// SyncDirty ORs every page written since the previous SyncDirty (or
	// since creation) into dst, clears the guest's own log, and returns how
	// many bits were newly set in dst. It may be called while the guest
	// runs (a racing write lands in this sync or the next, never in
	// neither); callers that need an exact cut call it while paused.
	// Writes made by the VMM itself (device emulation) are included.
	SyncDirty(dst DirtyLog) (uint64, error)

	// MarkDirty records that the caller wrote pages [first, first+n) of
	// guest memory, so the next SyncDirty reports them.
	MarkDirty(first, n uint64)

	// SaveState captures vCPU and device state. Precondition: paused.
	SaveState() (MachineState, error)

	// LoadState replaces vCPU and device state. Precondition: paused. On
	// error the guest's state is unchanged.
	LoadState(MachineState) error

	// Flush makes every disk write the guest has issued durable. It returns
	// ErrFlushDeadline (wrapped) when ctx ends first; the flush continues in
	// the background and a later Flush waits for it.
	Flush(ctx context.Context) error

	// TakeDiskWrites returns the disk writes completed since the previous
	// call, in order, and forgets them. Precondition: paused.
	TakeDiskWrites() []DiskWrite

	// Console is the guest's serial line.
	Console() Console

	// Close stops the vCPUs, releases memory and closes the disk. After
	// Close every method returns ErrClosed; Regions' mappings are gone.
	Close() error
}

// Console is the guest's serial line. Input goes to the guest; output goes
// to the one sink set with SetOutput. Output commit sits in that sink: the
// guest's bytes are handed to it synchronously, in order, from the vCPU
// that wrote them, so every byte written before a Pause has reached the
// sink when Pause returns.
type Console interface {
	// Input queues bytes for the guest to read. It never blocks; it
	// returns an error if the guest's input buffer is full.
	Input(p []byte) error
	// SetOutput sets where the guest's output goes. sink must not block
	// for long: it runs on a vCPU. nil discards output.
	SetOutput(sink func(p []byte))
}

// Throttler is implemented by guests whose vCPUs can be slowed down for
// auto-converge. percent is the share of time the vCPUs are kept from
// running, 0 to 99.
type Throttler interface {
	SetThrottle(percent int)
}

// LazyDirtyLog is implemented by guests that can start logging writes
// piece by piece, as a pass over memory reaches each piece, instead of
// all at once. A page the guest rewrites before the pass reads it then
// costs no write-protection fault (27 to 32 us of CPU each on kvm-pvm,
// docs/PERFORMANCE.md). A migration's round 0 uses it.
type LazyDirtyLog interface {
	// DiscardDirty forgets the writes logged so far without
	// write-protecting memory: a SyncDirty whose result the caller would
	// drop. It returns false, having done nothing, when the guest's
	// dirty-log method cannot defer protection (call SyncDirty then).
	// After it every write is still reported by a later SyncDirty, and a
	// page not yet passed to TrackDirty may be reported although it was
	// not written since (a conservative report).
	DiscardDirty() (bool, error)
	// TrackDirty forgets what is logged for pages [first, first+n) and
	// write-protects them, so a write to them from now on is reported by
	// the next SyncDirty. Call it just before reading the pages: a write
	// made before it is in what the read sees.
	TrackDirty(first, n uint64) error
}

// PageWriteCounter is implemented by guests whose dirty workload counts its
// page writes: PageWrites is the number of dirtying writes the guest has
// made since it first booted (it travels with the guest's state, so a
// migrated or restored guest goes on counting). Monitoring reads it while
// the guest runs, so a benchmark can report the write rate the guest
// achieved beside the rate it was asked for (a protected KVM guest pays a
// write-protection fault for its first write to a page in every epoch).
type PageWriteCounter interface {
	PageWrites() uint64
}

// DiskImage is implemented by guests whose whole disk can be read back:
// a replica's store keeps it beside the memory of the same epoch, and a
// primary ships it whole when the replica's copy cannot be trusted (a
// catch-up, a dropped write log). A guest without a disk reports size 0.
type DiskImage interface {
	// DiskSize is the disk's size in bytes.
	DiskSize() (uint64, error)
	// ReadDisk fills p from offset off; bytes past the end read as zero.
	// Precondition: no write in flight (a paused guest, or a replica's).
	ReadDisk(p []byte, off uint64) error
	// DiskDropped counts the completed writes lost from the write log
	// (primary side): when it rises, the replica's copy misses writes.
	DiskDropped() uint64
}

// ReadFullAt fills p from r at off; a short read at the end of the file
// leaves zeros (a disk file is sparse past its last write).
func ReadFullAt(r io.ReaderAt, p []byte, off uint64) error {
	n, err := r.ReadAt(p, int64(off))
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	return err
}

// Disk is implemented by guests with a disk that a replica must track.
type Disk interface {
	// ApplyDiskWrites writes ws to the guest's disk (replica side).
	ApplyDiskWrites(ws []DiskWrite) error
}
