package replica

import (
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/precopy"
)

// TestMigrateReportsAttempts: every completion attempt is reported with
// the downtime expected when it was decided, the pages the final sync
// left with the prediction for them, and what happened; the last one
// completed. (The ceiling itself is asserted by test/ against the real
// binary: the race detector slows encoding here.)
func TestMigrateReportsAttempts(t *testing.T) {
	cfg := guest.Config{Memory: 128 << 20, VCPUs: 1, Workload: guest.Workload{
		Kind: guest.WorkloadDirty, Touch: 32 << 20, DirtyRate: 10000, Pattern: guest.PatternRandom,
		Fill: guest.FillRandom, WriteBytes: 4096, WriteData: guest.WriteRandom}}
	src, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	src.Resume()
	time.Sleep(200 * time.Millisecond)
	dst, st, res := migrate(t, src, precopy.DefaultPolicy())
	defer dst.Close()
	if st.SwitchoverDigest != res.Digest {
		t.Fatalf("switchover digests differ: source %s destination %s", st.SwitchoverDigest, res.Digest)
	}
	if len(st.Attempts) == 0 || len(st.Attempts) != st.CompletionAttempts {
		t.Fatalf("%d attempts reported, %d counted", len(st.Attempts), st.CompletionAttempts)
	}
	for i, a := range st.Attempts {
		last := i == len(st.Attempts)-1
		if (a.Outcome == "completed") != last || a.ActualDowntimeMs <= 0 {
			t.Errorf("attempt %d of %d: %+v", i+1, len(st.Attempts), a)
		}
	}
	if a := st.Attempts[len(st.Attempts)-1]; a.ActualDowntimeMs != float64(st.DowntimeMs) || a.FinalExpectedMs <= 0 {
		t.Errorf("last attempt %+v, downtime %d ms", a, st.DowntimeMs)
	}
	t.Logf("attempts %+v", st.Attempts)
}
