package test

import (
	"testing"
	"time"
)

// TestMigrateSparseTebibyte: a 1 TiB synth guest with 64 MiB in use
// migrates in seconds (issue 11 item 8: cost follows resident memory, not
// guest size), with equal digests on both sides.
func TestMigrateSparseTebibyte(t *testing.T) {
	skipUnlessKind(t, "synth")
	src := startSource(t, "synth", guestOpts{memory: "1TiB", touch: "64MiB", dirtyRate: 5000})
	dst := startReceiver(t)
	waitWorkload(t, src, 64<<20)
	t0 := time.Now()
	st := mustMigrate(t, src, dst.data, "--downtime-limit", downtimeFlag)
	checkSwitchover(t, src, dst, st)
	checkDowntime(t, st)
	if d := time.Since(t0); d > 30*time.Second {
		t.Errorf("1 TiB guest with 64 MiB in use took %v to migrate", d)
	}
	t.Logf("1 TiB guest, 64 MiB touched: total %d ms, downtime %d ms, wire %.1f MiB", st.TotalTimeMs, st.DowntimeMs, float64(st.TransferredBytes)/(1<<20))
}

// TestFTSparseTebibyte: the same guest gets protected (the secondary's
// catch-up is round 0's SendAll) and keeps committing epochs.
func TestFTSparseTebibyte(t *testing.T) {
	skipUnlessKind(t, "synth")
	t0 := time.Now()
	pri, sec, _ := startPair(t, "synth", primaryOpts{memory: "1TiB", workload: "dirty", touch: "64MiB", dirtyRate: 5000})
	t.Logf("1 TiB guest protected %v after the pair started", time.Since(t0).Round(time.Millisecond))
	s0 := mustFT(t, sec, false)
	time.Sleep(time.Second)
	s1 := mustFT(t, sec, false)
	if s1.Commits <= s0.Commits {
		t.Errorf("no epochs committed in a second: %d then %d", s0.Commits, s1.Commits)
	}
	if st := mustFT(t, pri, false); st.DigestMismatches != 0 {
		t.Errorf("%d digest mismatches: %s", st.DigestMismatches, st.LastMismatch)
	}
}
