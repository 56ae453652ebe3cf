package replica

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/failpoint"
	"github.com/tandemvm/tandem/internal/vfs"
)

// A snapshot file's host loses power at every step of its publication:
// afterwards the name holds nothing or the whole snapshot (it restores),
// never a part; from the directory sync on, always the whole snapshot.
func TestFileLinkCrashAtEveryPublishPoint(t *testing.T) {
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
	page := make([]byte, guest.PageSize)
	for i := range page {
		page[i] = byte(i)
	}
	const path = "/snap/s.tnd"
	r := &Receiver{NewGuest: synthFactory, Build: "test", Timeout: 5 * time.Second}
	for _, name := range failpoint.Names("vfs.publish.") {
		for seed := range uint64(4) {
			m := vfs.NewMemFS(seed)
			vfs.MkdirAllSync(m, "/snap", 0o700)
			l, err := CreateFileLinkFS(m, path, Hello{Kind: synth.Kind, Config: cfg, Build: "test"}, src.Regions(), checkpoint.Options{})
			if err != nil {
				t.Fatal(err)
			}
			w := l.Writer()
			if err := w.WritePages([]checkpoint.Page{{Index: 3, Data: page}}); err != nil {
				t.Fatal(err)
			}
			if err := w.WriteDevices(st); err != nil {
				t.Fatal(err)
			}
			if _, err := w.EndEpoch(1); err != nil {
				t.Fatal(err)
			}
			p, _ := failpoint.Lookup(name)
			disable := p.Enable(func() error { m.Crash(vfs.TearUnsynced); return errors.New("power loss") })
			_, err = l.WaitAck(context.Background(), 1, true)
			disable()
			l.Abort()
			if !errors.Is(err, failpoint.ErrInjected) {
				t.Fatalf("%s: publish returned %v", name, err)
			}
			res, err := r.RestoreFileFS(m, path)
			switch {
			case err == nil:
				res.Guest.Close()
			case name == vfs.FPPublishAfterSyncDir.Name():
				t.Fatalf("%s seed %d: the snapshot is not whole after its directory sync: %v", name, seed, err)
			default:
				if _, serr := m.Stat(path); serr == nil {
					t.Fatalf("%s seed %d: a partial snapshot under the real name: %v", name, seed, err)
				}
			}
		}
	}
}
