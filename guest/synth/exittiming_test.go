package synth

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/timing"
)

// TestExitTimingNamesHandlers: the synth guest times its console output,
// its disk submissions, its waits for input and its vCPUs' waits while
// paused under the KVM backend's names.
func TestExitTimingNamesHandlers(t *testing.T) {
	g, err := New(guest.Config{Memory: 4 << 20, VCPUs: 1, Disk: filepath.Join(t.TempDir(), "disk.img"),
		Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	e := g.TimeExits(timing.New(nil, slog.New(slog.NewTextHandler(io.Discard, nil)), time.Second))
	replies := make(chan string, 64)
	g.Console().SetOutput(func(p []byte) { replies <- string(p) })
	if _, err := g.Resume(); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 20; i++ {
		if err := g.Console().Input([]byte(fmt.Sprintf("c:%d SET k%d v\n", i, i))); err != nil {
			t.Fatal(err)
		}
		select {
		case <-replies:
		case <-time.After(5 * time.Second):
			t.Fatalf("no reply to request %d", i)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := g.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Resume(); err != nil {
		t.Fatal(err)
	}
	// A parked vCPU's wait is recorded when it runs again: give it a
	// moment after the resume.
	counts := map[string]uint64{}
	for deadline := time.Now().Add(5 * time.Second); counts["pause park"] == 0 && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		for _, s := range e.Stats() {
			counts[s.Reason+" "+s.Name] = s.Count
		}
	}
	if counts["io console.bulk-tx"] < 20 {
		t.Errorf("console output timed %d times for 20 replies: %v", counts["io console.bulk-tx"], counts)
	}
	if counts["io idle"] == 0 {
		t.Errorf("no input wait timed: %v", counts)
	}
	if counts["pause park"] == 0 {
		t.Errorf("no pause wait timed: %v", counts)
	}
}
