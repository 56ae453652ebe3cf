package failover

import (
	"slices"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/clock"
)

// A short trigger wait on the real clock is slept in nanosleep: it never
// fires early, fires once, and its goroutine is joined by the pipeline
// (goleak checks); a long one, or any on a fake clock, is the clock's
// timer. (What preciseWait gains shows in a real primary, whose runtime
// timers fired a millisecond late: see preciseBelow; in a busy test
// process the runtime's monitor thread checks timers every 20 µs.)
func TestTriggerTimerShortWaits(t *testing.T) {
	l := &EpochLoop{clk: clock.Real{}}
	p := &pipeline{}
	const d = 300 * time.Microsecond
	var precise []time.Duration
	for range 30 {
		start := time.Now()
		w := l.triggerTimer(p, d)
		if _, ok := w.(preciseWait); !ok {
			t.Fatalf("a %v wait on the real clock is a %T, want preciseWait", d, w)
		}
		at := <-w.C()
		if late := at.Sub(start) - d; late < 0 {
			t.Fatalf("a %v wait fired %v early", d, -late)
		} else {
			precise = append(precise, late)
		}
		select {
		case <-w.C():
			t.Fatal("a wait fired twice")
		default:
		}
	}
	// Forgotten waits end on their own and are joined.
	for range 5 {
		l.triggerTimer(p, d).Stop()
	}
	p.sleepers.Wait()
	slices.Sort(precise)
	t.Logf("lateness of a %v wait in nanosleep: median %v, max %v", d, precise[len(precise)/2], precise[len(precise)-1])

	if w := l.triggerTimer(p, preciseBelow); func() bool { _, ok := w.(preciseWait); return ok }() {
		t.Errorf("a %v wait is a preciseWait, want the clock's timer", preciseBelow)
	} else {
		w.Stop()
	}
	fake := &EpochLoop{clk: clock.NewFake(time.Unix(0, 0))}
	if w := fake.triggerTimer(p, d); func() bool { _, ok := w.(preciseWait); return ok }() {
		t.Error("a wait on a fake clock is a preciseWait, want the fake clock's timer")
	} else {
		w.Stop()
	}
}

// Waits armed again and again before the first wakes (awaitTrigger does
// on every reply) share one sleeper while they would wake no sooner than
// it: a burst of replies holds one OS thread in nanosleep, not one each.
// A wait that must wake sooner gets its own.
func TestTriggerTimerWaitsShareASleeper(t *testing.T) {
	l := &EpochLoop{clk: clock.Real{}}
	p := &pipeline{}
	first := l.triggerTimer(p, 1500*time.Microsecond)
	for range 200 {
		w := l.triggerTimer(p, 1900*time.Microsecond)
		if w != first {
			t.Fatal("a wait that wakes later than the pending sleeper started another")
		}
		w.Stop()
	}
	sooner := l.triggerTimer(p, 100*time.Microsecond)
	if sooner == first {
		t.Fatal("a wait that must wake sooner shares a later sleeper")
	}
	<-sooner.C()
	<-first.C()
	p.sleepers.Wait()
}
