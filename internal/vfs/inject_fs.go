package vfs

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync"
)

// Op names an operation Inject can fail.
type Op string

// The operations Inject can fail.
const (
	OpCreate   Op = "create" // OpenFile with O_CREATE, Create
	OpOpen     Op = "open"   // Open, OpenFile without O_CREATE
	OpWrite    Op = "write"  // File.Write, File.WriteAt
	OpRead     Op = "read"   // File.Read, File.ReadAt
	OpSync     Op = "sync"   // File.Sync
	OpTruncate Op = "truncate"
	OpRename   Op = "rename" // matched on the new name
	OpRemove   Op = "remove"
	OpMkdir    Op = "mkdir"
	OpSyncDir  Op = "syncdir"
	OpChmod    Op = "chmod"
)

// ErrInjected is the error a Rule without its own Err fails with.
var ErrInjected = errors.New("vfs: injected fault")

// A Rule fails operations. It matches an operation of kind Op on a path
// containing Path ("" matches any); of the matching calls, it fails the
// Nth (1-based) only, or every one from the Nth on if Sticky, or all if
// Nth is 0.
type Rule struct {
	Op     Op
	Path   string
	Nth    int
	Sticky bool
	Err    error // nil: ErrInjected

	seen int
}

// Inject is an FS that fails operations by Rule and passes the rest to
// the FS it wraps.
type Inject struct {
	fs FS

	// mu guards rules and their counts.
	mu    sync.Mutex
	rules []*Rule
}

// NewInject wraps fsys.
func NewInject(fsys FS) *Inject { return &Inject{fs: fsys} }

// Add adds a rule.
func (x *Inject) Add(r Rule) {
	x.mu.Lock()
	x.rules = append(x.rules, &r)
	x.mu.Unlock()
}

// Reset removes every rule.
func (x *Inject) Reset() {
	x.mu.Lock()
	x.rules = nil
	x.mu.Unlock()
}

// check reports the injected error for op on path, if a rule fails it.
func (x *Inject) check(op Op, path string) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, r := range x.rules {
		if r.Op != op || !strings.Contains(path, r.Path) {
			continue
		}
		r.seen++
		if r.Nth == 0 || r.seen == r.Nth || (r.Sticky && r.seen > r.Nth) {
			err := r.Err
			if err == nil {
				err = ErrInjected
			}
			return fmt.Errorf("%s %s: %w", op, path, err)
		}
	}
	return nil
}

func (x *Inject) Create(name string, perm fs.FileMode) (File, error) {
	if err := x.check(OpCreate, name); err != nil {
		return nil, err
	}
	f, err := x.fs.Create(name, perm)
	if err != nil {
		return nil, err
	}
	return &injectFile{File: f, x: x}, nil
}

func (x *Inject) Open(name string) (File, error) {
	if err := x.check(OpOpen, name); err != nil {
		return nil, err
	}
	f, err := x.fs.Open(name)
	if err != nil {
		return nil, err
	}
	return &injectFile{File: f, x: x}, nil
}

func (x *Inject) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	op := OpOpen
	if flag&osCreate != 0 {
		op = OpCreate
	}
	if err := x.check(op, name); err != nil {
		return nil, err
	}
	f, err := x.fs.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &injectFile{File: f, x: x}, nil
}

func (x *Inject) Rename(o, n string) error {
	if err := x.check(OpRename, n); err != nil {
		return err
	}
	return x.fs.Rename(o, n)
}

func (x *Inject) Remove(name string) error {
	if err := x.check(OpRemove, name); err != nil {
		return err
	}
	return x.fs.Remove(name)
}

func (x *Inject) MkdirAll(dir string, perm fs.FileMode) error {
	if err := x.check(OpMkdir, dir); err != nil {
		return err
	}
	return x.fs.MkdirAll(dir, perm)
}

func (x *Inject) Stat(name string) (fs.FileInfo, error) { return x.fs.Stat(name) }
func (x *Inject) ReadDir(dir string) ([]string, error)  { return x.fs.ReadDir(dir) }
func (x *Inject) Chmod(name string, mode fs.FileMode) error {
	if err := x.check(OpChmod, name); err != nil {
		return err
	}
	return x.fs.Chmod(name, mode)
}

func (x *Inject) SyncDir(dir string) error {
	if err := x.check(OpSyncDir, dir); err != nil {
		return err
	}
	return x.fs.SyncDir(dir)
}

type injectFile struct {
	File
	x *Inject
}

func (f *injectFile) Write(p []byte) (int, error) {
	if err := f.x.check(OpWrite, f.Name()); err != nil {
		return 0, err
	}
	return f.File.Write(p)
}

func (f *injectFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.x.check(OpWrite, f.Name()); err != nil {
		return 0, err
	}
	return f.File.WriteAt(p, off)
}

func (f *injectFile) Read(p []byte) (int, error) {
	if err := f.x.check(OpRead, f.Name()); err != nil {
		return 0, err
	}
	return f.File.Read(p)
}

func (f *injectFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.x.check(OpRead, f.Name()); err != nil {
		return 0, err
	}
	return f.File.ReadAt(p, off)
}

func (f *injectFile) Sync() error {
	if err := f.x.check(OpSync, f.Name()); err != nil {
		return err
	}
	return f.File.Sync()
}

func (f *injectFile) Truncate(size int64) error {
	if err := f.x.check(OpTruncate, f.Name()); err != nil {
		return err
	}
	return f.File.Truncate(size)
}
