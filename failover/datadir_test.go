package failover

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tandemvm/tandem/internal/failpoint"
	"github.com/tandemvm/tandem/internal/vfs"
)

// A torn or corrupt identity file is refused in one line naming it, and
// nothing in the directory changes.
func TestDataDirCorruptIdentityFile(t *testing.T) {
	for name, content := range map[string]string{
		"empty (torn)":  "",
		"zeros (torn)":  "\x00\x00\x00\x00",
		"binary junk":   "\xff\xfe\x01c1",
		"only newlines": "\n\n",
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			d, err := openDataDir(dir, "c1", "n1")
			if err != nil {
				t.Fatal(err)
			}
			d.close()
			p := filepath.Join(dir, clusterIDFile)
			if err := os.WriteFile(p, []byte(content), 0o640); err != nil {
				t.Fatal(err)
			}
			before := listDir(t, dir)
			_, err = openDataDir(dir, "c1", "n1")
			if !errors.Is(err, ErrCorruptDataDir) {
				t.Fatalf("open with a corrupt %s: %v, want ErrCorruptDataDir", clusterIDFile, err)
			}
			if msg := err.Error(); !strings.Contains(msg, p) || strings.Contains(msg, "\n") {
				t.Fatalf("the refusal must be one line naming %s: %q", p, msg)
			}
			b, _ := os.ReadFile(p)
			if string(b) != content || listDir(t, dir) != before {
				t.Fatal("a refused open changed the data dir")
			}
		})
	}
}

func listDir(t *testing.T, dir string) string {
	t.Helper()
	names, err := vfs.Default.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(names, ",")
}

// A data dir that cannot be written is refused at start, naming it.
func TestDataDirUnwritableRefusedAtStart(t *testing.T) {
	dir := t.TempDir()
	x := vfs.NewInject(vfs.Default)
	x.Add(vfs.Rule{Op: vfs.OpCreate, Path: writeProbe, Err: os.ErrPermission})
	_, err := openDataDirFS(x, dir, "c1", "n1")
	if err == nil || !errors.Is(err, os.ErrPermission) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("unwritable data dir: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, clusterIDFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("identity written into a data dir refused as unwritable")
	}
	if os.Getuid() != 0 {
		ro := t.TempDir()
		os.Chmod(ro, 0o500)
		defer os.Chmod(ro, 0o700)
		if _, err := openDataDir(ro, "c1", "n1"); err == nil {
			t.Fatal("a read-only data dir was accepted")
		}
	}
}

// The identity files are published durably: after a crash of a MemFS
// right after openDataDirFS returned, they are there whole.
func TestDataDirIdentityDurable(t *testing.T) {
	m := vfs.NewMemFS(7)
	dir := t.TempDir() // the flock file lives on the real FS
	d, err := openDataDirFS(m, dir, "c1", "n1")
	if err != nil {
		t.Fatal(err)
	}
	d.close()
	m.Crash(vfs.TearUnsynced)
	for file, want := range map[string]string{clusterIDFile: "c1\n", nodeIDFile: "n1\n"} {
		b, err := vfs.ReadFile(m, filepath.Join(dir, file))
		if err != nil || string(b) != want {
			t.Fatalf("%s after a crash: %q %v", file, b, err)
		}
	}
	// Fault on the directory sync of the publish is reported, not ignored.
	m2 := vfs.NewMemFS(1)
	x := vfs.NewInject(m2)
	x.Add(vfs.Rule{Op: vfs.OpSyncDir})
	if _, err := openDataDirFS(x, t.TempDir(), "c1", "n1"); err == nil {
		t.Fatal("a failed directory fsync was ignored")
	}
}

// A data dir whose host loses power at any step of publishing an
// identity file opens again afterwards: the file is whole or absent (and
// then written again), never torn. raft.db is raft-boltdb's and not
// swept here.
func TestDataDirCrashAtEveryPublishPoint(t *testing.T) {
	points := failpoint.Names("vfs.publish.")
	if len(points) == 0 {
		t.Fatal("no publish failpoints")
	}
	for _, name := range points {
		for hit := 1; hit <= 2; hit++ { // cluster-id, then node-id
			m := vfs.NewMemFS(uint64(hit))
			dir := t.TempDir() // the flock file lives on the real FS
			p, _ := failpoint.Lookup(name)
			n := 0
			disable := p.Enable(func() error {
				if n++; n != hit {
					return nil
				}
				m.Crash(vfs.TearUnsynced)
				return errors.New("power loss")
			})
			_, err := openDataDirFS(m, dir, "c1", "n1")
			disable()
			if err == nil {
				t.Fatalf("%s hit %d: the crash was not reported", name, hit)
			}
			d, err := openDataDirFS(m, dir, "c1", "n1")
			if err != nil {
				t.Fatalf("%s hit %d: reopen after the crash: %v", name, hit, err)
			}
			d.close()
			for file, want := range map[string]string{clusterIDFile: "c1\n", nodeIDFile: "n1\n"} {
				if b, err := vfs.ReadFile(m, filepath.Join(dir, file)); err != nil || string(b) != want {
					t.Fatalf("%s hit %d: %s = %q, %v", name, hit, file, b, err)
				}
			}
		}
	}
}
