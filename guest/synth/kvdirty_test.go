package synth

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
	const mem, touch = 64 << 20, 16 << 20
	cfg := kvConfig()
	cfg.Workload.DirtyRate, cfg.Workload.Touch, cfg.Workload.Pattern, cfg.Workload.Seed = 20000, touch, guest.PatternRandom, 1
	g, out := startKV(t, cfg)
	if end := g.kv.l.kvOff + g.kv.l.kvSlots*slotSize; end > mem-touch {
		t.Fatalf("kv table ends at %d, past the dirtied range's start %d", end, mem-touch)
	}
	const keys = 300
	var sets, wantSets []string
	for i := range keys {
		sets = append(sets, fmt.Sprintf("c:%d SET k%d v%d", i+1, i, i))
		wantSets = append(wantSets, fmt.Sprintf("c:%d OK", i+1))
	}
	if got := exchange(t, g, out, sets...); strings.Join(got, "\n") != strings.Join(wantSets, "\n") {
		t.Fatalf("SETs answered %q", got)
	}
	deadline := time.Now().Add(10 * time.Second)
	for g.PageWrites() < 2000 {
		if time.Now().After(deadline) {
			t.Fatalf("page writes %d after 10 s, want 2,000", g.PageWrites())
		}
		time.Sleep(5 * time.Millisecond)
	}
	pages := uint64(mem >> guest.PageShift)
	mustPause(t, g)
	g.SyncDirty(newBitmap(pages)) // the touch, the table and the dirtying so far
	mustResume(t, g)
	time.Sleep(100 * time.Millisecond) // dirtying only: no requests
	mustPause(t, g)
	log := newBitmap(pages)
	g.SyncDirty(log)
	top := uint64(mem-touch) >> guest.PageShift
	var in, below int
	for p := range pages {
		switch {
		case !log.has(p):
		case p >= top:
			in++
		default:
			below++
		}
	}
	if in < 500 || below != 0 {
		t.Fatalf("dirty pages in 100 ms without requests: %d in the top %d MiB (want >= 500), %d below (want 0)", in, touch>>20, below)
	}
	mustResume(t, g)
	var gets, wantGets []string
	for i := range keys {
		gets = append(gets, fmt.Sprintf("c:%d GET k%d", keys+i+1, i))
		wantGets = append(wantGets, fmt.Sprintf("c:%d OK v%d", keys+i+1, i))
	}
	if got := exchange(t, g, out, gets...); strings.Join(got, "\n") != strings.Join(wantGets, "\n") {
		t.Fatalf("GETs after the dirtying answered %q", got)
	}
}

// The kv workload's dirty rate needs a second vCPU and at most half the
// memory; without a rate the kv guest ignores --touch, as before.
func TestKVDirtyConfig(t *testing.T) {
	for _, c := range []struct {
		vcpus        int
		touch, rate  uint64
		want         string // "" valid
		dirtiedBytes uint64
	}{
		{1, 16 << 20, 0, "", 0},
		{2, 16 << 20, 1000, "", 16 << 20},
		{4, 32 << 20, 1000, "", 32 << 20},
		{1, 16 << 20, 1000, "needs --vcpus 2 or more", 0},
		{2, 33 << 20, 1000, "at most half of --memory 64MiB", 0},
		{2, 0, 1000, "needs --touch of at least 4KiB", 0},
	} {
		cfg := kvConfig()
		cfg.VCPUs, cfg.Workload.Touch, cfg.Workload.DirtyRate, cfg.Workload.Pattern = c.vcpus, c.touch, c.rate, guest.PatternRandom
		err := cfg.Validate()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%+v: %v", c, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, guest.ErrConfig)):
			t.Errorf("%+v: %v, want ErrConfig saying %q", c, err, c.want)
		case c.want == "" && cfg.KVDirtyBytes() != c.dirtiedBytes:
			t.Errorf("%+v: KVDirtyBytes %d, want %d", c, cfg.KVDirtyBytes(), c.dirtiedBytes)
		}
	}
}
