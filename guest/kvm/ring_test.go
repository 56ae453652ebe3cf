package kvm

import (
	"errors"
	"testing"

	"github.com/tandemvm/tandem/guest"
)

// callLog records every OrWords call, to check takePending's runs.
type callLog struct {
	wordLog
	calls int
}

func (c *callLog) OrWords(first uint64, words []uint64) uint64 {
	c.calls++
	return c.wordLog.OrWords(first, words)
}

// takePending (DirtyRing's sync of the pending bitmap) reports exactly the
// marked pages, in one call per run of adjacent words (split at the run
// buffer's capacity), drops the 32-bit hole, and leaves nothing behind.
func TestTakePending(t *testing.T) {
	g := &Guest{cfg: guest.Config{Memory: 8 << 30}}
	top := topGPA(g.cfg.Memory)
	g.vmmDirty = make([]uint64, (top>>guest.PageShift+63)/64)
	g.vmmSummary = make([]uint64, (len(g.vmmDirty)+63)/64)
	g.ringBuf = make([]uint64, 0, 512)

	want := map[uint64]bool{}
	mark := func(first, n uint64) {
		g.MarkDirty(first, n)
		for p := first; p < first+n; p++ {
			want[p] = true
		}
	}
	mark(3, 1)               // one page
	mark(64*10+5, 64*600)    // 601 adjacent words: two runs (buffer of 512)
	g.markPage(64*5000 + 63) // a ring page, alone
	want[64*5000+63] = true
	mark(highRAMBase>>guest.PageShift, 2) // first pages above the hole
	hole := uint64(lowRAMEnd>>guest.PageShift) + 100
	g.MarkDirty(hole, 1) // not RAM: dropped

	log := &callLog{wordLog: *newWordLog()}
	n := g.takePending(log)
	if n != uint64(len(want)) {
		t.Fatalf("takePending reported %d pages, want %d", n, len(want))
	}
	for p := range want {
		if !log.has(p) {
			t.Fatalf("page %d missing", p)
		}
	}
	if log.has(hole) {
		t.Fatal("a page in the 32-bit hole was reported")
	}
	if log.calls != 5 {
		t.Fatalf("%d OrWords calls, want 5 (one per run)", log.calls)
	}
	again := &callLog{wordLog: *newWordLog()}
	if n := g.takePending(again); n != 0 || again.calls != 0 {
		t.Fatalf("second take reported %d pages in %d calls", n, again.calls)
	}
}

// Ring sizes the kernel cannot take are refused before any vCPU exists.
func TestDirtyRingBadSize(t *testing.T) {
	skipWithoutKVM(t)
	for _, n := range []int{100, 32, 1 << 20} {
		_, err := NewWithOptions(kvConfig(64<<20, 1), Options{DirtyMethod: DirtyRing, DirtyRingEntries: n})
		if !errors.Is(err, guest.ErrConfig) {
			t.Errorf("%d entries: got %v, want ErrConfig", n, err)
		}
	}
}

func TestParseDirtyMethod(t *testing.T) {
	for s, want := range map[string]DirtyMethod{"get": DirtyGetLog, "clear": DirtyManualClear, "ring": DirtyRing} {
		if m, err := ParseDirtyMethod(s); err != nil || m != want {
			t.Errorf("%q: %v, %v", s, m, err)
		}
	}
	if _, err := ParseDirtyMethod("rings"); err == nil {
		t.Error("rings accepted")
	}
}
