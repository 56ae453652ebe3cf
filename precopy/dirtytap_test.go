package precopy

import (
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// scriptedLog is a guest whose dirty log holds the pages a test put there
// (marked), cleared by each read; reads counts them.
type scriptedLog struct {
	guest.Guest
	marked []uint64
	reads  int
}

func (s *scriptedLog) SyncDirty(dst guest.DirtyLog) (uint64, error) {
	s.reads++
	var n uint64
	for _, p := range s.marked {
		w := make([]uint64, 1)
		w[0] = 1 << (p % 64)
		n += dst.OrWords(p-p%64, w)
	}
	s.marked = nil
	return n, nil
}

// TestDirtyTapSharesTheLog: the owner's syncs read the guest's log and
// feed the tap; the other Core's syncs take from the tap and never read
// the log, whose reads would clear pages the owner needs.
func TestDirtyTapSharesTheLog(t *testing.T) {
	sg, err := synth.New(guest.Config{Memory: 1 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer sg.Close()
	g := &scriptedLog{Guest: sg}
	owner, other := NewCore(g, nil), NewCore(g, nil)
	tap := NewDirtyTap(owner.Dirty.Len())
	owner.SetTap(tap)
	other.From = tap

	g.marked = []uint64{3, 70, 200}
	if _, err := other.Sync(); err != nil || other.Dirty.Count() != 0 || g.reads != 0 {
		t.Fatalf("the other Core's sync before the owner's: err %v, %d pages, %d log reads: want nothing, no read", err, other.Dirty.Count(), g.reads)
	}
	if _, err := owner.Sync(); err != nil {
		t.Fatal(err)
	}
	owner.Dirty.TestAndClear(70) // the owner captured and sent one
	n, err := other.Sync()
	if err != nil || n != 3 || !other.Dirty.Test(3) || !other.Dirty.Test(70) || !other.Dirty.Test(200) {
		t.Fatalf("the other Core's sync: %d new (err %v), want pages 3, 70 and 200", n, err)
	}
	if n, _ := other.Sync(); n != 0 || g.reads != 1 {
		t.Errorf("a second take: %d new, %d log reads: want none new, the log read once (by the owner)", n, g.reads)
	}
	// The owner's pending pages come again with its next sync: a
	// superset costs only pages sent twice.
	g.marked = []uint64{5}
	owner.Sync()
	other.Dirty.Clear()
	other.Sync()
	if !other.Dirty.Test(5) || !other.Dirty.Test(3) || other.Dirty.Test(70) {
		t.Errorf("after the owner's next sync: pages 3 %v, 5 %v, 70 %v: want the new page and the owner's pending ones", other.Dirty.Test(3), other.Dirty.Test(5), other.Dirty.Test(70))
	}
	owner.SetTap(nil)
	g.marked = []uint64{9}
	owner.Sync()
	if n, _ := other.Sync(); n != 0 {
		t.Errorf("after SetTap(nil): %d pages reached the tap", n)
	}
}

// lazyLog is a scriptedLog that can defer write protection
// (guest.LazyDirtyLog), counting the calls that would touch the log.
type lazyLog struct {
	scriptedLog
	discards, tracks int
}

func (l *lazyLog) DiscardDirty() (bool, error)      { l.discards++; return true, nil }
func (l *lazyLog) TrackDirty(first, n uint64) error { l.tracks++; return nil }

// TestMigrationFromTapLeavesTheLogAlone: a migration whose Core takes from
// an epoch loop's tap (a protected guest's move) never drops or clears
// the guest's dirty log at its set-up, even where the guest could
// write-protect lazily: that would take writes the loop has not synced
// from its secondary. Without a tap the same guest is set up lazily.
func TestMigrationFromTapLeavesTheLogAlone(t *testing.T) {
	sg, err := synth.New(guest.Config{Memory: 1 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer sg.Close()
	for _, tapped := range []bool{true, false} {
		g := &lazyLog{scriptedLog: scriptedLog{Guest: sg}}
		core := NewCore(g, nil)
		if tapped {
			core.From = NewDirtyTap(core.Dirty.Len())
		}
		m, err := NewMigration(core, nil, Policy{})
		if err != nil {
			t.Fatal(err)
		}
		if err := m.setUp(time.Now()); err != nil {
			t.Fatal(err)
		}
		switch {
		case tapped && (g.discards != 0 || g.reads != 0 || m.send.Lazy != nil):
			t.Errorf("from a tap: %d discards, %d log reads, lazy %v: want the log untouched", g.discards, g.reads, m.send.Lazy != nil)
		case !tapped && (g.discards != 1 || m.send.Lazy == nil):
			t.Errorf("without a tap: %d discards, lazy %v: want the lazy set-up", g.discards, m.send.Lazy != nil)
		}
	}
}
