// Package fsperm keeps the files Tandem writes that hold guest memory,
// guest disks or keys private to the user Tandem runs as: files 0600,
// their directories 0700. A file or directory found with looser modes
// (left by an older build, or made by hand) is tightened when Tandem
// opens it, and the caller logs that once.
package fsperm

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"

	"github.com/tandemvm/tandem/internal/vfs"
)

// File and Dir are the modes of private files and directories.
const (
	File fs.FileMode = 0o600
	Dir  fs.FileMode = 0o700
)

// PrivateDir creates dir (and missing parents) with mode 0700, or, if it
// exists with group or other bits set, clears them. A tightened directory
// is logged on log (if not nil), once: the next call finds it private.
func PrivateDir(dir string, log *slog.Logger) error {
	return PrivateDirFS(vfs.Default, dir, log)
}

// PrivateDirFS is PrivateDir on fsys. A directory it creates is made
// durable (its parent synced), so a crash does not take it away.
func PrivateDirFS(fsys vfs.FS, dir string, log *slog.Logger) error {
	if err := vfs.MkdirAllSync(fsys, dir, Dir); err != nil {
		return fmt.Errorf("private directory %s: %w", dir, err)
	}
	return tighten(fsys, dir, Dir, true, log)
}

// PrivateFile clears the group and other bits of an existing file; a
// missing file is fine (whoever creates it creates it 0600).
func PrivateFile(path string, log *slog.Logger) error {
	return PrivateFileFS(vfs.Default, path, log)
}

// PrivateFileFS is PrivateFile on fsys.
func PrivateFileFS(fsys vfs.FS, path string, log *slog.Logger) error {
	err := tighten(fsys, path, File, false, log)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

func tighten(fsys vfs.FS, path string, want fs.FileMode, dir bool, log *slog.Logger) error {
	fi, err := fsys.Stat(path)
	if err != nil {
		return err
	}
	if fi.IsDir() != dir {
		kind := "a file"
		if dir {
			kind = "a directory"
		}
		return fmt.Errorf("%s: want %s", path, kind)
	}
	old := fi.Mode().Perm()
	if old&0o077 == 0 {
		return nil
	}
	mode := old &^ 0o077
	if mode&want != want {
		// Keep the owner's bits Tandem needs (rw, and x for a directory).
		mode |= want
	}
	if err := fsys.Chmod(path, mode); err != nil {
		return fmt.Errorf("tighten %s from %v: %w", path, old, err)
	}
	if log != nil {
		log.Warn("tightened the mode of a file holding guest data: it was readable by other users", "path", path, "was", old.String(), "now", mode.String())
	}
	return nil
}
