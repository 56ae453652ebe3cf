package replica

import (
	"math"
	"runtime/debug"
	"testing"
)

// TestRaiseMemoryLimit: the limit follows the largest budget plus the
// slack, never falls, and an operator's limit (GOMEMLIMIT) stands.
func TestRaiseMemoryLimit(t *testing.T) {
	prev := debug.SetMemoryLimit(math.MaxInt64)
	saved := memLimit.ours
	defer func() {
		debug.SetMemoryLimit(prev)
		memLimit.ours = saved
	}()
	memLimit.ours = 0
	raiseMemoryLimit(100 << 20)
	if got := debug.SetMemoryLimit(-1); got != 100<<20+heapSlack {
		t.Fatalf("limit %d after a 100 MiB budget, want %d", got, 100<<20+heapSlack)
	}
	raiseMemoryLimit(50 << 20)
	if got := debug.SetMemoryLimit(-1); got != 100<<20+heapSlack {
		t.Fatalf("limit %d after a smaller budget, want it kept at %d", got, 100<<20+heapSlack)
	}
	raiseMemoryLimit(1 << 30)
	if got := debug.SetMemoryLimit(-1); got != 1<<30+heapSlack {
		t.Fatalf("limit %d after a 1 GiB budget, want %d", got, 1<<30+heapSlack)
	}
	debug.SetMemoryLimit(3 << 30) // the operator's
	raiseMemoryLimit(4 << 30)
	if got := debug.SetMemoryLimit(-1); got != 3<<30 {
		t.Fatalf("limit %d, want the operator's %d kept", got, int64(3<<30))
	}
	raiseMemoryLimit(math.MaxUint64)
	if got := debug.SetMemoryLimit(-1); got != 3<<30 {
		t.Fatalf("limit %d after a huge budget, want the operator's kept", got)
	}
}
