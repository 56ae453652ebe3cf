package replica

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/fsperm"
	"github.com/tandemvm/tandem/internal/vfs"
	"github.com/tandemvm/tandem/precopy"
)

// A snapshot file holds exactly what a migration puts on the wire: the
// Hello line, then the checkpoint stream. Restoring one is receiving a
// migration from a file.

// FileLink is a precopy.Link that writes a snapshot file. The file is
// written under a temporary name and published atomically (fsync, rename,
// fsync of the directory) when the final epoch is acknowledged, so a
// reader never sees a partial snapshot under the real name.
type FileLink struct {
	fs   vfs.FS
	path string
	tmp  string
	f    vfs.File
	bw   *bufio.Writer
	cw   *countWriter
	w    *checkpoint.Writer
	done bool
}

type countWriter struct {
	w io.Writer
	n uint64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += uint64(n)
	return n, err
}

// CreateFileLink starts a snapshot at path on the real file system.
func CreateFileLink(path string, hello Hello, regions []guest.Region, opts checkpoint.Options) (*FileLink, error) {
	return CreateFileLinkFS(vfs.Default, path, hello, regions, opts)
}

// CreateFileLinkFS starts a snapshot at path on fsys. It is written under
// a temporary name of its own (vfs.TempName(path) and a random suffix,
// so two snapshots to one name do not share it) and published as
// vfs.WriteFileAtomic publishes.
func CreateFileLinkFS(fsys vfs.FS, path string, hello Hello, regions []guest.Region, opts checkpoint.Options) (*FileLink, error) {
	tmp := fmt.Sprintf("%s-%016x", vfs.TempName(path), rand.Uint64())
	f, err := fsys.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, fsperm.File)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", path, err)
	}
	l := &FileLink{fs: fsys, path: path, tmp: tmp, f: f}
	l.cw = &countWriter{w: f}
	l.bw = bufio.NewWriterSize(l.cw, 1<<20)
	hello.Proto = ProtoVersion
	hello.Purpose = PurposeMigrate
	hello.Format = uint16(checkpoint.Current)
	hello.MinReader = uint16(checkpoint.MinReadable)
	if opts.Version != 0 {
		hello.Format = uint16(opts.Version)
	}
	if err := writeLine(l.bw, hello); err != nil {
		l.Abort()
		return nil, err
	}
	h := checkpoint.Header{Build: hello.Build, Kind: hello.Kind, PageSize: guest.PageSize,
		Regions: checkpoint.RegionsOf(regions), Flags: checkpoint.FlagSnapshot}
	if l.w, err = checkpoint.NewWriter(l.bw, h, opts); err != nil {
		l.Abort()
		return nil, err
	}
	return l, nil
}

// Writer implements precopy.Link.
func (l *FileLink) Writer() *checkpoint.Writer { return l.w }

// Flush implements precopy.Link.
func (l *FileLink) Flush() error { return l.bw.Flush() }

// BytesSent implements precopy.Link.
func (l *FileLink) BytesSent() uint64 { return l.cw.n }

// WaitAck implements precopy.Link. A file takes what is written at once;
// the final epoch ends and publishes it, and its acknowledgement says the
// image is safe.
func (l *FileLink) WaitAck(ctx context.Context, epoch uint64, final bool) (precopy.Ack, error) {
	if !final {
		return precopy.Ack{Epoch: epoch}, nil
	}
	t0 := time.Now()
	if err := l.publish(); err != nil {
		return precopy.Ack{}, err
	}
	return precopy.Ack{Epoch: epoch, Final: true, LoadTime: time.Since(t0)}, nil
}

func (l *FileLink) publish() error {
	if l.done {
		return nil
	}
	if err := l.w.EndStream(); err != nil {
		return err
	}
	if err := l.bw.Flush(); err != nil {
		return err
	}
	if err := vfs.FPPublishBeforeSync.Hit(); err != nil {
		return err
	}
	if err := l.f.Sync(); err != nil {
		return fmt.Errorf("snapshot %s: fsync: %w", l.path, err)
	}
	if err := l.f.Close(); err != nil {
		return fmt.Errorf("snapshot %s: close: %w", l.path, err)
	}
	// Closed: Abort must not close it again, only remove it.
	l.f = nil
	if err := vfs.FPPublishBeforeRename.Hit(); err != nil {
		return err
	}
	if err := l.fs.Rename(l.tmp, l.path); err != nil {
		return fmt.Errorf("snapshot %s: %w", l.path, err)
	}
	l.done = true
	if err := vfs.FPPublishBeforeSyncDir.Hit(); err != nil {
		return err
	}
	if err := l.fs.SyncDir(filepath.Dir(l.path)); err != nil {
		return fmt.Errorf("snapshot %s: published but not durable: fsync directory: %w", l.path, err)
	}
	return vfs.FPPublishAfterSyncDir.Hit()
}

// Abort removes an unpublished snapshot.
func (l *FileLink) Abort() {
	if !l.done {
		if l.f != nil {
			l.f.Close()
		}
		l.fs.Remove(l.tmp)
	}
}

// RestoreFile restores a snapshot file written by a FileLink into a new
// guest, paused, with its state loaded.
func (r *Receiver) RestoreFile(path string) (MigrationResult, error) {
	return r.RestoreFileFS(vfs.Default, path)
}

// RestoreFileFS is RestoreFile reading from fsys.
func (r *Receiver) RestoreFileFS(fsys vfs.FS, path string) (MigrationResult, error) {
	var res MigrationResult
	f, err := fsys.Open(path)
	if err != nil {
		return res, fmt.Errorf("snapshot: %w", err)
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 1<<20)
	var h Hello
	if err := readLine(br, &h); err != nil {
		return res, fmt.Errorf("snapshot %s: %w", path, err)
	}
	if h.Proto != ProtoVersion {
		return res, fmt.Errorf("snapshot %s: data-channel protocol %d, this build speaks %d", path, h.Proto, ProtoVersion)
	}
	if err := h.Config.Validate(); err != nil {
		return res, fmt.Errorf("snapshot %s: guest config: %w", path, err)
	}
	if err := r.checkSections(h); err != nil {
		return res, fmt.Errorf("snapshot %s: %w", path, err)
	}
	// The snapshot's paths are the source's: a disk lives at DiskPath.
	if h.Config, err = r.localConfig(h.Config); err != nil {
		return res, fmt.Errorf("snapshot %s: %w", path, err)
	}
	res.Hello = h
	g, err := r.NewGuest(h.Kind, h.Config)
	if err != nil {
		return res, fmt.Errorf("snapshot %s: build the %s guest: %w", path, h.Kind, err)
	}
	ok := false
	defer func() {
		if !ok {
			g.Close()
		}
	}()
	rd, err := checkpoint.NewReader(br, r.Limits)
	if err != nil {
		return res, fmt.Errorf("snapshot %s: %w", path, err)
	}
	if err := checkLayout(rd.Header(), h.Kind, g); err != nil {
		return res, fmt.Errorf("snapshot %s: %w", path, err)
	}
	im := r.newImage(g, h.Config)
	for {
		_, err := rd.ReadEpoch(im)
		if err == io.EOF {
			break
		}
		if err != nil {
			im.Discard()
			return res, fmt.Errorf("snapshot %s: %w", path, err)
		}
		res.Epochs++
	}
	t0 := time.Now()
	g, _, err = im.Activate()
	if err != nil {
		return res, fmt.Errorf("snapshot %s: %w", path, err)
	}
	res.Digest = im.Digest().String()
	res.LoadTime = time.Since(t0)
	res.Guest = g
	ok = true
	return res, nil
}
