package failover

import (
	"math/rand/v2"
	"testing"
	"time"
)

// TestPauseFractionOverWindows replays a synchronous client that always
// has a reply waiting a little after each pause, against pauses whose
// cost the line cannot predict (idle ones, busy ones, phases of costly
// ones), through NextPause and the pause account as the loop uses them,
// and checks the time that held guest work over every second (the
// status's window): within MaxPauseFraction of it but for a
// mispredicted pause and a clock pause, and within the fraction over the
// whole run. In the
// busy phases the load wants more than the fraction, so there the bound
// is what spaces the pauses.
func TestPauseFractionOverWindows(t *testing.T) {
	for _, frac := range []float64{0.1, 0.3} {
		tc := EpochConfig{Interval: defaultInterval, MaxPauseFraction: frac}.triggerConfig()
		rng := rand.New(rand.NewPCG(17, uint64(frac*100)))
		start := time.Unix(1e9, 0)
		var acct pauseAccount
		type charge struct {
			at   time.Duration
			held time.Duration
		}
		var charges []charge
		var maxHeld time.Duration
		now, tick := time.Duration(0), tc.Interval
		acct.note(tc, start, 0, 0, 0, true)
		for now < 20*time.Second {
			// The reply comes 0.1 to 1.5 ms after the pause began.
			since := time.Duration(100+rng.IntN(1400)) * time.Microsecond
			in := TriggerInput{SinceLastPause: since, UntilTick: tick - (now + since), HeldBytes: 40}
			acct.fill(&in)
			d := NextPause(tc, in)
			at := now + since + d.After
			if at >= tick {
				tick = at + tc.Interval
			}
			// Phases of a second: idle pauses mostly, busy ones
			// (0.3 ms), costly ones (1 to 2 ms, as kvm's pipelined ones:
			// the clock's epochs alone stay within the fraction; the
			// bound is the early pauses').
			var total time.Duration
			idle := false
			switch phase := int(at/time.Second) % 3; {
			case phase == 0:
				idle = rng.IntN(10) > 0
				total = 300 * time.Microsecond
			case phase == 1:
				total = 300 * time.Microsecond
			default:
				total = time.Duration(1000+rng.IntN(1000)) * time.Microsecond
			}
			held := acct.note(tc, start.Add(at), total, 0, 0, idle)
			charges = append(charges, charge{at, held})
			maxHeld = max(maxHeld, held)
			now = at + total
		}
		var sum time.Duration
		lo := 0
		// creditRate x W + creditCap is the fraction's share of W. An
		// early pause that costs more than predicted overdraws the
		// credit, and a clock pause due meanwhile (charged, though no
		// early pause would be taken) deepens it: two pauses' slack.
		slack := 2 * maxHeld
		const window = time.Second
		worst := 0.0
		for _, c := range charges {
			sum += c.held
			for charges[lo].at <= c.at-window {
				sum -= charges[lo].held
				lo++
			}
			if limit := time.Duration(creditRate(tc)*float64(window)) + creditCap(tc) + slack; sum > limit {
				t.Fatalf("fraction %v: %v held in the second before %v, above %v", frac, sum, c.at, limit)
			}
			worst = max(worst, sum.Seconds()/window.Seconds())
		}
		var all time.Duration
		for _, c := range charges {
			all += c.held
		}
		got := all.Seconds() / now.Seconds()
		if got > frac {
			t.Errorf("fraction %v: %.3f of the run held", frac, got)
		}
		if worst < 0.9*frac {
			t.Errorf("fraction %v: at most %.3f held in any second: the bound never bound", frac, worst)
		}
		t.Logf("fraction %v: %d pauses, %.3f of the run held, %.3f in the worst second", frac, len(charges), got, worst)
	}
}
