package vfs

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ErrCrashed is returned by every call on a file opened before the
// MemFS's last Crash.
var ErrCrashed = errors.New("vfs: the file system crashed since this file was opened")

// CrashMode says what Crash keeps of what was not made durable.
type CrashMode int

const (
	// DropUnsynced keeps exactly what was synced: each file's data as of
	// its last Sync, each directory's entries as of its last SyncDir.
	DropUnsynced CrashMode = iota
	// TearUnsynced also keeps, per file and chosen at random, a prefix of
	// the writes made since its last Sync, the last one possibly cut at
	// any byte (a power loss during write-back). Directory entries are
	// kept only as synced.
	TearUnsynced
)

// MemFS is an in-memory FS that simulates a crash: see the package doc.
// Its methods are safe for concurrent use. Paths are cleaned; a relative
// path is taken from "/".
type MemFS struct {
	// mu guards everything below. It is held only over memory copies.
	mu sync.Mutex
	// cur is the namespace as the running system sees it; durable is
	// what a crash would leave. Both map a cleaned absolute path to its
	// node; "/" is always there.
	cur, durable map[string]*memNode
	gen          uint64 // bumped by Crash: older handles are dead
	rng          *rand.Rand
}

// memNode is a file or a directory (an inode: two names may share it
// across a rename only in the durable map, never in cur).
type memNode struct {
	dir  bool
	mode fs.FileMode
	mod  time.Time
	// data is the content now; synced is the content as of the last Sync;
	// since lists the writes (and truncations) made after it, in order.
	data   []byte
	synced []byte
	since  []memOp
}

// memOp is one change to a file's data: a write of data at off, or (data
// nil, trunc set) a truncation to off.
type memOp struct {
	off   int64
	data  []byte
	trunc bool
}

// NewMemFS makes an empty MemFS; seed fixes its tearing choices.
func NewMemFS(seed uint64) *MemFS {
	root := &memNode{dir: true, mode: fs.ModeDir | 0o755}
	return &MemFS{
		cur:     map[string]*memNode{"/": root},
		durable: map[string]*memNode{"/": root},
		rng:     rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
	}
}

func clean(name string) string {
	if !filepath.IsAbs(name) {
		name = "/" + name
	}
	return filepath.Clean(name)
}

func pathErr(op, name string, err error) error { return &fs.PathError{Op: op, Path: name, Err: err} }

// parentLocked checks that name's parent is a directory in cur.
func (m *MemFS) parentLocked(op, name string) error {
	p, ok := m.cur[filepath.Dir(name)]
	if !ok {
		return pathErr(op, name, fs.ErrNotExist)
	}
	if !p.dir {
		return pathErr(op, name, errors.New("not a directory"))
	}
	return nil
}

// Create implements FS.
func (m *MemFS) Create(name string, perm fs.FileMode) (File, error) {
	return m.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_TRUNC, perm)
}

// Open implements FS.
func (m *MemFS) Open(name string) (File, error) { return m.OpenFile(name, os.O_RDONLY, 0) }

// OpenFile implements FS.
func (m *MemFS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	p := clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.cur[p]
	switch {
	case ok && flag&os.O_CREATE != 0 && flag&os.O_EXCL != 0:
		return nil, pathErr("open", name, fs.ErrExist)
	case !ok && flag&os.O_CREATE == 0:
		return nil, pathErr("open", name, fs.ErrNotExist)
	case !ok:
		if err := m.parentLocked("open", p); err != nil {
			return nil, err
		}
		n = &memNode{mode: perm & fs.ModePerm, mod: time.Now()}
		m.cur[p] = n
	case n.dir && flag&(os.O_WRONLY|os.O_RDWR) != 0:
		return nil, pathErr("open", name, errors.New("is a directory"))
	}
	writable := flag&(os.O_WRONLY|os.O_RDWR) != 0
	if flag&os.O_TRUNC != 0 && writable && len(n.data) > 0 {
		n.truncLocked(0)
	}
	return &memFile{fs: m, node: n, name: name, gen: m.gen,
		read: flag&os.O_WRONLY == 0, write: writable, app: flag&os.O_APPEND != 0}, nil
}

