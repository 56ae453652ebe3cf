package replica

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/fsperm"
)

// Store keeps a secondary's committed image on disk, so a secondary that
// is killed and restarted comes back at its last committed epoch.
//
// Layout: DIR/image.tnd is a snapshot file (the Hello line, then a
// checkpoint stream) that holds one full image epoch followed by every
// epoch committed since, each appended before it is acknowledged. A
// restart replays it; a torn last epoch (killed mid-write) fails its CRC
// or ends short and is dropped, leaving the previous committed epoch. When
// the log has grown to several times the image, the image is rewritten
// compactly into image.tnd.new and renamed over image.tnd (atomic).
//
// Appends are written but not fsynced: they survive the process being
// killed, which is the failure a secondary's restart covers; surviving
// the host's power loss would need an fsync per epoch (Sync: true).
//
// A Store is used by one goroutine (the receiving one).
type Store struct {
	dir  string
	Sync bool

	f       *os.File
	bw      *bufio.Writer
	cw      *countWriter
	w       *checkpoint.Writer
	hello   Hello
	regions []guest.Region
	base    uint64 // bytes of the last full image written

	// wrapFile, if set (tests), wraps the file a rewrite writes to.
	wrapFile func(io.Writer) io.Writer

	// copyBuf and copyBatch hold the pages writeImage and Append copy out
	// of guest memory under Image.mu, reused from epoch to epoch.
	copyBuf   []byte
	copyBatch []checkpoint.Page
}

// copyBuffers returns the reused page-copy buffer and an empty batch.
func (s *Store) copyBuffers() ([]byte, []checkpoint.Page) {
	if s.copyBuf == nil {
		s.copyBuf = make([]byte, rewriteBatch*guest.PageSize)
		s.copyBatch = make([]checkpoint.Page, 0, rewriteBatch)
	}
	return s.copyBuf, s.copyBatch[:0]
}

const storeFile = "image.tnd"

// OpenStore prepares dir (created if missing). The image holds the
// guest's memory: dir is made 0700 and image.tnd 0600, and looser modes
// found there are tightened (and logged on log, if not nil).
func OpenStore(dir string, log *slog.Logger) (*Store, error) {
	if err := fsperm.PrivateDir(dir, log); err != nil {
		return nil, fmt.Errorf("replica store: %w", err)
	}
	for _, name := range []string{storeFile, storeFile + ".new"} {
		if err := fsperm.PrivateFile(filepath.Join(dir, name), log); err != nil {
			return nil, fmt.Errorf("replica store: %w", err)
		}
	}
	return &Store{dir: dir}, nil
}

// Load restores the stored image, if any, into a new guest built by
// factory. It returns ok=false when there is nothing usable on disk.
func (s *Store) Load(r *Receiver) (*Image, Hello, bool, error) {
	path := filepath.Join(s.dir, storeFile)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, Hello{}, false, nil
	}
	if err != nil {
		return nil, Hello{}, false, fmt.Errorf("replica store: %w", err)
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 1<<20)
	var h Hello
	if err := readLine(br, &h); err != nil {
		return nil, h, false, fmt.Errorf("replica store %s: %w", path, err)
	}
	if err := h.Config.Validate(); err != nil {
		return nil, h, false, fmt.Errorf("replica store %s: %w", path, err)
	}
	// The stored Hello came from a primary: its paths are not opened.
	if h.Config, err = r.localConfig(h.Config); err != nil {
		return nil, h, false, fmt.Errorf("replica store %s: %w", path, err)
	}
	g, err := r.NewGuest(h.Kind, h.Config)
	if err != nil {
		return nil, h, false, fmt.Errorf("replica store %s: %w", path, err)
	}
	rd, err := checkpoint.NewReader(br, r.Limits)
	if err == nil {
		err = checkLayout(rd.Header(), h.Kind, g)
	}
	if err != nil {
		g.Close()
		return nil, h, false, fmt.Errorf("replica store %s: %w", path, err)
	}
	im := r.newImage(g, h.Config)
	for {
		if _, err := rd.ReadEpoch(im); err != nil {
			// io.EOF: a clean end; anything else is the torn epoch a
			// kill leaves behind, dropped.
			im.Discard()
			break
		}
	}
	if !im.Committed().Consistent {
		g.Close()
		return nil, h, false, nil
	}
	return im, h, true, nil
}

