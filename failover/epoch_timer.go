package failover

import (
	"errors"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/internal/clock"
)

// preciseBelow: awaitTrigger's waits shorter than this are slept in a
// system call, not on a runtime timer. The Go runtime, idle, waits for
// its next timer in epoll_wait, whose timeout is whole milliseconds
// (runtime/netpoll_epoll.go rounds anything under 1 ms up to 1 ms), so
// the minimum interval's rest after a synchronous client's reply (0.1 to
// 0.3 ms) took about a millisecond: on kvm (BenchmarkFTKV, one
// synchronous client, a trace of every wake) those timers fired 0.97 ms
// late at the median, in 393 of 1,360 requests, half of the 2 ms a
// protected request is allowed. nanosleep(2) wakes on a high-resolution
// timer within its slack (50 µs).
const preciseBelow = 2 * time.Millisecond

// triggerWait is the timer awaitTrigger waits on.
type triggerWait interface {
	C() <-chan time.Time
	Stop() bool
}

// preciseWait is a wait of under preciseBelow slept by its own goroutine
// in nanosleep(2): it cannot be cancelled, so Stop only forgets it; the
// goroutine ends within the wait and the pipeline joins it (sleepers).
type preciseWait struct{ c chan time.Time }

func (w preciseWait) C() <-chan time.Time { return w.c }
func (w preciseWait) Stop() bool          { return true }

// triggerTimer is a timer for d: on the real clock and under
// preciseBelow a preciseWait, else the loop's clock's timer (a fake
// clock's in tests, whose time only moves when the test says).
func (l *EpochLoop) triggerTimer(p *pipeline, d time.Duration) triggerWait {
	if _, real := l.clk.(clock.Real); !real || d >= preciseBelow {
		return l.clk.NewTimer(d)
	}
	// awaitTrigger arms a wait again on every reply and every progress
	// signal; under output-heavy load that is thousands a second, each
	// of which would hold an OS thread in nanosleep for up to
	// preciseBelow. A sleeper still pending that wakes no later serves
	// the new wait: waking early only makes the loop decide again (and
	// arm the rest).
	now := time.Now()
	at := now.Add(d)
	if s := p.sleeper; s.w.c != nil && s.at.After(now) && !s.at.After(at) {
		return s.w
	}
	w := preciseWait{c: make(chan time.Time, 1)} // never blocks the sleeper
	p.sleeper.w, p.sleeper.at = w, at
	p.sleepers.Add(1)
	go func() {
		defer p.sleepers.Done()
		ts := unix.NsecToTimespec(int64(d))
		for {
			// The remainder goes back into ts on a signal.
			if err := unix.Nanosleep(&ts, &ts); !errors.Is(err, unix.EINTR) {
				break
			}
		}
		w.c <- time.Now()
	}()
	return w
}
