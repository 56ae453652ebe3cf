package precopy

import (
	"testing"
	"time"
)

// TestPredictionLearnsFinalSendRate: round 0's pages (mostly zero or very
// compressible) move far faster than dirty pages do; the prediction takes
// the dirty rounds' rate, and then a measured final send's when slower.
func TestPredictionLearnsFinalSendRate(t *testing.T) {
	c := mustController(t, Policy{DowntimeLimit: 300 * time.Millisecond})
	now := t0
	// Round 0: 131,072 pages in 100 ms (5 GiB/s of guest memory).
	now = now.Add(100 * time.Millisecond)
	c.RoundDone(round(0, 131072, 1000, 1000, 100*time.Millisecond), now)
	fast, ok := c.PredictSend(1000)
	if !ok {
		t.Fatal("no prediction after round 0")
	}
	// Round 1: 1,000 dirty pages in 40 ms (100 MB/s).
	now = now.Add(40 * time.Millisecond)
	c.RoundDone(round(1, 1000, 1000, 1000, 40*time.Millisecond), now)
	dirty, _ := c.PredictSend(1000)
	if dirty < 35*time.Millisecond || dirty > 45*time.Millisecond {
		t.Fatalf("1,000 pages predicted %v after round 0 and a 40 ms round of 1,000 pages (round 0 alone: %v), want about 40 ms", dirty, fast)
	}
	// A small round says nothing about the link.
	c.RoundDone(round(2, 10, 10, 10, 10*time.Millisecond), now.Add(10*time.Millisecond))
	if d, _ := c.PredictSend(1000); d != dirty {
		t.Fatalf("a 10-page round moved the prediction from %v to %v", dirty, d)
	}
	// A final send of 1,000 pages took 100 ms: that is what counts now.
	c.ObserveFinalSend(1000, 100*time.Millisecond)
	final, _ := c.PredictSend(1000)
	if final < 95*time.Millisecond || final > 105*time.Millisecond {
		t.Fatalf("after a 100 ms final send of 1,000 pages, 1,000 pages predicted %v", final)
	}
	if d, ok := c.Predict(1000); !ok || d < final {
		t.Fatalf("stop-and-copy predicted %v, below the final send's %v", d, final)
	}
	// A faster final send does not make the prediction faster than the
	// dirty rounds say.
	c2 := mustController(t, Policy{})
	c2.RoundDone(round(1, 1000, 1000, 1000, 40*time.Millisecond), t0.Add(40*time.Millisecond))
	c2.ObserveFinalSend(1000, 4*time.Millisecond)
	if d, _ := c2.PredictSend(1000); d < 35*time.Millisecond {
		t.Fatalf("a fast final send brought the prediction down to %v", d)
	}
}

// TestPredictionLearnsFinalSyncGrowth: a final sync that finds twice the
// pages the decision counted on doubles later predictions; syncs that
// find no more let the factor decay back to 1, and it is capped.
func TestPredictionLearnsFinalSyncGrowth(t *testing.T) {
	c := mustController(t, Policy{})
	c.RoundDone(round(1, 1000, 1000, 1000, 40*time.Millisecond), t0.Add(40*time.Millisecond))
	save := c.Stats().StateSaveEstimate
	send := func() time.Duration { d, _ := c.Predict(1000); return d - save }
	base := send()
	c.ObserveFinalSync(2000)
	if d := send(); d < base*19/10 || d > base*21/10 {
		t.Fatalf("after a final sync of twice the pages, %v predicted to send (was %v)", d, base)
	}
	for i := 0; i < 10; i++ {
		c.ObserveFinalSync(1000)
	}
	if d := send(); d > base*101/100 {
		t.Fatalf("growth did not decay: %v predicted to send (was %v)", d, base)
	}
	c.ObserveFinalSync(1_000_000)
	if d := send(); d > base*(maxGrowth+1) {
		t.Fatalf("growth not capped: %v predicted to send (was %v)", d, base)
	}
}
