package precopy

import (
	"context"

	"errors"
	"github.com/tandemvm/tandem/internal/clock"
	"sync"
	"testing"
	"time"
)

// fakeClock advances only when someone sleeps on it (every timer fires
// at once, having moved the time to its deadline), so rate-limit tests
// are exact and take no wall time.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	slept  time.Duration
	sleeps int
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTimer(d time.Duration) clock.Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sleeps++
	c.now = c.now.Add(d)
	c.slept += d
	f := clock.NewFake(time.Time{})
	t := f.NewTimer(d)
	f.Advance(d)
	return t
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time { return c.NewTimer(d).C() }

func (c *fakeClock) NewTicker(time.Duration) clock.Ticker { panic("fakeClock: no tickers") }

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func TestTokenBucketTake(t *testing.T) {
	t0 := time.Unix(0, 0)
	ms := time.Millisecond
	type step struct {
		at   time.Duration // since t0
		take uint64
		want time.Duration
	}
	tests := []struct {
		name        string
		rate, burst uint64
		steps       []step
	}{
		{"unlimited never waits", 0, 0, []step{{0, 1 << 40, 0}, {0, 1 << 40, 0}}},
		{"within burst", 1000, 500, []step{{0, 500, 0}}},
		{"past burst goes into debt", 1000, 500, []step{{0, 500, 0}, {0, 250, 250 * ms}}},
		{"one request larger than burst", 1000, 100, []step{{0, 1100, time.Second}}},
		{"debt accumulates in order", 1000, 100, []step{{0, 100, 0}, {0, 100, 100 * ms}, {0, 100, 200 * ms}}},
		{"refill over time", 1000, 500, []step{{0, 500, 0}, {300 * ms, 300, 0}, {300 * ms, 100, 100 * ms}}},
		{"refill capped at burst", 1000, 500, []step{{0, 500, 0}, {10 * time.Second, 600, 100 * ms}}},
		{"clock going backwards earns nothing", 1000, 500, []step{{time.Second, 500, 0}, {0, 100, 100 * ms}, {time.Second, 100, 200 * ms}}},
		{"zero take is free", 1000, 100, []step{{0, 100, 0}, {0, 0, 0}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := NewTokenBucket(tt.rate, tt.burst, t0)
			for i, s := range tt.steps {
				if got := b.Take(s.take, t0.Add(s.at)); got != s.want {
					t.Fatalf("step %d: Take(%d) at %v = %v, want %v", i, s.take, s.at, got, s.want)
				}
			}
		})
	}
}

func TestTokenBucketRefundAndSetRate(t *testing.T) {
	t0 := time.Unix(0, 0)
	b := NewTokenBucket(1000, 100, t0)
	if d := b.Take(300, t0); d != 200*time.Millisecond {
		t.Fatalf("Take = %v", d)
	}
	b.Refund(300, t0)
	if got := b.Tokens(t0); got != 100 {
		t.Fatalf("after refund tokens = %v, want 100 (capped at burst)", got)
	}
	// Debt survives a rate change: a faster rate shortens the wait but
	// does not forgive it.
	b.Take(300, t0) // balance -200
	b.SetRate(2000, 100, t0)
	if d := b.Take(0, t0); d != 0 {
		t.Fatalf("zero take waits %v", d)
	}
	if got := b.Tokens(t0); got != -200 {
		t.Fatalf("debt after SetRate = %v, want -200", got)
	}
	if d := b.Take(100, t0); d != 150*time.Millisecond {
		t.Fatalf("Take after SetRate = %v, want 150ms", d)
	}
	// Switching to unlimited stops all waiting.
	b.SetRate(0, 0, t0)
	if d := b.Take(1<<30, t0); d != 0 {
		t.Fatalf("unlimited Take = %v", d)
	}
	if b.Rate() != 0 || b.Burst() != DefaultBurst(0) {
		t.Fatalf("rate %d burst %d", b.Rate(), b.Burst())
	}
}

func TestDefaultBurst(t *testing.T) {
	for _, tt := range []struct{ rate, want uint64 }{{0, 4096}, {1000, 4096}, {100 << 20, 100 << 20 / 20}} {
		if got := DefaultBurst(tt.rate); got != tt.want {
			t.Errorf("DefaultBurst(%d) = %d, want %d", tt.rate, got, tt.want)
		}
	}
}

