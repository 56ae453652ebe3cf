package failover

import (
	"fmt"
	"math"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// Throttling a protected guest whose dirty rate outruns the link (issue
// 11). Back-pressure alone (at most MaxInFlight epochs unacknowledged)
// makes every epoch longer when the guest dirties memory faster than the
// link and the secondary take it: the capture waits for room while the
// guest runs on and dirties more, so epochs, and the output held with
// them, stretch without bound. The loop instead slows the guest down
// (guest.Throttler: the share of time its vCPUs are kept from running)
// once epochs stretch, to the share of run time whose dirty bytes the link
// carries, and lets it go again step by step once epochs keep to the
// interval. DecideThrottle is that decision, a pure function of one
// window's figures; the loop gathers them (epoch_capture.go) and applies
// the answer.

// ThrottlePolicy says when and how far the epoch loop throttles. The zero
// value means the defaults below.
type ThrottlePolicy struct {
	// Off: never throttle (epochs stretch instead, as before).
	Off bool
	// Window is how often the loop decides; 0 means 1 s. A window that
	// ends while epochs are stretched and nothing was acknowledged in it
	// is extended until something is (the link rate is not known yet).
	Window time.Duration
	// Stretch: the window's epochs count as stretched when some waited
	// for room in the in-flight window and their mean length exceeds the
	// interval by more than this share; 0 means 0.5.
	Stretch float64
	// Headroom is the share of the measured link rate the throttled
	// guest's dirty bytes may fill; 0 means 0.8.
	Headroom float64
	// Cut is the least the guest's run share is cut by while epochs are
	// stretched (so the throttle rises even when the rates say the guest
	// fits: a guest rewriting the same pages looks cheaper over long
	// epochs than over short ones); 0 means 0.2.
	Cut float64
	// Relax is how much the run share grows after a window without a
	// stretched epoch; 0 means 0.25.
	Relax float64
	// Max is the highest throttle in per cent; 0 means 99.
	Max int
}

// Defaults of ThrottlePolicy.
const (
	DefaultThrottleWindow   = time.Second
	DefaultThrottleStretch  = 0.5
	DefaultThrottleHeadroom = 0.8
	DefaultThrottleCut      = 0.2
	DefaultThrottleRelax    = 0.25
	DefaultThrottleMax      = 99
)

func (p ThrottlePolicy) withDefaults() ThrottlePolicy {
	if p.Window <= 0 {
		p.Window = DefaultThrottleWindow
	}
	if p.Stretch <= 0 {
		p.Stretch = DefaultThrottleStretch
	}
	if p.Headroom <= 0 || p.Headroom > 1 {
		p.Headroom = DefaultThrottleHeadroom
	}
	if p.Cut <= 0 || p.Cut >= 1 {
		p.Cut = DefaultThrottleCut
	}
	if p.Relax <= 0 {
		p.Relax = DefaultThrottleRelax
	}
	if p.Max <= 0 || p.Max > 99 {
		p.Max = DefaultThrottleMax
	}
	return p
}

// ThrottleWindow is what the loop saw over one decision window.
type ThrottleWindow struct {
	Interval time.Duration // the epoch interval asked for
	Elapsed  time.Duration // the window's length
	// Epochs were captured in the window; Stretched of them waited for
	// room in the in-flight window first (back-pressure); LengthSum is
	// their pause-to-pause lengths.
	Epochs, Stretched int
	LengthSum         time.Duration
	// ShippedBytes are the wire bytes of the epochs shipped in the
	// window, and ShippedRun the guest's run time they hold (each
	// epoch's length times the run share it was captured under).
	ShippedBytes uint64
	ShippedRun   time.Duration
	// AckedBytes are the wire bytes of the epochs acknowledged in the
	// window: while epochs are stretched the link is busy all the time,
	// so AckedBytes/Elapsed is what it carries.
	AckedBytes uint64
	Percent    int // the throttle in force
	// LinkRate is the link's rate in bytes/s as measured in the last
	// stretched window (0: not known). Relaxing stops where the guest's
	// dirty bytes would fill more than Headroom of it, so the throttle
	// does not saw between stretched and calm windows; the loop forgets
	// it after a while, so a link that got faster is found again.
	LinkRate float64
}

// ThrottleDecision is DecideThrottle's answer.
type ThrottleDecision struct {
	Percent int
	// Why says why the throttle changed ("" when it did not).
	Why string
	// Wait: epochs are stretched but nothing was acknowledged in the
	// window; keep gathering (the window goes on).
	Wait bool
	// LinkRate is the link rate measured in this window when its epochs
	// were stretched, else the window's LinkRate.
	LinkRate float64
}

// DecideThrottle decides the throttle after window w. Stretched epochs
// cut the guest's run share to what the link carries with headroom
// (Headroom × link rate / dirty bytes per second of run time), and at
// least by Cut; a window without a stretched epoch grows the share by
// Relax (up to running free); anything in between holds.
func DecideThrottle(p ThrottlePolicy, w ThrottleWindow) ThrottleDecision {
	p = p.withDefaults()
	cur := min(max(w.Percent, 0), p.Max)
	d := ThrottleDecision{Percent: cur, LinkRate: w.LinkRate}
	if p.Off {
		d.Percent = 0
		if cur != 0 {
			d.Why = "throttling is off"
		}
		return d
	}
	if w.Epochs == 0 || w.Elapsed <= 0 {
		return d
	}
	mean := w.LengthSum / time.Duration(w.Epochs)
	share := float64(100-cur) / 100
	stretched := w.Stretched > 0 && float64(mean) > float64(w.Interval)*(1+p.Stretch)
	switch {
	case stretched:
		if w.AckedBytes == 0 {
			d.Wait = true
			return d
		}
		target := share * (1 - p.Cut)
		how := fmt.Sprintf("cut the run share by %.0f%%", 100*p.Cut)
		link := float64(w.AckedBytes) / w.Elapsed.Seconds()
		d.LinkRate = link
		if w.ShippedBytes > 0 && w.ShippedRun > 0 {
			demand := float64(w.ShippedBytes) / w.ShippedRun.Seconds()
			if fit := p.Headroom * link / demand; fit < target {
				target = fit
				how = fmt.Sprintf("the guest dirties %.1f MB/s of wire bytes while it runs: a run share of %.1f%% fills %.0f%% of the link",
					demand/1e6, 100*fit, 100*p.Headroom)
			}
		}
		d.Percent = min(p.Max, int(math.Ceil(100*(1-target))))
		if d.Percent != cur {
			d.Why = fmt.Sprintf("epochs stretched to %v (interval %v; %d of %d waited for the secondary); the link carries %.1f MB/s; %s: throttle %d%% -> %d%%",
				mean.Round(time.Millisecond), w.Interval, w.Stretched, w.Epochs, link/1e6, how, cur, d.Percent)
		}
	case w.Stretched == 0 && cur > 0:
		target := share * (1 + p.Relax)
		if w.LinkRate > 0 && w.ShippedBytes > 0 && w.ShippedRun > 0 {
			demand := float64(w.ShippedBytes) / w.ShippedRun.Seconds()
			target = min(target, p.Headroom*w.LinkRate/demand)
		}
		if target <= share {
			return d // at what the link carries
		}
		d.Percent = int(math.Floor(100 * (1 - target)))
		if target >= 0.95 {
			d.Percent = 0
		}
		d.Percent = max(0, min(d.Percent, cur-1))
		d.Why = fmt.Sprintf("epochs keep to the interval (mean %v, none waited for the secondary): throttle %d%% -> %d%%",
			mean.Round(time.Millisecond), cur, d.Percent)
	}
	return d
}

// throttleState is the loop's side of the throttle (under the loop's mu).
type throttleState struct {
	win   ThrottleWindow // being gathered
	start time.Time      // the window's start (zero: none yet)
	// link is the link rate of the last stretched window, calm counts
	// the windows since: after linkMemory of them it is forgotten.
	link float64
	calm int
}

// linkMemory is how many calm windows a measured link rate caps relaxing.
const linkMemory = 10

// noteThrottleEpoch counts a captured epoch of length into the window and
// returns the guest's run time in it. Capture goroutine.
func (l *EpochLoop) noteThrottleEpoch(length time.Duration, stalled bool) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	w := &l.thr.win
	if l.thr.start.IsZero() {
		l.thr.start = l.clk.Now()
	}
	w.Epochs++
	if stalled {
		w.Stretched++
	}
	w.LengthSum += length
	return time.Duration(float64(length) * float64(100-l.throttle) / 100)
}

