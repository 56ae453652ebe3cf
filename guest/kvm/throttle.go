package kvm

import "time"

// SetThrottle implements guest.Throttler. Time is cut into periods of
// throttlePeriod; in the last percent of each period no vCPU runs guest
// code: a kick at the window's start takes running vCPUs out of KVM_RUN and
// every vCPU that reaches the run loop in the window sleeps until it ends.
// The micro-guest paces by the TSC with a small backlog cap, so the time it
// is kept out earns it little catch-up and its dirty rate drops.
func (g *Guest) SetThrottle(percent int) {
	percent = max(0, min(99, percent))
	g.throttle.Store(int32(percent))
	if percent > 0 {
		g.thrOnce.Do(func() {
			g.thrStarted.Store(true)
			go g.throttleLoop()
		})
	}
}

const throttlePeriod = 20 * time.Millisecond

// throttleRemaining is how long the current throttle window still lasts,
// or 0 outside a window.
func (g *Guest) throttleRemaining() time.Duration {
	p := time.Duration(g.throttle.Load())
	if p <= 0 {
		return 0
	}
	phase := time.Since(g.thrEpoch) % throttlePeriod
	if phase < throttlePeriod*(100-p)/100 {
		return 0
	}
	return throttlePeriod - phase
}

func (g *Guest) throttleLoop() {
	defer close(g.thrDone)
	t := time.NewTimer(throttlePeriod)
	defer t.Stop()
	for {
		select {
		case <-g.closing:
			return
		case <-t.C:
		}
		p := time.Duration(g.throttle.Load())
		if p > 0 && !g.pauseReq.Load() {
			for _, v := range g.vcpus {
				v.kickRun()
			}
		}
		// Sleep to the start of the next window (or a period when off).
		next := throttlePeriod
		if p > 0 {
			phase := time.Since(g.thrEpoch) % throttlePeriod
			next = (throttlePeriod*(100-p)/100 - phase + throttlePeriod) % throttlePeriod
			if next < time.Millisecond {
				next += throttlePeriod
			}
		}
		t.Reset(next)
	}
}
