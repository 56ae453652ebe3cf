package vfs

import (
	"errors"
	"io"
	"testing"

	"github.com/tandemvm/tandem/internal/failpoint"
)

func TestWriteFileAtomicDurableOnReturn(t *testing.T) {
	m := NewMemFS(1)
	if err := MkdirAllSync(m, "/d", 0o700); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(m, "/d/f", []byte("v1"), 0o600); err != nil {
		t.Fatal(err)
	}
	if !m.Durable("/d/f") {
		t.Fatal("published file is not durable")
	}
	m.Crash(TearUnsynced)
	if got, _ := content(t, m, "/d/f"); got != "v1" {
		t.Fatalf("after crash %q", got)
	}
	if names, _ := m.ReadDir("/d"); len(names) != 1 {
		t.Fatalf("leftovers: %v", names)
	}
}

// TestWriteFileAtomicCrashAtEveryPoint crashes at each failpoint of the
// publish (and tears what was unsynced) and checks the file is the old
// one or the whole new one, never anything else, and the new one from
// the point the directory sync returned.
func TestWriteFileAtomicCrashAtEveryPoint(t *testing.T) {
	points := failpoint.Names("vfs.publish.")
	if len(points) != 4 {
		t.Fatalf("publish failpoints %v, want 4", points)
	}
	for _, name := range points {
		for seed := range uint64(20) {
			m := NewMemFS(seed)
			MkdirAllSync(m, "/d", 0o700)
			if err := WriteFile(m, "/d/f", []byte("old-content"), 0o600); err != nil {
				t.Fatal(err)
			}
			p, _ := failpoint.Lookup(name)
			disable := p.Enable(func() error { m.Crash(TearUnsynced); return errors.New("crash") })
			err := WriteFile(m, "/d/f", []byte("new-content-longer"), 0o600)
			disable()
			if !errors.Is(err, failpoint.ErrInjected) {
				t.Fatalf("%s: WriteFile returned %v, want the injected crash", name, err)
			}
			got, ok := content(t, m, "/d/f")
			switch {
			case !ok:
				t.Fatalf("%s seed %d: the file is gone", name, seed)
			case name == "vfs.publish.after-syncdir" && got != "new-content-longer":
				t.Fatalf("%s seed %d: %q after the directory sync returned", name, seed, got)
			case got != "old-content" && got != "new-content-longer":
				t.Fatalf("%s seed %d: torn file %q", name, seed, got)
			}
		}
	}
}

func TestWriteFileAtomicReportsEveryStep(t *testing.T) {
	for _, r := range []Rule{
		{Op: OpCreate, Path: ".f.tmp"},
		{Op: OpWrite, Path: ".f.tmp"},
		{Op: OpSync, Path: ".f.tmp"},
		{Op: OpRename, Path: "/d/f"},
		{Op: OpSyncDir, Path: "/d"},
	} {
		t.Run(string(r.Op), func(t *testing.T) {
			m := NewMemFS(1)
			MkdirAllSync(m, "/d", 0o700)
			WriteFile(m, "/d/f", []byte("old"), 0o600)
			x := NewInject(m)
			x.Add(r)
			err := WriteFile(x, "/d/f", []byte("new"), 0o600)
			if !errors.Is(err, ErrInjected) {
				t.Fatalf("error %v, want the injected fault", err)
			}
			got, _ := content(t, m, "/d/f")
			if r.Op == OpSyncDir {
				// Renamed already: the caller is told it may not be durable.
				if got != "new" {
					t.Fatalf("content %q", got)
				}
				return
			}
			if got != "old" {
				t.Fatalf("a failed publish changed the file: %q", got)
			}
			if names, _ := m.ReadDir("/d"); len(names) != 1 {
				t.Fatalf("temporary file left: %v", names)
			}
		})
	}
}

func TestInjectNthAndSticky(t *testing.T) {
	m := NewMemFS(1)
	x := NewInject(m)
	x.Add(Rule{Op: OpWrite, Path: "/a", Nth: 2})
	x.Add(Rule{Op: OpSync, Nth: 2, Sticky: true, Err: io.ErrShortWrite})
	f, _ := x.Create("/a", 0o600)
	g, _ := x.Create("/b", 0o600)
	var errs []bool
	for range 3 {
		_, err := f.Write([]byte("x"))
		errs = append(errs, err != nil)
		g.Write([]byte("y")) // another path: never counted
	}
	if errs[0] || !errs[1] || errs[2] {
		t.Fatalf("write failures %v, want only the 2nd", errs)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("1st sync: %v", err)
	}
	for i := range 3 {
		if err := g.Sync(); !errors.Is(err, io.ErrShortWrite) {
			t.Fatalf("sync %d after the 2nd: %v, want sticky failure", i+2, err)
		}
	}
	x.Reset()
	if err := f.Sync(); err != nil {
		t.Fatalf("after Reset: %v", err)
	}
	if got, _ := content(t, m, "/a"); got != "xx" {
		t.Fatalf("/a = %q: a failed write must not reach the file", got)
	}
}
