package vfs

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// File is an open file. Its methods follow *os.File's.
type File interface {
	io.Reader
	io.ReaderAt
	io.Writer
	io.WriterAt
	io.Closer
	// Sync makes the file's data durable (fsync). Until it returns, a
	// crash may lose or tear what was written since the last Sync.
	Sync() error
	Stat() (fs.FileInfo, error)
	Truncate(size int64) error
	// Name is the name the file was opened with.
	Name() string
}

// FS is a file system. Paths are as the os package takes them.
//
// Durability contract (what MemFS enforces and the OS gives on Linux
// with a journaling file system): a file's data written before a
// File.Sync survives a crash; a directory's entries (files created,
// renamed into or removed from it) survive once SyncDir(dir) returns.
// Nothing else is promised to survive.
type FS interface {
	// Create creates or truncates name for reading and writing.
	Create(name string, perm fs.FileMode) (File, error)
	// Open opens name read-only.
	Open(name string) (File, error)
	// OpenFile is os.OpenFile (O_RDONLY, O_WRONLY, O_RDWR, O_CREATE,
	// O_EXCL, O_TRUNC, O_APPEND).
	OpenFile(name string, flag int, perm fs.FileMode) (File, error)
	// Rename replaces newname with oldname atomically (files only).
	Rename(oldname, newname string) error
	// Remove removes a file or an empty directory.
	Remove(name string) error
	// MkdirAll creates dir and its missing parents.
	MkdirAll(dir string, perm fs.FileMode) error
	Stat(name string) (fs.FileInfo, error)
	// ReadDir lists dir's entry names, sorted.
	ReadDir(dir string) ([]string, error)
	// SyncDir makes dir's entries durable (fsync of the directory).
	SyncDir(dir string) error
	// Chmod changes name's permission bits.
	Chmod(name string, mode fs.FileMode) error
}

const (
	osCreate      = os.O_CREATE
	osCreateTrunc = os.O_RDWR | os.O_CREATE | os.O_TRUNC
)

// Default is the real file system.
var Default FS = osFS{}

type osFS struct{}

func (osFS) Create(name string, perm fs.FileMode) (File, error) {
	return os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_TRUNC, perm)
}
func (osFS) Open(name string) (File, error) { return os.Open(name) }
func (osFS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	return os.OpenFile(name, flag, perm)
}
func (osFS) Rename(o, n string) error                    { return os.Rename(o, n) }
func (osFS) Remove(name string) error                    { return os.Remove(name) }
func (osFS) MkdirAll(dir string, perm fs.FileMode) error { return os.MkdirAll(dir, perm) }
func (osFS) Stat(name string) (fs.FileInfo, error)       { return os.Stat(name) }
func (osFS) Chmod(name string, mode fs.FileMode) error   { return os.Chmod(name, mode) }
func (osFS) ReadDir(dir string) ([]string, error) {
	es, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = e.Name()
	}
	return out, nil
}

func (osFS) SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	serr := d.Sync()
	cerr := d.Close()
	return errors.Join(serr, cerr)
}

// OrDefault is fsys, or Default if fsys is nil.
func OrDefault(fsys FS) FS {
	if fsys == nil {
		return Default
	}
	return fsys
}

// ReadFile reads the whole of name.
func ReadFile(fsys FS, name string) ([]byte, error) {
	f, err := fsys.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}

// MkdirAllSync creates dir and its missing parents and makes each new
// entry durable (a sync of every parent that gained one), so a crash
// does not take away a directory Tandem went on to use.
func MkdirAllSync(fsys FS, dir string, perm fs.FileMode) error {
	dir = filepath.Clean(dir)
	var missing []string
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := fsys.Stat(d); err == nil {
			break
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		missing = append(missing, d)
		if p := filepath.Dir(d); p == d {
			break
		}
	}
	if err := fsys.MkdirAll(dir, perm); err != nil {
		return err
	}
	for _, d := range missing {
		if err := fsys.SyncDir(filepath.Dir(d)); err != nil {
			return err
		}
	}
	return nil
}
