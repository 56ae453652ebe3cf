package precopy

import (
	"context"
	"fmt"
	"github.com/tandemvm/tandem/internal/clock"
	"sync"
	"time"
)

// TokenBucket is the pure accounting behind a bandwidth limit: no clock, no
// lock, no sleeping. Callers pass the time in. Tokens are bytes (or whatever
// unit the rate is in).
//
// Take lets the balance go negative (debt) rather than refusing a request
// larger than the burst: a sender of 1 MiB batches over a link limited to
// 64 KiB of burst still gets exactly the configured rate, it just waits
// longer per batch. Concurrent takers queue up behind the debt in the order
// they took, so the bucket is fair without a wait list.
//
// The zero value is an unlimited bucket.
type TokenBucket struct {
	rate   float64 // tokens per second; 0 means unlimited
	burst  float64 // most tokens that may accumulate while idle
	tokens float64 // balance; negative is debt owed by earlier takers
	last   time.Time
}

// DefaultBurst is the burst a bucket gets when none is given: 50 ms worth of
// rate, at least one page. Small enough that a one-second measurement sees
// the configured rate within a few per cent, large enough that scheduler
// jitter does not lose tokens.
func DefaultBurst(rate uint64) uint64 {
	b := rate / 20
	if b < 4096 {
		b = 4096
	}
	return b
}

// NewTokenBucket returns a bucket of rate tokens per second (0 = unlimited)
// holding at most burst tokens (0 = DefaultBurst(rate)), full at now.
func NewTokenBucket(rate, burst uint64, now time.Time) TokenBucket {
	var b TokenBucket
	b.SetRate(rate, burst, now)
	b.tokens = b.burst
	return b
}

// SetRate changes the rate and burst from now on. Tokens accrued at the old
// rate up to now are kept (capped at the new burst); debt is kept too, so a
// rate change cannot be used to skip a wait already owed.
func (b *TokenBucket) SetRate(rate, burst uint64, now time.Time) {
	b.refill(now)
	if burst == 0 {
		burst = DefaultBurst(rate)
	}
	b.rate = float64(rate)
	b.burst = float64(burst)
	if b.tokens > b.burst {
		b.tokens = b.burst
	}
	if b.last.IsZero() || now.After(b.last) {
		b.last = now
	}
}

// Rate returns the configured rate in tokens per second; 0 means unlimited.
func (b *TokenBucket) Rate() uint64 { return uint64(b.rate) }

// Burst returns the configured burst.
func (b *TokenBucket) Burst() uint64 { return uint64(b.burst) }

// Tokens returns the balance at now; negative means debt.
func (b *TokenBucket) Tokens(now time.Time) float64 {
	b.refill(now)
	return b.tokens
}

// refill credits the tokens earned since last. A clock that steps backwards
// earns nothing and does not move last back, so time is never counted twice.
func (b *TokenBucket) refill(now time.Time) {
	if b.last.IsZero() {
		b.last = now
		return
	}
	dt := now.Sub(b.last)
	if dt <= 0 {
		return
	}
	b.last = now
	if b.rate == 0 {
		return
	}
	b.tokens += dt.Seconds() * b.rate
	if b.tokens > b.burst {
		b.tokens = b.burst
	}
}

// Take spends n tokens at now and returns how long the caller must wait
// before the spend is covered: 0 if the balance was enough. An unlimited
// bucket always returns 0.
func (b *TokenBucket) Take(n uint64, now time.Time) time.Duration {
	b.refill(now)
	if b.rate == 0 || n == 0 {
		return 0
	}
	b.tokens -= float64(n)
	if b.tokens >= 0 {
		return 0
	}
	return secondsToDuration(-b.tokens / b.rate)
}

// Refund gives back n tokens taken by a caller that then did not send (its
// wait was cancelled), so the next caller does not pay for it.
func (b *TokenBucket) Refund(n uint64, now time.Time) {
	b.refill(now)
	if b.rate == 0 {
		return
	}
	b.tokens += float64(n)
	if b.tokens > b.burst {
		b.tokens = b.burst
	}
}

// Limiter is a TokenBucket behind a mutex with a clock: a bandwidth limit
// that any number of goroutines can share. The zero value is not usable;
// build one with NewLimiter.
type Limiter struct {
	clock clock.Clock

	// mu guards bucket.
	mu     sync.Mutex
	bucket TokenBucket
}

// NewLimiter returns a limiter of rate bytes per second (0 = unlimited) with
// the given burst (0 = DefaultBurst(rate)). A nil clk means clock.Real.
func NewLimiter(rate, burst uint64, clk clock.Clock) *Limiter {
	clk = clock.Or(clk)
	return &Limiter{clock: clk, bucket: NewTokenBucket(rate, burst, clk.Now())}
}

// SetRate changes the rate and burst for every later Wait. Waits already
// sleeping finish on the schedule they were given.
func (l *Limiter) SetRate(rate, burst uint64) {
	now := l.clock.Now()
	l.mu.Lock()
	l.bucket.SetRate(rate, burst, now)
	l.mu.Unlock()
}

// Rate returns the limit in bytes per second; 0 means unlimited.
func (l *Limiter) Rate() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.bucket.Rate()
}

// Wait blocks until n more bytes may be sent, or until ctx ends. On a
// cancelled wait the bytes are refunded and the error wraps ctx.Err(), so
// the caller knows it must not send them. n <= 0 only checks ctx.
func (l *Limiter) Wait(ctx context.Context, n int) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("precopy: rate limit wait: %w", err)
	}
	if n <= 0 {
		return nil
	}
	now := l.clock.Now()
	l.mu.Lock()
	d := l.bucket.Take(uint64(n), now)
	l.mu.Unlock()
	if d <= 0 {
		return nil
	}
	if err := clock.Sleep(ctx, l.clock, d); err != nil {
		now = l.clock.Now()
		l.mu.Lock()
		l.bucket.Refund(uint64(n), now)
		l.mu.Unlock()
		return fmt.Errorf("precopy: rate limit wait: %w", err)
	}
	return nil
}
