package ft

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/guest/synth"
)

// TestStallWriteNamedInSlowList: with --allow-faults, POST
// /debug/stall-write makes the guest's next disk write take 400 ms under
// a dirtying workload, and /debug/slow names the disk write with its
// whole length; without --allow-faults it is refused (403).
func TestStallWriteNamedInSlowList(t *testing.T) {
	kinds := []string{synth.Kind}
	if kvm.Available() == nil {
		if _, err := kvm.DefaultImage(); err == nil {
			kinds = append(kinds, kvm.Kind)
		}
	}
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Disk: filepath.Join(t.TempDir(), "disk.img"),
				Workload: guest.Workload{Kind: guest.WorkloadDirty, Touch: 4 << 20, DirtyRate: 20000, Pattern: guest.PatternSeq}}
			g, err := BootGuest(kind, cfg, kvm.DirtyGetLog)
			if err != nil {
				t.Fatal(err)
			}
			n, err := NewNode(NodeConfig{Role: "run", APIAddr: "127.0.0.1:0", ConsoleAddr: "127.0.0.1:0", Log: quietLog(), AllowFaults: true})
			if err != nil {
				g.Close()
				t.Fatal(err)
			}
			n.Start()
			defer n.Close()
			n.Attach(g, cfg)
			n.SetState("running")
			if _, err := g.Resume(); err != nil {
				t.Fatal(err)
			}
			c := api.NewClient(n.APIAddr(), nil, 5*time.Second)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := c.Post(ctx, "/debug/stall-write", map[string]int{"duration_ms": 400}, nil); err != nil {
				t.Fatal(err)
			}
			for {
				slow, err := c.Slow(ctx)
				if err != nil {
					t.Fatal(err)
				}
				for _, s := range slow {
					if s.Name == "device disk.write" {
						if s.Duration < 400*time.Millisecond {
							t.Fatalf("slow disk write of %v, want >= 400ms", s.Duration)
						}
						t.Logf("slow list: %s %.1f ms", s.Name, s.Millis)
						return
					}
				}
				select {
				case <-ctx.Done():
					t.Fatalf("no slow disk write in the slow list: %+v", slow)
				case <-time.After(50 * time.Millisecond):
				}
			}
		})
	}
}

func TestStallWriteNeedsAllowFaults(t *testing.T) {
	n := &Node{}
	rec := httptest.NewRecorder()
	n.handleStallWrite(rec, httptest.NewRequest("POST", "/debug/stall-write", strings.NewReader(`{"duration_ms":10}`)))
	if rec.Code != http.StatusForbidden || !strings.Contains(rec.Body.String(), "--allow-faults") {
		t.Fatalf("without --allow-faults: %d %s", rec.Code, rec.Body)
	}
	n.allowFaults = true
	rec = httptest.NewRecorder()
	n.handleStallWrite(rec, httptest.NewRequest("POST", "/debug/stall-write", strings.NewReader(`{"duration_ms":0}`)))
	if rec.Code != http.StatusBadRequest {
		t.Fatalf("zero duration: %d %s", rec.Code, rec.Body)
	}
}
