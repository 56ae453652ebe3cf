package fsperm

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPrivateDirCreatesAndTightens(t *testing.T) {
	base := t.TempDir()
	d := filepath.Join(base, "a", "b")
	if err := PrivateDir(d, nil); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(d); fi.Mode().Perm() != 0o700 {
		t.Fatalf("new dir mode %v, want 0700", fi.Mode().Perm())
	}
	loose := filepath.Join(base, "loose")
	os.Mkdir(loose, 0o755)
	os.Chmod(loose, 0o755)
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	if err := PrivateDir(loose, log); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(loose); fi.Mode().Perm() != 0o700 {
		t.Fatalf("tightened dir mode %v, want 0700", fi.Mode().Perm())
	}
	if !strings.Contains(buf.String(), "tightened") {
		t.Fatalf("no log line for the tightened dir: %q", buf.String())
	}
	buf.Reset()
	PrivateDir(loose, log)
	if buf.Len() != 0 {
		t.Fatalf("a private dir was logged again: %q", buf.String())
	}
}

func TestPrivateFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := PrivateFile(p, nil); err != nil {
		t.Fatalf("missing file: %v", err)
	}
	os.WriteFile(p, []byte("x"), 0o644)
	os.Chmod(p, 0o644)
	if err := PrivateFile(p, nil); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", fi.Mode().Perm())
	}
	if err := PrivateFile(filepath.Dir(p), nil); err == nil {
		t.Fatal("a directory passed as a file was accepted")
	}
}
