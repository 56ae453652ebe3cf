package test

import (
	"math/rand/v2"
	"testing"
	"time"
)

// TestFTSecondaryComesBackFromDisk: a secondary with --data-dir keeps its
// committed image on disk. With the primary dead (so nobody can re-sync
// it), the secondary is killed too and restarted: it must come back at its
// last committed epoch, and activating it must show every write the
// client saw acknowledged.
func TestFTSecondaryComesBackFromDisk(t *testing.T) {
	t.Parallel()
	forEachKind(t, func(t *testing.T, kind string) {
		dir := t.TempDir()
		pri, sec, sa := startPair(t, kind, primaryOpts{}, "--data-dir", dir)
		log := newAckLog()
		c, err := dialConsoleErr(pri, "p")
		if err != nil {
			t.Fatal(err)
		}
		defer c.c.Close()
		stop := make(chan struct{})
		done := make(chan error, 1)
		go func() { done <- kvWriter(c, log, stop, 10*time.Second, rand.New(rand.NewPCG(7, 8))) }()
		time.Sleep(time.Second)
		close(stop)
		if err := <-done; err != nil {
			t.Fatalf("client: %v", err)
		}
		// Every acknowledged write's epoch is committed (output waits for
		// it); let one more epoch pass, then stop both.
		time.Sleep(100 * time.Millisecond)
		pri.kill()
		time.Sleep(200 * time.Millisecond)
		before := mustFT(t, sec, false)
		if !before.Consistent || before.LastCommittedEpoch == 0 {
			t.Fatalf("secondary before the kill: %+v", before)
		}
		sec.kill()

		sec2 := startSecondary(t, "secondary-from-disk-"+kind, sa, "--data-dir", dir)
		after := mustFT(t, sec2, false)
		if !after.Consistent || after.LastCommittedEpoch != before.LastCommittedEpoch {
			t.Fatalf("restarted secondary at epoch %d (consistent %v), want its last committed epoch %d",
				after.LastCommittedEpoch, after.Consistent, before.LastCommittedEpoch)
		}
		activate(t, sec2)
		checkAcked(t, sec2, log)
		t.Logf("%s: %d acknowledged writes back from disk at epoch %d", kind, len(log.acked), after.LastCommittedEpoch)
	})
}
