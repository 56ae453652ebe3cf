package clock

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

func recv(t *testing.T, c <-chan time.Time) (time.Time, bool) {
	t.Helper()
	select {
	case v := <-c:
		return v, true
	default:
		return time.Time{}, false
	}
}

func TestFakeTimersFireInOrder(t *testing.T) {
	f := NewFake(time.Time{})
	t0 := f.Now()
	var order []int
	a := f.NewTimer(30 * time.Millisecond)
	b := f.After(10 * time.Millisecond)
	c := f.NewTimer(20 * time.Millisecond)
	f.Advance(5 * time.Millisecond)
	if _, ok := recv(t, b); ok {
		t.Fatal("timer fired early")
	}
	f.Advance(25 * time.Millisecond)
	for i, ch := range []<-chan time.Time{b, c.C(), a.C()} {
		v, ok := recv(t, ch)
		if !ok {
			t.Fatalf("timer %d did not fire", i)
		}
		order = append(order, int(v.Sub(t0)/time.Millisecond))
	}
	if order[0] != 10 || order[1] != 20 || order[2] != 30 {
		t.Fatalf("fired at %v ms, want 10 20 30", order)
	}
	if got := f.Now().Sub(t0); got != 30*time.Millisecond {
		t.Fatalf("now = +%v, want +30ms", got)
	}
	if f.Waiters() != 0 {
		t.Fatalf("%d waiters left", f.Waiters())
	}
}

func TestFakeTimerStopReset(t *testing.T) {
	f := NewFake(time.Time{})
	tm := f.NewTimer(time.Second)
	if !tm.Stop() {
		t.Fatal("Stop of an armed timer returned false")
	}
	f.Advance(2 * time.Second)
	if _, ok := recv(t, tm.C()); ok {
		t.Fatal("stopped timer fired")
	}
	if tm.Reset(time.Second) {
		t.Fatal("Reset of a stopped timer returned true")
	}
	f.Advance(999 * time.Millisecond)
	if _, ok := recv(t, tm.C()); ok {
		t.Fatal("reset timer fired early")
	}
	f.Advance(time.Millisecond)
	if _, ok := recv(t, tm.C()); !ok {
		t.Fatal("reset timer did not fire")
	}
}

func TestFakeTickerDropsTicks(t *testing.T) {
	f := NewFake(time.Time{})
	t0 := f.Now()
	tk := f.NewTicker(10 * time.Millisecond)
	defer tk.Stop()
	f.Advance(35 * time.Millisecond) // ticks at 10, 20, 30: one kept
	v, ok := recv(t, tk.C())
	if !ok || v.Sub(t0) != 10*time.Millisecond {
		t.Fatalf("tick = %v, %v; want the first (+10ms)", v.Sub(t0), ok)
	}
	if _, ok := recv(t, tk.C()); ok {
		t.Fatal("a full channel kept a second tick")
	}
	f.Advance(5 * time.Millisecond)
	if v, ok := recv(t, tk.C()); !ok || v.Sub(t0) != 40*time.Millisecond {
		t.Fatalf("tick = %v, %v; want +40ms", v.Sub(t0), ok)
	}
	tk.Reset(100 * time.Millisecond)
	f.Advance(99 * time.Millisecond)
	if _, ok := recv(t, tk.C()); ok {
		t.Fatal("reset ticker ticked early")
	}
}

func TestFakeSleepAndBlockUntil(t *testing.T) {
	f := NewFake(time.Time{})
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	ctx, cancel := context.WithCancel(context.Background())
	wg.Add(2)
	go func() { defer wg.Done(); errs <- Sleep(context.Background(), f, time.Minute) }()
	go func() { defer wg.Done(); errs <- Sleep(ctx, f, time.Hour) }()
	if !f.BlockUntil(2) {
		t.Fatal("the sleepers never armed their timers")
	}
	f.Advance(time.Minute)
	if err := <-errs; err != nil {
		t.Fatalf("sleep: %v", err)
	}
	cancel()
	if err := <-errs; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled sleep: %v", err)
	}
	wg.Wait()
	if f.Waiters() != 0 {
		t.Fatalf("%d waiters left", f.Waiters())
	}
}

func TestRealClock(t *testing.T) {
	c := Or(nil)
	if _, ok := c.(Real); !ok {
		t.Fatalf("Or(nil) = %T", c)
	}
	start := c.Now()
	if err := Sleep(context.Background(), c, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if Since(c, start) < time.Millisecond {
		t.Fatal("Sleep returned early")
	}
	tk := c.NewTicker(time.Millisecond)
	<-tk.C()
	tk.Stop()
}

func TestFakeBlockUntilGivesUp(t *testing.T) {
	f := NewFake(time.Time{})
	f.NewTimer(time.Second)
	start := time.Now()
	if f.BlockUntilWithin(2, 20*time.Millisecond) {
		t.Fatal("BlockUntilWithin(2) reported two waiters with one armed")
	}
	if waited := time.Since(start); waited < 20*time.Millisecond || waited > 5*time.Second {
		t.Fatalf("gave up after %v, want about 20ms", waited)
	}
	if !f.BlockUntilWithin(1, time.Second) {
		t.Fatal("BlockUntilWithin(1) missed the armed timer")
	}
}
