package replica

import (
	"bufio"
	"cmp"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/fsperm"
	"github.com/tandemvm/tandem/internal/vfs"
)

// Store keeps a secondary's committed image on disk, so a secondary that
// is restarted (or whose host lost power) comes back at a committed epoch.
//
// Layout: DIR/image.tnd is a snapshot file (the Hello line, then a
// checkpoint stream) that holds one full image epoch (memory, devices and
// the whole disk) followed by every epoch committed since (its pages,
// devices and disk writes), each appended before it is acknowledged. A
// restart replays it; a torn last epoch (a kill or a power loss mid-write)
// fails its CRC or ends short and is dropped, leaving the previous epoch.
// When the log has grown to several times the image, the image is
// rewritten compactly into image.tnd.new, fsynced, renamed over image.tnd
// and the directory fsynced.
//
// Memory and disk are one unit: Load rebuilds the guest's disk file from
// image.tnd (the full disk of the first epoch, then each epoch's writes),
// so the recovered memory and disk are always those of the same epoch,
// whatever the disk file held before (it is written as epochs commit and
// may be ahead of image.tnd after a crash).
//
// Durability (docs/DURABILITY.md): with SyncDisk every append is fsynced
// before Append returns, so before the epoch is acknowledged; with
// SyncMemory Append only writes (the OS has the epoch: it survives the
// process being killed) and the Secondary calls Sync right after the
// acknowledgement. SyncedEpoch says which epoch a power loss keeps.
//
// Every file the store touches goes through its vfs.FS.
//
// A Store is used by one goroutine (the receiving one); SyncedEpoch may
// be read from any.
type Store struct {
	fs     vfs.FS
	dir    string
	policy SyncPolicy
	bootID func() string
	// acceptUnsynced: StoreOptions.AcceptUnsynced; log says so.
	acceptUnsynced bool
	log            *slog.Logger
	// syncTimeout bounds each fsync (StoreOptions.SyncTimeout); stalls
	// counts those that did not return within it.
	syncTimeout time.Duration
	stalls      atomic.Uint64

	f       vfs.File
	bw      *bufio.Writer
	cw      *countWriter
	w       *checkpoint.Writer
	hello   Hello
	regions []guest.Region
	base    uint64 // bytes of the last full image written

	// written is the last epoch written to f; unsynced says it has not
	// been fsynced since. synced is 1 + the last epoch known durable
	// (0: none).
	written  uint64
	unsynced bool
	synced   atomic.Uint64

	// wrapFile, if set (tests), wraps the file a rewrite writes to.
	wrapFile func(io.Writer) io.Writer
	// compactAlways (tests) compacts after every acknowledged append.
	compactAlways bool

	// copyBuf and copyBatch hold the pages writeImage and Append copy out
	// of guest memory under Image.mu, reused from epoch to epoch.
	copyBuf   []byte
	copyBatch []checkpoint.Page
	// pageIdx is Append's sorted copy of an epoch's page indices (the
	// caller's slice is the Image's own record and is not reordered).
	pageIdx []uint64
}

// copyBuffers returns the reused page-copy buffer and an empty batch.
func (s *Store) copyBuffers() ([]byte, []checkpoint.Page) {
	if s.copyBuf == nil {
		s.copyBuf = make([]byte, rewriteBatch*guest.PageSize)
		s.copyBatch = make([]checkpoint.Page, 0, rewriteBatch)
	}
	return s.copyBuf, s.copyBatch[:0]
}

const (
	storeFile     = "image.tnd"
	storeSyncFile = "image.sync"
	storeProbe    = ".write-probe"
)