func (n *memNode) truncLocked(size int64) {
	if size <= int64(len(n.data)) {
		n.data = n.data[:size:size]
	} else {
		n.data = append(n.data, make([]byte, size-int64(len(n.data)))...)
	}
	n.since = append(n.since, memOp{off: size, trunc: true})
	n.mod = time.Now()
}

func (n *memNode) writeLocked(p []byte, off int64) {
	if end := off + int64(len(p)); end > int64(len(n.data)) {
		n.data = append(n.data, make([]byte, end-int64(len(n.data)))...)
	}
	copy(n.data[off:], p)
	n.since = append(n.since, memOp{off: off, data: slices.Clone(p)})
	n.mod = time.Now()
}

// Rename implements FS. Directories cannot be renamed.
func (m *MemFS) Rename(oldname, newname string) error {
	o, nn := clean(oldname), clean(newname)
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.cur[o]
	if !ok {
		return &os.LinkError{Op: "rename", Old: oldname, New: newname, Err: fs.ErrNotExist}
	}
	if n.dir {
		return &os.LinkError{Op: "rename", Old: oldname, New: newname, Err: errors.New("MemFS cannot rename a directory")}
	}
	if err := m.parentLocked("rename", nn); err != nil {
		return err
	}
	if t, ok := m.cur[nn]; ok && t.dir {
		return &os.LinkError{Op: "rename", Old: oldname, New: newname, Err: errors.New("is a directory")}
	}
	delete(m.cur, o)
	m.cur[nn] = n
	return nil
}

// Remove implements FS.
func (m *MemFS) Remove(name string) error {
	p := clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.cur[p]
	if !ok {
		return pathErr("remove", name, fs.ErrNotExist)
	}
	if p == "/" {
		return pathErr("remove", name, errors.New("the root"))
	}
	if n.dir && len(m.childrenLocked(m.cur, p)) > 0 {
		return pathErr("remove", name, syscall.ENOTEMPTY)
	}
	delete(m.cur, p)
	return nil
}

func (m *MemFS) childrenLocked(ns map[string]*memNode, dir string) []string {
	var out []string
	for p := range ns {
		if p != "/" && filepath.Dir(p) == dir {
			out = append(out, filepath.Base(p))
		}
	}
	slices.Sort(out)
	return out
}

// MkdirAll implements FS.
func (m *MemFS) MkdirAll(dir string, perm fs.FileMode) error {
	p := clean(dir)
	m.mu.Lock()
	defer m.mu.Unlock()
	var chain []string
	for d := p; d != "/"; d = filepath.Dir(d) {
		chain = append(chain, d)
	}
	for i := len(chain) - 1; i >= 0; i-- {
		d := chain[i]
		if n, ok := m.cur[d]; ok {
			if !n.dir {
				return pathErr("mkdir", d, errors.New("not a directory"))
			}
			continue
		}
		m.cur[d] = &memNode{dir: true, mode: fs.ModeDir | perm&fs.ModePerm, mod: time.Now()}
	}
	return nil
}

// Stat implements FS.
func (m *MemFS) Stat(name string) (fs.FileInfo, error) {
	p := clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.cur[p]
	if !ok {
		return nil, pathErr("stat", name, fs.ErrNotExist)
	}
	return n.infoLocked(filepath.Base(p)), nil
}

// Chmod implements FS.
func (m *MemFS) Chmod(name string, mode fs.FileMode) error {
	p := clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.cur[p]
	if !ok {
		return pathErr("chmod", name, fs.ErrNotExist)
	}
	n.mode = n.mode&^fs.ModePerm | mode&fs.ModePerm
	return nil
}

