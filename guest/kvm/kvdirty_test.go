package kvm

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// A kv guest with a dirty rate: vCPU 1 dirties the top --touch bytes of
// memory while vCPU 0 serves; the table lives below, so every key written
// before the dirtying reads back unchanged after it, and the pages the
// dirtying wrote are all in the top range.
func TestKVWithDirtyingVCPU(t *testing.T) {
	skipWithoutKVM(t)
	const mem, touch = 64 << 20, 16 << 20
	cfg := kvConfig(mem, 2)
	cfg.Workload.DirtyRate, cfg.Workload.Touch, cfg.Workload.Pattern, cfg.Workload.Seed = 20000, touch, guest.PatternRandom, 1
	g, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	lr := newLineReader()
	g.Console().SetOutput(lr.sink)
	mustResume(t, g)
	const keys = 300
	for i := range keys {
		expect(t, ask(t, g, lr, fmt.Sprintf("c:%d SET k%d v%d", i+1, i, i)), fmt.Sprintf("c:%d OK", i+1))
	}
	waitProgress(t, g, 1) // the touch of the top range is done
	deadline := time.Now().Add(10 * time.Second)
	for w0 := g.PageWrites(); g.PageWrites() < w0+2000; {
		if time.Now().After(deadline) {
			t.Fatalf("page writes %d after 10 s, want 2,000 more than %d", g.PageWrites(), w0)
		}
		time.Sleep(5 * time.Millisecond)
	}
	mustPause(t, g)
	if _, err := g.SyncDirty(newWordLog()); err != nil { // the touch, the table and the dirtying so far
		t.Fatal(err)
	}
	mustResume(t, g)
	time.Sleep(100 * time.Millisecond) // dirtying only: no requests
	mustPause(t, g)
	log := newWordLog()
	if _, err := g.SyncDirty(log); err != nil {
		t.Fatal(err)
	}
	top := uint64(mem-touch) >> guest.PageShift
	var in, below int
	for p := range uint64(mem >> guest.PageShift) {
		switch {
		case !log.has(p):
		case p >= top:
			in++
		case p >= uint64(dataGPA)>>guest.PageShift:
			below++
		}
	}
	if in < 500 || below != 0 {
		t.Fatalf("dirty pages in 100 ms without requests: %d in the top %d MiB (want >= 500), %d in the table's range (want 0)", in, touch>>20, below)
	}
	mustResume(t, g)
	for i := range keys {
		expect(t, ask(t, g, lr, fmt.Sprintf("c:%d GET k%d", keys+i+1, i)), fmt.Sprintf("c:%d OK v%d", keys+i+1, i))
	}
	if err := g.Err(); err != nil {
		t.Fatal(err)
	}
}

// TestKVDirtyTouchBounded: a kv guest's dirtied top range is at most half
// of the micro-guest's data range (memory above dataGPA), which is less
// than half of --memory: asked for more, New refuses in one line naming
// --touch instead of dirtying less than asked (the synth guest takes up
// to half of --memory). Checked before anything is set up.
func TestKVDirtyTouchBounded(t *testing.T) {
	cfg := guest.Config{Memory: 64 << 20, VCPUs: 2, Workload: guest.Workload{Kind: guest.WorkloadKV, DirtyRate: 1000, Touch: 32 << 20, Pattern: guest.PatternRandom}}
	_, err := New(cfg)
	if err == nil || !errors.Is(err, guest.ErrConfig) || !strings.Contains(err.Error(), "--touch 32MiB") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("New with --touch 32MiB of 64MiB: %v, want a one-line --touch refusal", err)
	}
}
