package failover

import (
	"strings"
	"testing"
	"time"
)

// TestDecideThrottle pins the throttle decision on scripted windows.
func TestDecideThrottle(t *testing.T) {
	const iv = 25 * time.Millisecond
	// win is one second of epochs of length each, stretched of them
	// waiting for room; the guest dirtied dirtyMBps of wire bytes per
	// second of run time and the link acknowledged linkMBps.
	win := func(percent, epochs, stretched int, each time.Duration, dirtyMBps, linkMBps float64) ThrottleWindow {
		share := float64(100-percent) / 100
		run := time.Duration(float64(each) * float64(epochs) * share)
		return ThrottleWindow{Interval: iv, Elapsed: time.Second, Epochs: epochs, Stretched: stretched,
			LengthSum: each * time.Duration(epochs), ShippedBytes: uint64(dirtyMBps * 1e6 * run.Seconds()),
			ShippedRun: run, AckedBytes: uint64(linkMBps * 1e6), Percent: percent}
	}
	cases := []struct {
		name string
		pol  ThrottlePolicy
		w    ThrottleWindow
		want int
		wait bool
		why  string
	}{
		{"keeps up: nothing to do", ThrottlePolicy{}, win(0, 40, 0, iv, 40, 40), 0, false, ""},
		{"a few waits, epochs near the interval: hold", ThrottlePolicy{}, win(0, 38, 3, 27*time.Millisecond, 40, 40), 0, false, ""},
		// 400 MB/s of dirty wire bytes against a 12.5 MB/s link:
		// 0.8 × 12.5 / 400 = 2.5 % run share, throttle 98 %.
		{"stretched: throttle to what the link carries", ThrottlePolicy{}, win(0, 2, 2, 500*time.Millisecond, 400, 12.5), 98, false, "the link carries 12.5 MB/s"},
		// The rates say the guest fits (20 MB/s on a 40 MB/s link), but
		// epochs are stretched: cut the share by at least 20 %.
		{"stretched although the rates fit: cut anyway", ThrottlePolicy{}, win(50, 10, 10, 100*time.Millisecond, 20, 40), 60, false, "cut the run share by 20%"},
		{"capped at Max", ThrottlePolicy{Max: 90}, win(0, 2, 2, 500*time.Millisecond, 400, 12.5), 90, false, ""},
		{"at the cap already: no change", ThrottlePolicy{Max: 90}, win(90, 2, 2, 500*time.Millisecond, 400, 12.5), 90, false, ""},
		{"stretched, nothing acknowledged yet: wait", ThrottlePolicy{}, win(0, 1, 1, 900*time.Millisecond, 400, 0), 0, true, ""},
		// Calm: the run share grows by a quarter (2 % -> 2.5 %).
		{"calm at 98 %: relax a step", ThrottlePolicy{}, win(98, 40, 0, iv, 400, 12.5), 97, false, "keep to the interval"},
		{"calm at 40 %: 60 % share grows to 75 %", ThrottlePolicy{}, win(40, 40, 0, iv, 10, 40), 25, false, ""},
		{"calm at 20 %: free", ThrottlePolicy{}, win(20, 40, 0, iv, 10, 40), 0, false, ""},
		{"calm at what the known link carries: hold", ThrottlePolicy{}, withLink(win(97, 40, 0, iv, 400, 12), 12.5e6), 97, false, ""},
		{"calm below what the known link carries: relax up to it", ThrottlePolicy{}, withLink(win(99, 40, 0, iv, 400, 4), 12.5e6), 98, false, ""},
		{"off: release", ThrottlePolicy{Off: true}, win(60, 2, 2, 500*time.Millisecond, 400, 12.5), 0, false, "off"},
		{"no epochs in the window: hold", ThrottlePolicy{}, ThrottleWindow{Interval: iv, Elapsed: time.Second, Percent: 30}, 30, false, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := DecideThrottle(c.pol, c.w)
			if d.Percent != c.want || d.Wait != c.wait {
				t.Fatalf("got %d%% wait=%v (%s), want %d%% wait=%v", d.Percent, d.Wait, d.Why, c.want, c.wait)
			}
			if (d.Percent != c.w.Percent) != (d.Why != "") {
				t.Fatalf("percent %d -> %d with why %q", c.w.Percent, d.Percent, d.Why)
			}
			if !strings.Contains(d.Why, c.why) {
				t.Fatalf("why %q does not say %q", d.Why, c.why)
			}
		})
	}
}

// TestThrottleConverges runs the decision against a model of a link and a
// guest whose dirty wire bytes grow with its run share: from free, the
// throttle reaches a share the link carries within a few windows, epochs
// come back to the interval, and it stays there without running free.
func TestThrottleConverges(t *testing.T) {
	const (
		iv       = 25 * time.Millisecond
		demand   = 400e6  // wire bytes per second of guest run time
		link     = 12.5e6 // bytes per second the link carries
		inFlight = 4
	)
	percent, stretchedWindows, linkRate := 0, 0, 0.0
	var last time.Duration
	for win := 0; win < 30; win++ {
		share := float64(100-percent) / 100
		// An epoch lasts the interval unless the link needs longer for
		// the bytes the guest made meanwhile (the window then waits).
		produce := demand * share
		length := iv
		if produce > link {
			// stretched: each epoch waits for the last inFlight to drain,
			// so lengths grow until the window ends; model a second's
			// worth of backlog.
			length = time.Duration(float64(time.Second) * produce / link / inFlight)
		}
		epochs := max(1, int(time.Second/length))
		stretched := 0
		if produce > link {
			stretched, stretchedWindows = epochs, stretchedWindows+1
		}
		run := time.Duration(float64(length) * float64(epochs) * share)
		w := ThrottleWindow{Interval: iv, Elapsed: time.Second, Epochs: epochs, Stretched: stretched,
			LengthSum: length * time.Duration(epochs), ShippedBytes: uint64(demand * run.Seconds()), ShippedRun: run,
			AckedBytes: uint64(min(produce, link)), Percent: percent, LinkRate: linkRate}
		d := DecideThrottle(ThrottlePolicy{}, w)
		percent, last, linkRate = d.Percent, length, d.LinkRate
	}
	if last != iv {
		t.Fatalf("after 30 windows epochs last %v, interval %v (throttle %d%%)", last, iv, percent)
	}
	if percent < 96 || stretchedWindows > 3 {
		t.Fatalf("throttle %d%% after %d stretched windows: 400 MB/s on 12.5 MB/s needs about 97%%", percent, stretchedWindows)
	}
}

func withLink(w ThrottleWindow, rate float64) ThrottleWindow {
	w.LinkRate = rate
	return w
}