// ReadDir implements FS.
func (m *MemFS) ReadDir(dir string) ([]string, error) {
	p := clean(dir)
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.cur[p]
	if !ok {
		return nil, pathErr("readdir", dir, fs.ErrNotExist)
	}
	if !n.dir {
		return nil, pathErr("readdir", dir, errors.New("not a directory"))
	}
	return m.childrenLocked(m.cur, p), nil
}

// SyncDir implements FS: dir's entries as they are now become durable
// (the entries themselves; a file's data needs its own Sync, and a new
// subdirectory's entries their own SyncDir).
func (m *MemFS) SyncDir(dir string) error {
	p := clean(dir)
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.cur[p]
	if !ok {
		return pathErr("syncdir", dir, fs.ErrNotExist)
	}
	if !n.dir {
		return pathErr("syncdir", dir, errors.New("not a directory"))
	}
	for _, c := range m.childrenLocked(m.durable, p) {
		delete(m.durable, filepath.Join(p, c))
	}
	for _, c := range m.childrenLocked(m.cur, p) {
		m.durable[filepath.Join(p, c)] = m.cur[filepath.Join(p, c)]
	}
	return nil
}

// Crash simulates a power loss: every open file dies (ErrCrashed), and
// the file system is left as mode says (see CrashMode). A directory entry
// survives only if it was synced and its parent directory survives.
func (m *MemFS) Crash(mode CrashMode) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.gen++
	keep := map[string]*memNode{"/": m.durable["/"]}
	// Walk the durable namespace from the root so an entry under a lost
	// directory is lost with it.
	paths := make([]string, 0, len(m.durable))
	for p := range m.durable {
		paths = append(paths, p)
	}
	slices.SortFunc(paths, func(a, b string) int { return strings.Count(a, "/") - strings.Count(b, "/") })
	seen := map[*memNode]*memNode{}
	for _, p := range paths {
		if p == "/" {
			continue
		}
		if par, ok := keep[filepath.Dir(p)]; !ok || !par.dir {
			continue
		}
		n := m.durable[p]
		if c, ok := seen[n]; ok {
			keep[p] = c
			continue
		}
		c := &memNode{dir: n.dir, mode: n.mode, mod: n.mod}
		if !n.dir {
			c.data = m.survivingLocked(n, mode)
			c.synced = slices.Clone(c.data)
		}
		seen[n] = c
		keep[p] = c
	}
	m.cur = keep
	m.durable = maps2(keep)
}

