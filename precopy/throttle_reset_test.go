package precopy

import (
	"context"
	"io"
	"testing"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// throttleSpy records the throttles set on its guest.
type throttleSpy struct {
	*synth.Guest
	set []int
}

func (g *throttleSpy) SetThrottle(percent int) {
	g.set = append(g.set, percent)
	g.Guest.SetThrottle(percent)
}

// A migration that never throttled its guest leaves the throttle alone at
// its end (rev2: Run's deferred reset undid the throttle a protected
// guest's epoch loop had set, after a move that failed before its final
// epoch).
func TestMigrationLeavesAThrottleItDidNotSet(t *testing.T) {
	sg, err := synth.New(guest.Config{Memory: 1 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer sg.Close()
	g := &throttleSpy{Guest: sg}
	g.Guest.SetThrottle(40) // the epoch loop's
	w, err := checkpoint.NewWriter(io.Discard, checkpoint.Header{Build: "test", Kind: synth.Kind, PageSize: guest.PageSize,
		Regions: checkpoint.RegionsOf(sg.Regions())}, checkpoint.Options{})
	if err != nil {
		t.Fatal(err)
	}
	core := NewCore(g, nil)
	core.From = NewDirtyTap(core.Dirty.Len())
	m, err := NewMigration(core, &discardLink{w: w}, Policy{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the move fails at once
	runErr := m.Run(ctx)
	if len(g.set) != 0 {
		t.Fatalf("a migration that set no throttle (it ended with %v) set %v at its end: want the loop's left alone", runErr, g.set)
	}
}