// StoreOptions configure OpenStoreWith.
type StoreOptions struct {
	// FS holds the store; nil means the real file system.
	FS vfs.FS
	// Sync is when appended epochs are fsynced (default SyncMemory).
	Sync SyncPolicy
	// BootID names the host's current boot; nil reads Linux's
	// /proc/sys/kernel/random/boot_id ("" if it cannot). Tests make a
	// MemFS crash a new boot.
	BootID func() string
	// AcceptUnsynced is the operator's override of ErrStoreMayLack
	// (--accept-unsynced-image): a stored image that may lack
	// acknowledged epochs is offered anyway, with a warning naming what
	// may be missing. For a cluster that would otherwise not run at all.
	AcceptUnsynced bool
	// SyncTimeout bounds each fsync of the store (of image.tnd, of a
	// rewritten image, of the directory); 0 means
	// DefaultStoreSyncTimeout. One that does not return in time fails
	// the store (ErrSyncStalled), as a failed fsync does.
	SyncTimeout time.Duration
}

// DefaultStoreSyncTimeout is how long a store waits for one fsync. A
// healthy disk takes milliseconds (docs/DURABILITY.md); one that takes
// this long has stalled, and the secondary must say so rather than hang.
const DefaultStoreSyncTimeout = 30 * time.Second

// ErrSyncStalled is an fsync of the store that did not return within
// the store's SyncTimeout. The fsync may still complete; the store
// cannot wait for it and gives up persistence (docs/DURABILITY.md).
var ErrSyncStalled = errors.New("replica store: fsync stalled")

// bootID is the Linux boot ID, or "" where there is none.
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// OpenStore is OpenStoreWith on the real file system with SyncMemory.
func OpenStore(dir string, log *slog.Logger) (*Store, error) {
	return OpenStoreWith(dir, log, StoreOptions{})
}

// OpenStoreWith prepares dir (created if missing, and made durable). The
// image holds the guest's memory: dir is made 0700 and image.tnd 0600,
// and looser modes found there are tightened (and logged on log, if not
// nil). A directory it cannot write to is refused now, not at the first
// epoch. A leftover image.tnd.new (a compaction cut short) is removed:
// image.tnd is the stored image until a rename says otherwise.
func OpenStoreWith(dir string, log *slog.Logger, o StoreOptions) (*Store, error) {
	fsys := vfs.OrDefault(o.FS)
	if o.Sync != SyncMemory && o.Sync != SyncDisk {
		return nil, fmt.Errorf("replica store: unknown sync policy %v", o.Sync)
	}
	if err := fsperm.PrivateDirFS(fsys, dir, log); err != nil {
		return nil, fmt.Errorf("replica store: %w", err)
	}
	for _, name := range []string{storeFile, storeFile + ".new", storeSyncFile} {
		if err := fsperm.PrivateFileFS(fsys, filepath.Join(dir, name), log); err != nil {
			return nil, fmt.Errorf("replica store: %w", err)
		}
	}
	probe := filepath.Join(dir, storeProbe)
	f, err := fsys.Create(probe, fsperm.File)
	if err == nil {
		_, err = f.Write([]byte("probe\n"))
		err = errors.Join(err, f.Close(), fsys.Remove(probe))
	}
	if err != nil {
		return nil, fmt.Errorf("replica store: data directory %s is not writable: %w", dir, err)
	}
	// Leftovers of a cut-short compaction and of a cut-short clean mark.
	for _, name := range []string{storeFile + ".new", vfs.TempName(storeSyncFile), vfs.TempName(storeMovedFile)} {
		if err := fsys.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("replica store: remove a leftover %s: %w", name, err)
		}
	}
	boot := o.BootID
	if boot == nil {
		boot = bootID
	}
	return &Store{fs: fsys, dir: dir, policy: o.Sync, bootID: boot, acceptUnsynced: o.AcceptUnsynced, log: log,
		syncTimeout: cmp.Or(o.SyncTimeout, DefaultStoreSyncTimeout)}, nil
}

// SyncStalls counts the fsyncs that did not return within the store's
// SyncTimeout (each failed the store).
func (s *Store) SyncStalls() uint64 { return s.stalls.Load() }

// within runs sync, an fsync of what, and waits for it at most the
// store's SyncTimeout. Past it, it returns ErrSyncStalled naming what,
// and leaves sync running on its own goroutine, which ends when the
// kernel returns: an fsync cannot be cut short, and waiting for it would
// hang the receiving goroutine (and with it every acknowledgement).
func (s *Store) within(what string, sync func() error) error {
	return s.withinFor(what, s.syncTimeout, sync)
}

