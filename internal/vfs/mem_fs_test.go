package vfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
)

func mustWrite(t *testing.T, fsys FS, name string, data []byte, sync bool) File {
	t.Helper()
	f, err := fsys.Create(name, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if sync {
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func content(t *testing.T, fsys FS, name string) (string, bool) {
	t.Helper()
	b, err := ReadFile(fsys, name)
	if errors.Is(err, fs.ErrNotExist) {
		return "", false
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(b), true
}

func TestMemSyncedDataAndEntriesSurvive(t *testing.T) {
	m := NewMemFS(1)
	if err := m.MkdirAll("/d", 0o700); err != nil {
		t.Fatal(err)
	}
	if err := m.SyncDir("/"); err != nil {
		t.Fatal(err)
	}
	f := mustWrite(t, m, "/d/a", []byte("hello"), true)
	if err := m.SyncDir("/d"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte(" world")); err != nil {
		t.Fatal(err)
	}
	if got, _ := content(t, m, "/d/a"); got != "hello world" {
		t.Fatalf("before crash %q", got)
	}
	m.Crash(DropUnsynced)
	if got, ok := content(t, m, "/d/a"); !ok || got != "hello" {
		t.Fatalf("after crash %q %v, want the synced %q", got, ok, "hello")
	}
	if _, err := f.Write([]byte("x")); !errors.Is(err, ErrCrashed) {
		t.Fatalf("write on a handle from before the crash: %v", err)
	}
	if err := f.Sync(); !errors.Is(err, ErrCrashed) {
		t.Fatalf("sync on a handle from before the crash: %v", err)
	}
}

func TestMemSyncedFileWithoutDirSyncIsLost(t *testing.T) {
	m := NewMemFS(1)
	mustWrite(t, m, "/a", []byte("data"), true).Close()
	if m.Durable("/a") {
		t.Fatal("Durable says a file whose entry was never synced is durable")
	}
	m.Crash(DropUnsynced)
	if _, ok := content(t, m, "/a"); ok {
		t.Fatal("a created file survived without a directory sync")
	}
}

func TestMemDirSyncWithoutFileSyncKeepsEmptyFile(t *testing.T) {
	m := NewMemFS(1)
	mustWrite(t, m, "/a", []byte("data"), false).Close()
	if err := m.SyncDir("/"); err != nil {
		t.Fatal(err)
	}
	if m.Durable("/a") {
		t.Fatal("Durable says unsynced data is durable")
	}
	m.Crash(DropUnsynced)
	if got, ok := content(t, m, "/a"); !ok || got != "" {
		t.Fatalf("got %q %v, want an empty file (entry synced, data not)", got, ok)
	}
}

func TestMemRenameNeedsDirSync(t *testing.T) {
	for _, syncDir := range []bool{false, true} {
		t.Run(fmt.Sprint("syncdir=", syncDir), func(t *testing.T) {
			m := NewMemFS(1)
			mustWrite(t, m, "/f", []byte("old"), true).Close()
			m.SyncDir("/")
			mustWrite(t, m, "/f.tmp", []byte("new"), true).Close()
			if err := m.Rename("/f.tmp", "/f"); err != nil {
				t.Fatal(err)
			}
			if got, _ := content(t, m, "/f"); got != "new" {
				t.Fatalf("before crash %q", got)
			}
			if syncDir {
				if err := m.SyncDir("/"); err != nil {
					t.Fatal(err)
				}
				if !m.Durable("/f") {
					t.Fatal("Durable says no after file and directory sync")
				}
			}
			m.Crash(DropUnsynced)
			got, _ := content(t, m, "/f")
			_, tmpThere := content(t, m, "/f.tmp")
			want := "old"
			if syncDir {
				want = "new"
			}
			if got != want || tmpThere {
				t.Fatalf("after crash /f=%q (want %q), temp present %v", got, want, tmpThere)
			}
		})
	}
}

func TestMemRemoveNeedsDirSync(t *testing.T) {
	m := NewMemFS(1)
	mustWrite(t, m, "/f", []byte("x"), true).Close()
	m.SyncDir("/")
	if err := m.Remove("/f"); err != nil {
		t.Fatal(err)
	}
	m.Crash(DropUnsynced)
	if got, ok := content(t, m, "/f"); !ok || got != "x" {
		t.Fatalf("an unsynced remove held: %q %v", got, ok)
	}
	m.Remove("/f")
	m.SyncDir("/")
	m.Crash(DropUnsynced)
	if _, ok := content(t, m, "/f"); ok {
		t.Fatal("a synced remove did not hold")
	}
}

func TestMemUnsyncedDirLosesItsSubtree(t *testing.T) {
	m := NewMemFS(1)
	m.MkdirAll("/a/b", 0o700)
	mustWrite(t, m, "/a/b/f", []byte("x"), true).Close()
	m.SyncDir("/a/b")
	m.SyncDir("/a")
	// "/" was never synced: /a is not durable, nor anything under it.
	m.Crash(DropUnsynced)
	if _, err := m.Stat("/a"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("an unsynced directory survived: %v", err)
	}
	if _, ok := content(t, m, "/a/b/f"); ok {
		t.Fatal("a file under a lost directory survived")
	}
	// MkdirAllSync makes the chain durable.
	if err := MkdirAllSync(m, "/a/b", 0o700); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, m, "/a/b/f", []byte("y"), true).Close()
	m.SyncDir("/a/b")
	m.Crash(DropUnsynced)
	if got, ok := content(t, m, "/a/b/f"); !ok || got != "y" {
		t.Fatalf("after MkdirAllSync: %q %v", got, ok)
	}
}

func TestMemTruncateIsUndoneUnlessSynced(t *testing.T) {
	m := NewMemFS(1)
	mustWrite(t, m, "/f", []byte("abcdef"), true).Close()
	m.SyncDir("/")
	f, err := m.OpenFile("/f", os.O_RDWR|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte("Z"))
	if got, _ := content(t, m, "/f"); got != "Z" {
		t.Fatalf("before crash %q", got)
	}
	m.Crash(DropUnsynced)
	if got, _ := content(t, m, "/f"); got != "abcdef" {
		t.Fatalf("after crash %q, want the synced abcdef", got)
	}
}

// TestMemTearKeepsAPrefixOfUnsyncedWrites checks every torn outcome over
// many seeds against the set of states a prefix of the writes (the last
// cut anywhere) can produce, and that the extremes both occur.
func TestMemTearKeepsAPrefixOfUnsyncedWrites(t *testing.T) {
	base := []byte("0123456789")
	writes := []struct {
		off  int64
		data string
	}{{2, "aa"}, {8, "bbbb"}, {0, "c"}, {20, "dd"}}
	// Every acceptable outcome.
	valid := map[string]bool{}
	cur := slices.Clone(base)
	apply := func(d []byte, off int64, p []byte) []byte {
		if end := off + int64(len(p)); end > int64(len(d)) {
			d = append(d, make([]byte, end-int64(len(d)))...)
		}
		copy(d[off:], p)
		return d
	}
	for _, w := range writes {
		for cut := 0; cut <= len(w.data); cut++ {
			valid[string(apply(slices.Clone(cur), w.off, []byte(w.data[:cut])))] = true
		}
		cur = apply(cur, w.off, []byte(w.data))
	}
	valid[string(base)] = true
	full := string(cur)
	sawBase, sawFull := false, false
	for seed := range uint64(300) {
		m := NewMemFS(seed)
		f := mustWrite(t, m, "/f", base, true)
		m.SyncDir("/")
		for _, w := range writes {
			if _, err := f.WriteAt([]byte(w.data), w.off); err != nil {
				t.Fatal(err)
			}
		}
		m.Crash(TearUnsynced)
		got, ok := content(t, m, "/f")
		if !ok || !valid[got] {
			t.Fatalf("seed %d: torn content %q is no prefix of the writes", seed, got)
		}
		sawBase = sawBase || got == string(base)
		sawFull = sawFull || got == full
	}
	if !sawBase || !sawFull {
		t.Fatalf("tearing never kept nothing (%v) or never kept everything (%v) in 300 seeds", sawBase, sawFull)
	}
}

func TestMemTearNeverResurrectsUnsyncedEntries(t *testing.T) {
	for seed := range uint64(50) {
		m := NewMemFS(seed)
		mustWrite(t, m, "/f", []byte("x"), false).Close()
		m.Crash(TearUnsynced)
		if _, ok := content(t, m, "/f"); ok {
			t.Fatalf("seed %d: tearing kept an unsynced entry", seed)
		}
	}
}

func TestMemCrashTwiceAndHardLinkLikeRename(t *testing.T) {
	// A synced name renamed and synced, crash, then the old state is gone
	// for good: a second crash changes nothing.
	m := NewMemFS(3)
	mustWrite(t, m, "/a", []byte("1"), true).Close()
	m.SyncDir("/")
	m.Rename("/a", "/b")
	m.SyncDir("/")
	m.Crash(TearUnsynced)
	m.Crash(TearUnsynced)
	if _, ok := content(t, m, "/a"); ok {
		t.Fatal("/a came back")
	}
	if got, _ := content(t, m, "/b"); got != "1" {
		t.Fatalf("/b = %q", got)
	}
}

// TestBehavesLikeOS runs the same non-crash script on the OS and on a
// MemFS and compares every answer, so the oracle is a faithful model.
func TestBehavesLikeOS(t *testing.T) {
	run := func(fsys FS, root string) []string {
		var out []string
		note := func(format string, a ...any) { out = append(out, fmt.Sprintf(format, a...)) }
		errKind := func(err error) string {
			switch {
			case err == nil:
				return "ok"
			case errors.Is(err, fs.ErrNotExist):
				return "notexist"
			case errors.Is(err, fs.ErrExist):
				return "exist"
			default:
				return "error"
			}
		}
		p := func(s string) string { return filepath.Join(root, s) }
		note("mkdir %s", errKind(fsys.MkdirAll(p("d/e"), 0o700)))
		f, err := fsys.Create(p("d/f"), 0o600)
		note("create %s", errKind(err))
		f.Write([]byte("hello"))
		f.WriteAt([]byte("XY"), 8)
		fi, _ := f.Stat()
		note("size %d", fi.Size())
		buf := make([]byte, 20)
		n, err := f.ReadAt(buf, 0)
		note("readat %d %q %v", n, buf[:n], err == io.EOF)
		f.Truncate(3)
		f.Close()
		_, err = fsys.OpenFile(p("d/f"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		note("excl %s", errKind(err))
		_, err = fsys.Open(p("d/nope"))
		note("open missing %s", errKind(err))
		g, _ := fsys.OpenFile(p("d/f"), os.O_WRONLY|os.O_APPEND, 0)
		g.Write([]byte("++"))
		g.Close()
		b, _ := ReadFile(fsys, p("d/f"))
		note("content %q", b)
		note("rename %s", errKind(fsys.Rename(p("d/f"), p("d/e/g"))))
		names, _ := fsys.ReadDir(p("d"))
		note("readdir d %v", names)
		names, _ = fsys.ReadDir(p("d/e"))
		note("readdir e %v", names)
		note("remove nonempty %s", errKind(fsys.Remove(p("d/e"))))
		note("remove missing %s", errKind(fsys.Remove(p("d/zz"))))
		note("chmod %s", errKind(fsys.Chmod(p("d/e/g"), 0o640)))
		fi, err = fsys.Stat(p("d/e/g"))
		note("stat %s %v %v", errKind(err), fi.Mode().Perm(), fi.IsDir())
		note("syncdir %s", errKind(fsys.SyncDir(p("d"))))
		note("remove %s", errKind(fsys.Remove(p("d/e/g"))))
		note("remove dir %s", errKind(fsys.Remove(p("d/e"))))
		_, err = fsys.Stat(p("d/e"))
		note("stat removed %s", errKind(err))
		return out
	}
	osOut := run(Default, t.TempDir())
	memOut := run(NewMemFS(1), "/root")
	if !slices.Equal(osOut, memOut) {
		t.Fatalf("MemFS differs from the OS:\nos:  %q\nmem: %q", osOut, memOut)
	}
}

func TestMemHandleAfterCloseAndModes(t *testing.T) {
	m := NewMemFS(1)
	f := mustWrite(t, m, "/f", []byte("x"), false)
	f.Close()
	if _, err := f.Write([]byte("y")); !errors.Is(err, fs.ErrClosed) {
		t.Fatalf("write after close: %v", err)
	}
	r, _ := m.Open("/f")
	if _, err := r.Write([]byte("y")); err == nil {
		t.Fatal("wrote through a read-only handle")
	}
	var got bytes.Buffer
	io.Copy(&got, r)
	if got.String() != "x" {
		t.Fatalf("read %q", got.String())
	}
}

// MemFS is used from several goroutines at once (a disk's worker, the
// receiving goroutine, a test's crash): run them together under -race,
// and check that after the crash only synced content is left.
func TestMemConcurrentUseAndCrash(t *testing.T) {
	m := NewMemFS(9)
	MkdirAllSync(m, "/d", 0o700)
	done := make(chan struct{})
	errs := make(chan error, 4)
	var ready sync.WaitGroup
	ready.Add(4)
	for w := range 4 {
		go func() {
			name := fmt.Sprintf("/d/f%d", w)
			f, err := m.Create(name, 0o600)
			if err != nil {
				ready.Done()
				errs <- err
				return
			}
			m.SyncDir("/d")
			f.WriteAt([]byte("synced"), 0)
			err = f.Sync()
			ready.Done()
			if err != nil {
				errs <- err
				return
			}
			for i := 0; ; i++ {
				select {
				case <-done:
					errs <- nil
					return
				default:
				}
				if _, err := f.WriteAt([]byte("UNSYNC"), 0); err != nil {
					// The crash killed the handle: the only error allowed.
					if !errors.Is(err, ErrCrashed) {
						errs <- err
						return
					}
					<-done
					errs <- nil
					return
				}
				m.Stat(name)
				m.ReadDir("/d")
			}
		}()
	}
	ready.Wait()
	// Let the writers run, then crash under them.
	for range 1000 {
		m.ReadDir("/d")
	}
	m.Crash(DropUnsynced)
	close(done)
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	for w := range 4 {
		if got, _ := content(t, m, fmt.Sprintf("/d/f%d", w)); got != "synced" {
			t.Fatalf("f%d after the crash: %q", w, got)
		}
	}
}
