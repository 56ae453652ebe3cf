package ft

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/replica"
)

// A primary's connection that arrives before this node is a secondary (a
// node starting) waits for it rather than being closed: the primary's
// join would otherwise fail after connecting and back off for seconds.
func TestWaitSecondary(t *testing.T) {
	var cur atomic.Pointer[replica.Secondary]
	sec := replica.NewSecondary(&replica.Receiver{}, nil)
	time.AfterFunc(100*time.Millisecond, func() { cur.Store(sec) })
	t0 := time.Now()
	if got := waitSecondary(context.Background(), cur.Load); got != sec {
		t.Fatalf("waitSecondary = %v, want the secondary that appeared", got)
	}
	if d := time.Since(t0); d > secondaryWait {
		t.Errorf("took %v", d)
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if got := waitSecondary(ctx, func() *replica.Secondary { return nil }); got != nil {
		t.Fatalf("waitSecondary after ctx's end = %v, want nil", got)
	}
}