// minSyncRate is the slowest write-back a rewrite's fsync is allowed
// before it counts as stalled: a rewrite writes the whole image (all of
// the guest's non-zero memory and its disk), whose fsync on a healthy but
// modest disk takes far longer than an append's.
const minSyncRate = 10 << 20 // bytes per second

// withinBytes is within for an fsync of a file just written with n
// bytes: the store's SyncTimeout plus the time n takes at minSyncRate.
func (s *Store) withinBytes(what string, n int64, sync func() error) error {
	return s.withinFor(what, s.syncTimeout+time.Duration(n/minSyncRate)*time.Second, sync)
}

func (s *Store) withinFor(what string, d time.Duration, sync func() error) error {
	done := make(chan error, 1)
	go func() { done <- sync() }()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		s.stalls.Add(1)
		s.logger().Error("replica store: an fsync has not returned; giving up persistence", "what", what, "after", d)
		return fmt.Errorf("%w: fsync of %s has not returned after %v", ErrSyncStalled, what, d)
	}
}

// Policy is the store's sync policy.
func (s *Store) Policy() SyncPolicy { return s.policy }

// SyncedEpoch is the last epoch known to survive a power loss (ok false:
// none yet in this store's life).
func (s *Store) SyncedEpoch() (epoch uint64, ok bool) {
	v := s.synced.Load()
	if v == 0 {
		return 0, false
	}
	return v - 1, true
}

