package replica

import (
	"context"
	"strings"
	"testing"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/vfs"
)

// A snapshot file is analysed with its handshake line; a bad handshake
// line is an error with nothing to print.
func TestAnalyzeSnapshot(t *testing.T) {
	cfg := guest.Config{Memory: 4 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	src, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	st, err := src.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	m := vfs.NewMemFS(1)
	vfs.MkdirAllSync(m, "/snap", 0o700)
	l, err := CreateFileLinkFS(m, "/snap/s.tnd", Hello{Proto: ProtoVersion, Kind: synth.Kind, Config: cfg, Build: "test"}, src.Regions(), checkpoint.Options{})
	if err != nil {
		t.Fatal(err)
	}
	w := l.Writer()
	if err := w.WriteDevices(st); err != nil {
		t.Fatal(err)
	}
	if _, err := w.EndEpoch(1); err != nil {
		t.Fatal(err)
	}
	if _, err := l.WaitAck(context.Background(), 1, true); err != nil {
		t.Fatal(err)
	}
	f, err := m.Open("/snap/s.tnd")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	a, err := Analyze(f)
	if err != nil || a == nil || a.Snapshot["guest_kind"] != synth.Kind {
		t.Fatalf("Analyze: %+v, %v", a, err)
	}
	var b strings.Builder
	if err := a.WriteText(&b); err != nil || !strings.HasPrefix(b.String(), "snapshot of a synth guest, memory 4MiB, 1 vCPUs, workload kv\n") {
		t.Fatalf("text (%v):\n%s", err, b.String())
	}
	if a, err := Analyze(strings.NewReader("{not json\n")); a != nil || err == nil || !strings.Contains(err.Error(), "snapshot handshake line") {
		t.Fatalf("bad handshake: %+v, %v", a, err)
	}
}
