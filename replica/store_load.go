package replica

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
	"strings"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/vfs"
)

// image.sync marks a clean close: "tandem-store-clean v1 epoch=N", the
// last epoch of image.tnd, everything up to it fsynced and nothing
// written after. Begin removes it before writing a new image; Close
// writes it. With the StoreStamp in image.tnd's Hello it lets Load tell
// whether image.tnd can lack acknowledged epochs: only if it was written
// under SyncMemory, the host restarted since (the page cache, which held
// every written epoch, is gone), and it was not closed cleanly at the
// epoch Load recovers.
const cleanMagic = "tandem-store-clean v1"

// distrust says why image.tnd, stamped st, may lack acknowledged epochs,
// or "" if it cannot. recovered is the epoch Load came back at; before
// the replay (recovered nil) it answers "" when only a clean mark could
// decide, so a refusal that needs no replay leaves the disk file alone.
func (s *Store) distrust(st *StoreStamp, recovered *uint64) string {
	now := s.bootID()
	switch {
	case st == nil:
		return "it does not say how it was written (an older build), so whether every acknowledged epoch was fsynced is unknown"
	case st.Sync == SyncDisk.String():
		return ""
	case st.Boot != "" && st.Boot == now:
		return "" // same boot: the page cache held every written epoch
	}
	b, err := vfs.ReadFile(s.fs, filepath.Join(s.dir, storeSyncFile))
	var clean uint64
	if err == nil {
		_, err = fmt.Sscanf(strings.TrimSpace(string(b)), cleanMagic+" epoch=%d", &clean)
	}
	switch {
	case err == nil && recovered == nil:
		return "" // the clean mark decides, after the replay
	case err == nil && clean == *recovered:
		return "" // closed cleanly: all fsynced, nothing written after
	}
	return fmt.Sprintf("it was written under --sync %s and the host has restarted since (boot %s, now %s) without a clean close at its last epoch: an epoch after the last fsync may have been acknowledged",
		st.Sync, orDash(st.Boot), orDash(now))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// Load restores the stored image, if any, into a new guest built by
// factory, and rebuilds the guest's disk from it. It returns ok=false
// when there is nothing usable on disk, and an error naming image.tnd
// and what is wrong when it cannot be read or may lack acknowledged
// epochs (ErrStoreMayLack). The disk file is untouched unless the
// image's first (full) epoch was complete (then it holds a stored epoch,
// even if the image is refused afterwards for want of a clean mark).
func (s *Store) Load(r *Receiver) (*Image, Hello, bool, error) {
	path := filepath.Join(s.dir, storeFile)
	f, err := s.fs.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
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
	// The stored Hello came from a primary: it is checked as one from the
	// network is, and its paths are not opened.
	if h.Config, err = r.checkGuest(h); err != nil {
		return nil, h, false, fmt.Errorf("replica store %s: %w", path, err)
	}
	if why := s.distrust(h.Store, nil); why != "" && !s.accepted(path, why) {
		return nil, h, false, fmt.Errorf("%w: %s: %s; it is not offered (a primary's full sync replaces it; --accept-unsynced-image runs it anyway)", ErrStoreMayLack, path, why)
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
	// The first epoch must carry the whole disk (see Store): one written
	// by an older build does not, and its disk file may be of another
	// epoch than its memory.
	t := &diskCounter{Image: im}
	if _, err := rd.ReadEpoch(t); err != nil {
		im.Discard()
		g.Close()
		return nil, h, false, fmt.Errorf("replica store %s: its first (full) epoch is unreadable: %w", path, err)
	}
	if h.Config.Disk != "" && t.writes == 0 {
		g.Close()
		return nil, h, false, fmt.Errorf("replica store %s: its full image carries no disk contents (written by an older build), so its memory and the disk file may be of different epochs; a full sync is needed", path)
	}

	for {
		if _, err := rd.ReadEpoch(im); err != nil {
			// io.EOF: a clean end; anything else is the torn epoch a
			// kill or a power loss leaves behind, dropped.
			im.Discard()
			if !errors.Is(err, io.EOF) {
				r.log().Warn("replica store: dropped a torn last epoch", "file", path,
					"epoch", im.Committed().Epoch+1, "err", err)
			}
			break
		}
	}
	if !im.Committed().Consistent {
		g.Close()
		return nil, h, false, nil
	}
	e := im.Committed().Epoch
	if why := s.distrust(h.Store, &e); why != "" && !s.accepted(path, fmt.Sprintf("it holds epoch %d but %s", e, why)) {
		g.Close()
		return nil, h, false, fmt.Errorf("%w: %s holds epoch %d but %s; it is not offered (a primary's full sync replaces it; --accept-unsynced-image runs it anyway)", ErrStoreMayLack, path, e, why)
	}
	h.Store = nil // the file's own, not the guest's
	return im, h, true, nil
}

// accepted says whether the operator's override takes an image that may
// lack acknowledged epochs, and logs it loudly when it does.
func (s *Store) accepted(path, why string) bool {
	if !s.acceptUnsynced {
		return false
	}
	s.logger().Warn("replica store: offering an image that may lack acknowledged epochs (--accept-unsynced-image)", "file", path, "why", why)
	return true
}

// ErrStoreMayLack refuses a stored image that may lack acknowledged
// epochs (docs/DURABILITY.md): written under --sync memory, the host
// restarted since, and the store was not closed cleanly.
var ErrStoreMayLack = errors.New("replica store: the stored image may lack acknowledged epochs")

// diskCounter counts the disk writes an epoch carries on their way to the
// Image. The full image's end with a size mark (guest.DiskWrite), which
// cuts a disk file written past the stored disk (by epochs that never
// reached image.tnd) to the size it had.
type diskCounter struct {
	*Image
	writes int
}

func (d *diskCounter) StoreDisk(ws []guest.DiskWrite) error {
	d.writes += len(ws)
	return d.Image.StoreDisk(ws)
}