// decideThrottle ends the window once it is long enough, decides and
// applies the throttle. Capture goroutine.
func (l *EpochLoop) decideThrottle() {
	th, ok := l.cfg.Guest.(guest.Throttler)
	pol := l.cfg.Throttle.withDefaults()
	now := l.clk.Now()
	l.mu.Lock()
	if l.thr.start.IsZero() || now.Sub(l.thr.start) < pol.Window {
		l.mu.Unlock()
		return
	}
	if !ok { // nothing to throttle with: just start the next window
		l.thr.win, l.thr.start = ThrottleWindow{}, now
		l.mu.Unlock()
		return
	}
	w := l.thr.win
	w.Interval, w.Elapsed, w.Percent, w.LinkRate = l.cfg.Interval, now.Sub(l.thr.start), l.throttle, l.thr.link
	d := DecideThrottle(pol, w)
	if d.Wait {
		l.mu.Unlock()
		return
	}
	l.thr.win, l.thr.start = ThrottleWindow{}, now
	if w.Stretched > 0 {
		l.thr.calm = 0
	} else if l.thr.calm++; l.thr.calm >= linkMemory {
		d.LinkRate = 0
	}
	l.thr.link = d.LinkRate
	changed := d.Percent != l.throttle
	l.throttle = d.Percent
	l.mu.Unlock()
	if changed {
		th.SetThrottle(d.Percent)
		l.log.Info("epoch throttle", "percent", d.Percent, "why", d.Why)
	}
}

// releaseThrottle lets the guest run free when a link's epochs end:
// without a secondary there is nothing to keep up with.
func (l *EpochLoop) releaseThrottle() {
	l.mu.Lock()
	was := l.throttle
	l.throttle, l.thr = 0, throttleState{}
	l.mu.Unlock()
	if th, ok := l.cfg.Guest.(guest.Throttler); ok && was > 0 {
		th.SetThrottle(0)
		l.log.Info("epoch throttle released: the link's epochs ended", "was", was)
	}
}