// Begin starts storing im (consistent) afresh: it writes the whole image
// as one epoch, then appends each later commit (Append).
func (s *Store) Begin(im *Image, h Hello) error {
	s.closeFile()
	s.hello, s.regions = h, im.g.Regions()
	// The clean mark belongs to the image being replaced.
	clean := filepath.Join(s.dir, storeSyncFile)
	if err := s.fs.Remove(clean); err == nil {
		if err := s.within(s.dir, func() error { return s.fs.SyncDir(s.dir) }); err != nil {
			return fmt.Errorf("replica store: fsync directory %s: %w", s.dir, err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("replica store: %w", err)
	}
	return s.rewrite(im)
}

// rewrite writes the full committed image of im (memory, devices, whole
// disk) into a new file, fsyncs it, renames it over the store's file and
// fsyncs the directory; the new file is durable when it returns nil.
func (s *Store) rewrite(im *Image) (err error) {
	path := filepath.Join(s.dir, storeFile)
	tmp := path + ".new"
	f, err := s.fs.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, fsperm.File)
	if err != nil {
		return fmt.Errorf("replica store: %w", err)
	}
	renamed := false
	defer func() {
		if err != nil {
			f.Close()
			if !renamed {
				s.fs.Remove(tmp)
			}
			err = fmt.Errorf("replica store: write image %s: %w", path, err)
		}
	}()
	cw := &countWriter{w: f}
	if s.wrapFile != nil {
		cw.w = s.wrapFile(f)
	}
	bw := bufio.NewWriterSize(cw, 1<<20)
	h := s.hello
	h.Proto = ProtoVersion
	h.Store = &StoreStamp{Sync: s.policy.String(), Boot: s.bootID()}
	if err := writeLine(bw, h); err != nil {
		return err
	}
	w, err := checkpoint.NewWriter(bw, checkpoint.Header{Build: h.Build, Kind: h.Kind, PageSize: guest.PageSize,
		Regions: checkpoint.RegionsOf(s.regions), Flags: checkpoint.FlagSnapshot},
		checkpoint.Options{Compression: checkpoint.CompressFastest, CacheBytes: -1})
	if err != nil {
		return err
	}
	epoch, err := s.writeImage(w, im)
	if err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	if err := FPRewriteBeforeSync.Hit(); err != nil {
		return err
	}
	if err := s.withinBytes(tmp, int64(cw.n), f.Sync); err != nil {
		return fmt.Errorf("fsync %s: %w", tmp, err)
	}
	if err := FPRewriteBeforeRename.Hit(); err != nil {
		return err
	}
	if err := s.fs.Rename(tmp, path); err != nil {
		return err
	}
	renamed = true
	if err := FPRewriteBeforeSyncDir.Hit(); err != nil {
		return err
	}
	if err := s.within(s.dir, func() error { return s.fs.SyncDir(s.dir) }); err != nil {
		return fmt.Errorf("fsync directory %s: %w", s.dir, err)
	}
	if err := FPRewriteAfterSyncDir.Hit(); err != nil {
		return err
	}
	old := s.f
	s.f, s.bw, s.cw, s.w, s.base = f, bw, cw, w, cw.n
	s.written, s.unsynced = epoch, false
	s.synced.Store(epoch + 1)
	if old != nil {
		// A compaction replaces the file being appended to (flushed by
		// Append before it compacts): close the old one, or every
		// compaction leaked a file handle.
		old.Close()
	}
	return nil
}

// Batches in which rewrite copies the image under Image.mu: at most
// rewriteBatch non-zero pages, and at most rewriteScan pages looked at
// (a mostly empty guest is not scanned end to end under the lock).
const (
	rewriteBatch = 256
	rewriteScan  = 4096
)

// populatedRuns lists the pages of r in [from, to) that the host holds,
// as [first, end) pairs relative to r (guest.Populated): the others are
// zero and not read. Reading them would cost a fault each and, on hosts
// without a shared zero page, a page of RAM: a store of a sparse 64 GiB
// guest filled it in. It reads only this process's page tables, never
// guest memory, so it runs without the image's lock (on kernels before
// 6.7 the scan reads a page-table entry per page: about 1.6 s a TiB);
// writeImage still checks the guest is owned before each batch it reads.
// A failed scan reports the whole window.
func populatedRuns(r guest.Region, from, to uint64) [][2]uint64 {
	sub := r.Sub(from, to-from)
	var runs [][2]uint64
	if err := guest.Populated(sub, func(first, n uint64) error {
		runs = append(runs, [2]uint64{from + first, from + first + n})
		return nil
	}); err != nil {
		return [][2]uint64{{from, to}}
	}
	return runs
}

// storeRunWindow is how many pages writeImage lists the populated runs
// of at a time (1 GiB): the list stays small however the guest's memory
// is fragmented.
const storeRunWindow = 1 << 18

// writeImage writes im's committed image as one epoch to w.
//
// Locking: Image.mu is never held while compressing or writing, so an
// activation (or a status read) arriving during a compaction waits at
// most for one batch to be copied, never for the disk. The image is still
// read consistently: its memory, state and epoch change only by commits,
// which the receiving goroutine makes, and that goroutine is the one
// running this; the only other change is Activate handing the guest over
// (it then runs and writes its memory, and its new owner may close it and
// unmap it). So each batch is copied out of guest memory under mu after
// checking handedOver, and compressed and written from the copy with mu
// released; once handed over, the rewrite stops with ErrHandedOver and the
// caller keeps the previous file (an image that was activated is no
// longer this store's to keep). Memory is never read after a hand-over,
// and never while a commit or Close runs (they hold mu).
//
// The disk is written whole (zero ranges too: the disk file Load rebuilds
// may hold anything there), read in diskChunk pieces with the same
// hand-over check: only the receiving goroutine writes the disk until a
// hand-over, and an Activate or Close waits for a chunk being read
// (Image.beginRead), so no chunk is read from a guest that runs or is
// closed. It returns the epoch written.
func (s *Store) writeImage(w *checkpoint.Writer, im *Image) (uint64, error) {
	im.Settle() // the last commit's pages in memory before they are read
	if !im.lockOwned() {
		im.mu.Unlock()
		return 0, ErrHandedOver
	}
	state, epoch := im.state, im.epoch
	im.mu.Unlock()
	buf, batch := s.copyBuffers()
	for _, r := range s.regions {
		for from := uint64(0); from < r.Pages(); from += storeRunWindow {
			runs := populatedRuns(r, from, min(from+storeRunWindow, r.Pages()))
			var err error
			if batch, err = s.writeRuns(w, im, r, runs, buf, batch); err != nil {
				return 0, err
			}
		}
	}
	if s.hello.Config.Disk != "" {
		if err := s.writeDisk(w, im); err != nil {
			return 0, err
		}
	}
	if err := w.WriteDevices(state); err != nil {
		return 0, err
	}
	if _, err := w.EndEpoch(epoch); err != nil {
		return 0, err
	}
	return epoch, nil
}

// writeRuns writes the non-zero pages of r's runs to w, in batches
// copied under the image's lock while it is owned (see writeImage).
func (s *Store) writeRuns(w *checkpoint.Writer, im *Image, r guest.Region, runs [][2]uint64, buf []byte, batch []checkpoint.Page) ([]checkpoint.Page, error) {
	for len(runs) > 0 {
		batch = batch[:0]
		if !im.lockOwned() {
			im.mu.Unlock()
			return batch, ErrHandedOver
		}
		for scanned := 0; len(runs) > 0 && scanned < rewriteScan && len(batch) < rewriteBatch; scanned++ {
			p := runs[0][0]
			if runs[0][0]++; runs[0][0] == runs[0][1] {
				runs = runs[1:]
			}
			page := r.Mem[p<<guest.PageShift : (p+1)<<guest.PageShift]
			if guest.IsZeroPage(page) {
				continue
			}
			dst := buf[len(batch)*guest.PageSize : (len(batch)+1)*guest.PageSize]
			copy(dst, page)
			batch = append(batch, checkpoint.Page{Index: r.FirstPage() + p, Data: dst})
		}
		im.mu.Unlock()
		if err := w.WritePages(batch); err != nil {
			return batch, err
		}
	}
	return batch, nil
}

// diskChunk is the piece in which writeDisk reads and stores a disk.
const diskChunk = 1 << 20

// writeDisk writes im's whole disk to w as disk writes.
func (s *Store) writeDisk(w *checkpoint.Writer, im *Image) error {
	d, ok := im.g.(guest.DiskImage)
	if !ok {
		return fmt.Errorf("the %s guest cannot read its disk back", s.hello.Kind)
	}
	if err := im.beginRead(); err != nil {
		return err
	}
	size, err := d.DiskSize()
	im.endRead()
	if err != nil {
		return err
	}
	buf := make([]byte, diskChunk)
	for off := uint64(0); off < size; off += diskChunk {
		p := buf[:min(diskChunk, size-off)]
		// The read runs without Image.mu but holds off a hand-over
		// (beginRead): one chunk, not the whole disk.
		if err := im.beginRead(); err != nil {
			return err
		}
		err := d.ReadDisk(p, off)
		im.endRead()
		if err != nil {
			return fmt.Errorf("read the disk at %d: %w", off, err)
		}
		if err := w.WriteDisk([]guest.DiskWrite{{Offset: off, Data: p}}); err != nil {
			return err
		}
	}
	// The size mark (guest.DiskWrite): Load cuts a longer disk file to
	// it, and an empty disk still has disk contents.
	return w.WriteDisk([]guest.DiskWrite{{Offset: size}})
}

// Append stores one committed epoch: its pages (as committed), state and
// disk writes. Call it after the Image committed the epoch and before
// acknowledging it. pages is only read (Image.LastCommit's record).
func (s *Store) Append(im *Image, e checkpoint.EpochEnd, pages []uint64, state *guest.MachineState, disk []guest.DiskWrite) error {
	im.Settle() // the commit's pages in memory before they are copied out
	if s.w == nil {
		return nil
	}
	s.pageIdx = append(s.pageIdx[:0], pages...)
	pages = s.pageIdx
	slices.Sort(pages)
	// The pages are copied out of guest memory under Image.mu, in batches,
	// and written from the copies (as writeImage does): an activation may
	// hand the guest over between the commit and this append, and its new
	// owner then runs it and may close it.
	buf, batch := s.copyBuffers()
	for len(pages) > 0 {
		n := min(len(pages), rewriteBatch)
		batch = batch[:0]
		if !im.lockOwned() {
			im.mu.Unlock()
			return s.broken(ErrHandedOver)
		}
		for i, idx := range pages[:n] {
			dst := buf[i*guest.PageSize : (i+1)*guest.PageSize]
			copy(dst, im.page(idx))
			batch = append(batch, checkpoint.Page{Index: idx, Data: dst})
		}
		im.mu.Unlock()
		pages = pages[n:]
		if err := s.w.WritePages(batch); err != nil {
			return s.broken(err)
		}
	}
	if len(disk) > 0 {
		if err := s.w.WriteDisk(disk); err != nil {
			return s.broken(err)
		}
	}
	if state != nil {
		if err := s.w.WriteDevices(*state); err != nil {
			return s.broken(err)
		}
	}
	if _, err := s.w.EndEpoch(e.Epoch); err != nil {
		return s.broken(err)
	}
	if err := s.bw.Flush(); err != nil {
		return s.broken(err)
	}
	s.written, s.unsynced = e.Epoch, true
	if s.policy == SyncDisk {
		return s.Sync()
	}
	return nil
}

// Compact rewrites the image compactly once the log has grown to several
// times the image (the rewrite is durable when it returns). The Secondary
// calls it after the epoch's acknowledgement (and, with SyncMemory, its
// fsync): a compaction writes the whole image and must not delay an
// acknowledgement. It runs on the receiving goroutine, which is what
// keeps the image still while it is read (see writeImage). An error stops
// the store.
func (s *Store) Compact(im *Image) error {
	if s.w == nil || s.cw.n <= 4*s.base+(64<<20) && !s.compactAlways {
		return nil
	}
	if err := s.bw.Flush(); err != nil {
		return s.broken(err)
	}
	if err := s.rewrite(im); err != nil {
		return s.broken(err)
	}
	return nil
}

// Sync fsyncs what was appended and not yet synced (with SyncMemory the
// Secondary calls it once the epoch is acknowledged). An error stops the
// store: what it holds can no longer be said to be durable.
func (s *Store) Sync() error {
	if s.f == nil || !s.unsynced {
		return nil
	}
	if err := FPAppendBeforeSync.Hit(); err != nil {
		return s.broken(err)
	}
	path := filepath.Join(s.dir, storeFile)
	if err := s.within(path, s.f.Sync); err != nil {
		return s.broken(fmt.Errorf("fsync %s: %w", path, err))
	}
	s.unsynced = false
	s.synced.Store(s.written + 1)
	if err := FPAppendAfterSync.Hit(); err != nil {
		return s.broken(err)
	}
	return nil
}

func (s *Store) broken(err error) error {
	s.closeFile()
	return fmt.Errorf("replica store: append: %w", err)
}

// Close stops appending (the file stays for Load). What was appended is
// flushed and fsynced, and image.sync records the clean close, so a Load
// after a restart of the host trusts the image even under SyncMemory.
// Best effort: a failure leaves the record saying the store was not
// closed cleanly.
func (s *Store) Close() {
	if s == nil || s.f == nil {
		return
	}
	err := s.bw.Flush()
	if err == nil {
		err = s.within(filepath.Join(s.dir, storeFile), s.f.Sync)
	}
	if err == nil {
		s.unsynced = false
		s.synced.Store(s.written + 1)
		err = vfs.WriteFile(s.fs, filepath.Join(s.dir, storeSyncFile),
			fmt.Appendf(nil, "%s epoch=%d\n", cleanMagic, s.written), fsperm.File)
	}
	if err != nil {
		s.logger().Warn("replica store: not closed cleanly", "dir", s.dir, "err", err)
	}
	s.closeFile()
}

// logger is the store's log, or slog's default.
func (s *Store) logger() *slog.Logger {
	if s.log != nil {
		return s.log
	}
	return slog.Default()
}

// closeFile closes the file being appended to without a clean record.
func (s *Store) closeFile() {
	if s.f != nil {
		s.f.Close()
	}
	s.unsynced = false
	s.f, s.bw, s.cw, s.w = nil, nil, nil, nil
}

var _ io.Writer = (*countWriter)(nil)