// Begin starts storing im (consistent) afresh: it writes the whole image
// as one epoch, then appends each later commit (Append).
func (s *Store) Begin(im *Image, h Hello) error {
	s.Close()
	s.hello, s.regions = h, im.g.Regions()
	return s.rewrite(im)
}

// rewrite writes the full committed image of im into a new file and
// renames it over the store's file.
func (s *Store) rewrite(im *Image) error {
	path := filepath.Join(s.dir, storeFile)
	tmp := path + ".new"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, fsperm.File)
	if err != nil {
		return fmt.Errorf("replica store: %w", err)
	}
	cw := &countWriter{w: f}
	if s.wrapFile != nil {
		cw.w = s.wrapFile(f)
	}
	bw := bufio.NewWriterSize(cw, 1<<20)
	h := s.hello
	h.Proto = ProtoVersion
	if err := writeLine(bw, h); err != nil {
		f.Close()
		return err
	}
	w, err := checkpoint.NewWriter(bw, checkpoint.Header{Build: h.Build, Kind: h.Kind, PageSize: guest.PageSize,
		Regions: checkpoint.RegionsOf(s.regions), Flags: checkpoint.FlagSnapshot},
		checkpoint.Options{Compression: checkpoint.CompressFastest, CacheBytes: -1})
	if err != nil {
		f.Close()
		return err
	}
	err = s.writeImage(w, im)
	if err == nil {
		err = bw.Flush()
	}
	if err == nil && s.Sync {
		err = f.Sync()
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("replica store: write image: %w", err)
	}
	if d, derr := os.Open(s.dir); derr == nil {
		d.Sync()
		d.Close()
	}
	old := s.f
	s.f, s.bw, s.cw, s.w, s.base = f, bw, cw, w, cw.n
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
func (s *Store) writeImage(w *checkpoint.Writer, im *Image) error {
	im.mu.Lock()
	if im.handedOver {
		im.mu.Unlock()
		return ErrHandedOver
	}
	state, epoch := im.state, im.epoch
	im.mu.Unlock()
	buf, batch := s.copyBuffers()
	for _, r := range s.regions {
		for p := uint64(0); p < r.Pages(); {
			batch = batch[:0]
			im.mu.Lock()
			if im.handedOver {
				im.mu.Unlock()
				return ErrHandedOver
			}
			for end := min(r.Pages(), p+rewriteScan); p < end && len(batch) < rewriteBatch; p++ {
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
				return err
			}
		}
	}
	if err := w.WriteDevices(state); err != nil {
		return err
	}
	_, err := w.EndEpoch(epoch)
	return err
}

// Append stores one committed epoch: its pages (as committed), state and
// disk writes. Call it after the Image committed the epoch and before
// acknowledging it.
func (s *Store) Append(im *Image, e checkpoint.EpochEnd, pages []uint64, state *guest.MachineState, disk []guest.DiskWrite) error {
	if s.w == nil {
		return nil
	}
	slices.Sort(pages)
	// The pages are copied out of guest memory under Image.mu, in batches,
	// and written from the copies (as writeImage does): an activation may
	// hand the guest over between the commit and this append, and its new
	// owner then runs it and may close it.
	buf, batch := s.copyBuffers()
	for len(pages) > 0 {
		n := min(len(pages), rewriteBatch)
		batch = batch[:0]
		im.mu.Lock()
		if im.handedOver {
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
	if s.Sync {
		if err := s.f.Sync(); err != nil {
			return s.broken(err)
		}
	}
	// Compact once the log is several times the image.
	if s.cw.n > 4*s.base+(64<<20) {
		return s.rewrite(im)
	}
	return nil
}

func (s *Store) broken(err error) error {
	s.Close()
	return fmt.Errorf("replica store: append: %w", err)
}

// Close stops appending (the file stays for Load).
func (s *Store) Close() {
	if s == nil {
		return
	}
	if s.f != nil {
		s.bw.Flush()
		s.f.Close()
	}
	s.f, s.bw, s.cw, s.w = nil, nil, nil, nil
}

var _ io.Writer = (*countWriter)(nil)
