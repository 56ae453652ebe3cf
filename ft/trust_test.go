package ft

import (
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

func TestSnapshotPath(t *testing.T) {
	if _, err := snapshotPath("", "ok.tnd"); err != errNoSnapshotDir {
		t.Errorf("no dir: %v", err)
	}
	for _, bad := range []string{"", "/tmp/y", "../y", "a/b", "..", ".", "x\x00y"} {
		if p, err := snapshotPath("/srv/snaps", bad); err == nil {
			t.Errorf("name %q accepted as %s", bad, p)
		}
	}
	if p, err := snapshotPath("/srv/snaps", "ok.tnd"); err != nil || p != "/srv/snaps/ok.tnd" {
		t.Errorf("ok.tnd: %q %v", p, err)
	}
}

// POST /migrate to a file names no path: refused without --snapshot-dir
// and for any name with a directory in it, before anything is written.
func TestMigrateToFileRefusals(t *testing.T) {
	g, err := synth.New(guest.Config{Memory: 1 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	n := &Node{log: slog.New(slog.NewTextHandler(io.Discard, nil)), g: g, state: "running"}
	post := func(body string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		n.handleMigrate(rec, httptest.NewRequest("POST", "/migrate", strings.NewReader(body)))
		return rec
	}
	target := filepath.Join(t.TempDir(), "y")
	rec := post(`{"to":"file:` + target + `"}`)
	if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), "no --snapshot-dir") {
		t.Errorf("without --snapshot-dir: %d %s", rec.Code, rec.Body)
	}
	n.snapshotDir = t.TempDir()
	rec = post(`{"to":"file:` + target + `"}`)
	if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), "plain file name") {
		t.Errorf("a path: %d %s", rec.Code, rec.Body)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Errorf("%s exists after refused migrations: %v", target, err)
	}
	if n.migBusy {
		t.Error("a refused request left the guest reserved")
	}
}
