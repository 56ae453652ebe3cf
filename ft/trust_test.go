package ft

import (
	"errors"
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
	"github.com/tandemvm/tandem/internal/trust"
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

func TestResolveTrust(t *testing.T) {
	nt, err := ResolveTrust(trust.Config{}, "--api", "127.0.0.1:1", "--data", "")
	if err != nil || nt.ID != nil || nt.TLSOn() {
		t.Fatalf("plaintext loopback: %+v, %v", nt, err)
	}
	if _, err := ResolveTrust(trust.Config{}, "--api", "127.0.0.1:1", "--data", "0.0.0.0:1"); !errors.Is(err, trust.ErrPlaintext) || !strings.Contains(err.Error(), "--data") {
		t.Fatalf("plaintext non-loopback: %v, want ErrPlaintext naming --data", err)
	}
	if nt, err := ResolveTrust(trust.Config{Insecure: true}, "--data", "0.0.0.0:1"); err != nil || !nt.Insecure {
		t.Fatalf("--insecure: %+v, %v", nt, err)
	}
}