// TestLimiterWaitRate checks the long-run rate exactly with a fake clock:
// sending N bytes from a full bucket takes (N-burst)/rate.
func TestLimiterWaitRate(t *testing.T) {
	for _, tt := range []struct {
		name        string
		rate, burst uint64
		chunk, n    int
		want        time.Duration
	}{
		{"small chunks", 1 << 20, 64 << 10, 4096, 1024, (1024*4096 - 64<<10) * time.Second / (1 << 20)},
		{"chunks larger than burst", 1 << 20, 4096, 256 << 10, 16, (16*256<<10 - 4096) * time.Second / (1 << 20)},
		{"unlimited", 0, 0, 1 << 20, 100, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clk := newFakeClock()
			l := NewLimiter(tt.rate, tt.burst, clk)
			for i := 0; i < tt.n; i++ {
				if err := l.Wait(context.Background(), tt.chunk); err != nil {
					t.Fatal(err)
				}
			}
			if diff := clk.slept - tt.want; diff < -time.Microsecond || diff > time.Microsecond {
				t.Fatalf("slept %v, want %v", clk.slept, tt.want)
			}
		})
	}
}

// TestLimiterWaitCancelRefunds drives the limiter on a fake clock: a wait
// cancelled while it sleeps refunds its bytes, and the next wait sleeps
// exactly for its own debt (no wall time, no sleeps in the test).
func TestLimiterWaitCancelRefunds(t *testing.T) {
	clk := clock.NewFake(time.Time{})
	l := NewLimiter(1000, 100, clk)
	if err := l.Wait(context.Background(), 100); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- l.Wait(ctx, 500) }()
	if !clk.BlockUntil(1) { // asleep for its 500 bytes
		t.Fatal("the 500-byte wait never slept")
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait: %v", err)
	}
	// The 500 were refunded, so the next 100 only wait for their own debt.
	go func() { errc <- l.Wait(context.Background(), 100) }()
	if !clk.BlockUntil(1) {
		t.Fatal("the 100-byte wait never slept")
	}
	clk.Advance(99 * time.Millisecond)
	select {
	case err := <-errc:
		t.Fatalf("after refund the wait ended before 100ms: %v", err)
	default:
	}
	clk.Advance(time.Millisecond)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

func TestLimiterWaitContextAlreadyDone(t *testing.T) {
	l := NewLimiter(0, 0, newFakeClock())
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.Wait(ctx, 1); !errors.Is(err, context.Canceled) {
		t.Fatalf("Wait on done ctx = %v", err)
	}
	if err := l.Wait(context.Background(), 0); err != nil {
		t.Fatal(err)
	}
	if err := l.Wait(context.Background(), -5); err != nil {
		t.Fatal(err)
	}
}

func TestLimiterSetRateAndIdleRefill(t *testing.T) {
	clk := newFakeClock()
	l := NewLimiter(1000, 1000, clk)
	_ = l.Wait(context.Background(), 1000)
	clk.advance(time.Second) // idle: refills to burst
	before := clk.slept
	_ = l.Wait(context.Background(), 1000)
	if clk.slept != before {
		t.Fatalf("idle refill not credited: slept %v", clk.slept-before)
	}
	l.SetRate(500, 1000)
	if l.Rate() != 500 {
		t.Fatalf("Rate = %d", l.Rate())
	}
	_ = l.Wait(context.Background(), 500)
	if got := clk.slept - before; got != time.Second {
		t.Fatalf("after SetRate waited %v, want 1s", got)
	}
}

// TestLimiterRealClock runs the real sleeper briefly, with a bounded
// deadline, to prove Wait actually sleeps and honours a context.
func TestLimiterRealClock(t *testing.T) {
	l := NewLimiter(1<<20, 16<<10, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	for i := 0; i < 32; i++ { // 256 KiB at 1 MiB/s, 16 KiB free
		if err := l.Wait(ctx, 8<<10); err != nil {
			t.Fatal(err)
		}
	}
	el := time.Since(start)
	if el < 200*time.Millisecond || el > 2*time.Second {
		t.Fatalf("256 KiB at 1 MiB/s took %v, want about 234ms", el)
	}
	short, cancel2 := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel2()
	start = time.Now()
	if err := l.Wait(short, 1<<20); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait past deadline = %v", err)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("cancelled Wait took %v", el)
	}
}
