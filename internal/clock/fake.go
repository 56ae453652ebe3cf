package clock

import (
	"sort"
	"sync"
	"time"
)

// Fake is a Clock that moves only when Advance (or Set) moves it. Its
// timers and tickers fire, in deadline order, as time passes their
// deadlines; a timer or ticker channel holds one value, and a tick that
// finds it full is dropped (as with the time package). Safe for
// concurrent use; the zero value is not usable: build one with NewFake.
type Fake struct {
	// mu guards every field below.
	mu      sync.Mutex
	cond    *sync.Cond // signalled when waiters change
	now     time.Time
	seq     uint64 // orders waiters of equal deadline by creation
	waiters []*fakeWaiter
}

// fakeWaiter is one armed timer or ticker.
type fakeWaiter struct {
	c      chan time.Time
	at     time.Time
	period time.Duration // 0: a timer
	seq    uint64
	armed  bool
}

// NewFake returns a Fake clock reading start (the zero time if start is
// zero: a fixed, arbitrary instant is then used).
func NewFake(start time.Time) *Fake {
	if start.IsZero() {
		start = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	}
	f := &Fake{now: start}
	f.cond = sync.NewCond(&f.mu)
	return f
}

// Now is the fake time.
func (f *Fake) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

// After fires once d has passed on the fake clock.
func (f *Fake) After(d time.Duration) <-chan time.Time { return f.NewTimer(d).C() }

// NewTimer arms a timer for d from now; d <= 0 fires at once.
func (f *Fake) NewTimer(d time.Duration) Timer {
	w := &fakeWaiter{c: make(chan time.Time, 1)}
	t := &fakeTimer{f: f, w: w}
	f.mu.Lock()
	f.armLocked(w, d)
	f.mu.Unlock()
	return t
}

// NewTicker arms a ticker every d; d must be positive.
func (f *Fake) NewTicker(d time.Duration) Ticker {
	if d <= 0 {
		panic("clock: non-positive interval for NewTicker")
	}
	w := &fakeWaiter{c: make(chan time.Time, 1), period: d}
	f.mu.Lock()
	f.armLocked(w, d)
	f.mu.Unlock()
	return &fakeTicker{f: f, w: w}
}

// Advance moves the clock forward by d, firing every timer and tick due
// on the way in deadline order (Now reads each deadline as it fires).
func (f *Fake) Advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.advanceLocked(f.now.Add(d))
}

// Set moves the clock to t, firing what is due; a t before now is ignored.
func (f *Fake) Set(t time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.advanceLocked(t)
}

// Waiters is how many timers and tickers are armed.
func (f *Fake) Waiters() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.waiters)
}

// BlockLimit bounds BlockUntil's wait, in real time.
const BlockLimit = 10 * time.Second

// BlockUntil waits until at least n timers and tickers are armed, for at
// most BlockLimit of real time (a test whose goroutine never arms its
// timer fails instead of hanging). It reports whether n were armed.
func (f *Fake) BlockUntil(n int) bool { return f.BlockUntilWithin(n, BlockLimit) }

// BlockUntilWithin is BlockUntil with a limit of d, in real time.
func (f *Fake) BlockUntilWithin(n int, d time.Duration) bool {
	expired := false
	t := time.AfterFunc(d, func() {
		f.mu.Lock()
		expired = true
		f.cond.Broadcast()
		f.mu.Unlock()
	})
	defer t.Stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	for len(f.waiters) < n && !expired {
		f.cond.Wait()
	}
	return len(f.waiters) >= n
}

func (f *Fake) advanceLocked(end time.Time) {
	for {
		if len(f.waiters) == 0 || f.waiters[0].at.After(end) {
			break
		}
		w := f.waiters[0]
		f.now = w.at
		select {
		case w.c <- w.at:
		default: // full: the tick is dropped
		}
		if w.period > 0 {
			w.at = w.at.Add(w.period)
			w.seq = f.nextSeq()
			f.sortLocked()
		} else {
			f.removeLocked(w)
		}
	}
	if end.After(f.now) {
		f.now = end
	}
}

func (f *Fake) nextSeq() uint64 { f.seq++; return f.seq }

func (f *Fake) sortLocked() {
	sort.SliceStable(f.waiters, func(i, j int) bool {
		a, b := f.waiters[i], f.waiters[j]
		if !a.at.Equal(b.at) {
			return a.at.Before(b.at)
		}
		return a.seq < b.seq
	})
}

// armLocked (re)arms w for d from now; d <= 0 fires a timer at once.
func (f *Fake) armLocked(w *fakeWaiter, d time.Duration) {
	f.removeLocked(w)
	if d <= 0 && w.period == 0 {
		select {
		case w.c <- f.now:
		default:
		}
		return
	}
	w.at, w.seq, w.armed = f.now.Add(d), f.nextSeq(), true
	f.waiters = append(f.waiters, w)
	f.sortLocked()
	f.cond.Broadcast()
}

// removeLocked disarms w; it says whether w was armed.
func (f *Fake) removeLocked(w *fakeWaiter) bool {
	if !w.armed {
		return false
	}
	w.armed = false
	for i, x := range f.waiters {
		if x == w {
			f.waiters = append(f.waiters[:i], f.waiters[i+1:]...)
			break
		}
	}
	f.cond.Broadcast()
	return true
}

type fakeTimer struct {
	f *Fake
	w *fakeWaiter
}

func (t *fakeTimer) C() <-chan time.Time { return t.w.c }

func (t *fakeTimer) Stop() bool {
	t.f.mu.Lock()
	defer t.f.mu.Unlock()
	// As with time.Timer since Go 1.23: no stale value after Stop.
	select {
	case <-t.w.c:
	default:
	}
	return t.f.removeLocked(t.w)
}

func (t *fakeTimer) Reset(d time.Duration) bool {
	t.f.mu.Lock()
	defer t.f.mu.Unlock()
	was := t.w.armed
	// As with time.Timer since Go 1.23: no stale value survives a Reset.
	select {
	case <-t.w.c:
	default:
	}
	t.f.armLocked(t.w, d)
	return was
}

type fakeTicker struct {
	f *Fake
	w *fakeWaiter
}

func (t *fakeTicker) C() <-chan time.Time { return t.w.c }

func (t *fakeTicker) Stop() {
	t.f.mu.Lock()
	defer t.f.mu.Unlock()
	t.f.removeLocked(t.w)
}

func (t *fakeTicker) Reset(d time.Duration) {
	if d <= 0 {
		panic("clock: non-positive interval for Ticker.Reset")
	}
	t.f.mu.Lock()
	defer t.f.mu.Unlock()
	t.w.period = d
	t.f.armLocked(t.w, d)
}
