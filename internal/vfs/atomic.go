package vfs

import (
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"

	"github.com/tandemvm/tandem/internal/failpoint"
)

// The failpoints of WriteFileAtomic, in the order they are passed.
var (
	FPPublishBeforeSync    = failpoint.New("vfs.publish.before-sync")
	FPPublishBeforeRename  = failpoint.New("vfs.publish.before-rename")
	FPPublishBeforeSyncDir = failpoint.New("vfs.publish.before-syncdir")
	FPPublishAfterSyncDir  = failpoint.New("vfs.publish.after-syncdir")
)

// TempName is the temporary name WriteFileAtomic writes path under.
// Whoever owns a directory may remove leftovers of that form.
func TempName(path string) string {
	dir, base := filepath.Split(path)
	return filepath.Join(dir, "."+base+".tmp")
}

// WriteFileAtomic publishes a file at path whose content write produces:
// it writes TempName(path), fsyncs it, renames it over path and fsyncs
// the directory. A reader sees the old file or the whole new one; after a
// crash the same holds, and once it returns nil the new file survives a
// crash. On error the temporary file is removed (best effort) and path
// is as it was. Every error is returned, naming path and the step.
func WriteFileAtomic(fsys FS, path string, perm fs.FileMode, write func(io.Writer) error) (err error) {
	dir := filepath.Dir(path)
	tmp := TempName(path)
	f, err := fsys.OpenFile(tmp, osCreateTrunc, perm)
	if err != nil {
		return fmt.Errorf("write %s: create temporary file: %w", path, err)
	}
	closed := false
	defer func() {
		if err != nil {
			if !closed {
				f.Close()
			}
			fsys.Remove(tmp)
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	if err := write(bw); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := FPPublishBeforeSync.Hit(); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("write %s: fsync %s: %w", path, tmp, err)
	}
	closed = true
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: close %s: %w", path, tmp, err)
	}
	if err := FPPublishBeforeRename.Hit(); err != nil {
		return err
	}
	if err := fsys.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: rename: %w", path, err)
	}
	if err := FPPublishBeforeSyncDir.Hit(); err != nil {
		return err
	}
	if err := fsys.SyncDir(dir); err != nil {
		return fmt.Errorf("write %s: fsync directory %s: %w", path, dir, err)
	}
	return FPPublishAfterSyncDir.Hit()
}

// WriteFile publishes data at path with WriteFileAtomic.
func WriteFile(fsys FS, path string, data []byte, perm fs.FileMode) error {
	return WriteFileAtomic(fsys, path, perm, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}