func maps2(m map[string]*memNode) map[string]*memNode {
	out := make(map[string]*memNode, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// survivingLocked is what a crash leaves of n's data.
func (m *MemFS) survivingLocked(n *memNode, mode CrashMode) []byte {
	data := slices.Clone(n.synced)
	if mode != TearUnsynced || len(n.since) == 0 {
		return data
	}
	k := m.rng.IntN(len(n.since) + 1) // ops kept whole
	for i, op := range n.since {
		if i > k {
			break
		}
		if op.trunc {
			if i == k {
				break
			}
			if op.off <= int64(len(data)) {
				data = data[:op.off]
			} else {
				data = append(data, make([]byte, op.off-int64(len(data)))...)
			}
			continue
		}
		p := op.data
		if i == k {
			// The op being written back when power went: a prefix of it.
			p = p[:m.rng.IntN(len(p)+1)]
		}
		if end := op.off + int64(len(p)); end > int64(len(data)) {
			data = append(data, make([]byte, end-int64(len(data)))...)
		}
		copy(data[op.off:], p)
	}
	return data
}

// Crashes counts the Crash calls so far (a test's boot ID: each crash
// is a new boot of the simulated host).
func (m *MemFS) Crashes() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.gen
}

// Durable reports whether name would survive a crash now with its
// current content (tests of callers use it to assert what was synced).
func (m *MemFS) Durable(name string) bool {
	p := clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.cur[p]
	if !ok || m.durable[p] != n {
		return false
	}
	for d := filepath.Dir(p); d != "/"; d = filepath.Dir(d) {
		if m.durable[d] == nil || m.durable[d] != m.cur[d] {
			return false
		}
	}
	return n.dir || len(n.since) == 0
}

func (n *memNode) infoLocked(name string) fs.FileInfo {
	return memInfo{name: name, size: int64(len(n.data)), mode: n.mode, mod: n.mod}
}

type memInfo struct {
	name string
	size int64
	mode fs.FileMode
	mod  time.Time
}

func (i memInfo) Name() string       { return i.name }
func (i memInfo) Size() int64        { return i.size }
func (i memInfo) Mode() fs.FileMode  { return i.mode }
func (i memInfo) ModTime() time.Time { return i.mod }
func (i memInfo) IsDir() bool        { return i.mode.IsDir() }
func (i memInfo) Sys() any           { return nil }

// memFile is an open MemFS file.
type memFile struct {
	fs          *MemFS
	node        *memNode
	name        string
	gen         uint64
	read, write bool
	app         bool

	// off is the file offset (guarded by fs.mu, as is closed).
	off    int64
	closed bool
}

func (f *memFile) checkLocked(op string, write bool) error {
	switch {
	case f.closed:
		return pathErr(op, f.name, fs.ErrClosed)
	case f.gen != f.fs.gen:
		return pathErr(op, f.name, ErrCrashed)
	case write && !f.write:
		return pathErr(op, f.name, errors.New("not open for writing"))
	case !write && !f.read:
		return pathErr(op, f.name, errors.New("not open for reading"))
	case f.node.dir && op != "close" && op != "stat":
		return pathErr(op, f.name, errors.New("is a directory"))
	}
	return nil
}

func (f *memFile) Name() string { return f.name }

func (f *memFile) Read(p []byte) (int, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.checkLocked("read", false); err != nil {
		return 0, err
	}
	if f.off >= int64(len(f.node.data)) {
		return 0, io.EOF
	}
	n := copy(p, f.node.data[f.off:])
	f.off += int64(n)
	return n, nil
}

func (f *memFile) ReadAt(p []byte, off int64) (int, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.checkLocked("read", false); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, pathErr("read", f.name, errors.New("negative offset"))
	}
	if off >= int64(len(f.node.data)) {
		return 0, io.EOF
	}
	n := copy(p, f.node.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *memFile) Write(p []byte) (int, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.checkLocked("write", true); err != nil {
		return 0, err
	}
	if f.app {
		f.off = int64(len(f.node.data))
	}
	f.node.writeLocked(p, f.off)
	f.off += int64(len(p))
	return len(p), nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.checkLocked("write", true); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, pathErr("write", f.name, errors.New("negative offset"))
	}
	f.node.writeLocked(p, off)
	return len(p), nil
}

func (f *memFile) Truncate(size int64) error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.checkLocked("truncate", true); err != nil {
		return err
	}
	if size < 0 {
		return pathErr("truncate", f.name, errors.New("negative size"))
	}
	f.node.truncLocked(size)
	return nil
}

// Sync makes the file's data durable (not its name: see SyncDir).
func (f *memFile) Sync() error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if f.closed {
		return pathErr("sync", f.name, fs.ErrClosed)
	}
	if f.gen != f.fs.gen {
		return pathErr("sync", f.name, ErrCrashed)
	}
	f.node.synced = slices.Clone(f.node.data)
	f.node.since = nil
	return nil
}

func (f *memFile) Stat() (fs.FileInfo, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	switch {
	case f.closed:
		return nil, pathErr("stat", f.name, fs.ErrClosed)
	case f.gen != f.fs.gen:
		return nil, pathErr("stat", f.name, ErrCrashed)
	}
	return f.node.infoLocked(filepath.Base(clean(f.name))), nil
}

func (f *memFile) Close() error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if f.closed {
		return pathErr("close", f.name, fs.ErrClosed)
	}
	f.closed = true
	return nil
}

// String names the file system in test output.
func (m *MemFS) String() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return fmt.Sprintf("MemFS(%d entries, %d durable)", len(m.cur), len(m.durable))
}
