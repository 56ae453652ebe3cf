package replica

import (
	"math"
	"runtime/debug"
	"sync"
)

// The Go heap of a receiver holds an epoch's staging (at most its budget,
// Image.SetBudget) and the buffers sections are decoded through. A flood
// of sections that are decoded and then refused or dropped leaves
// garbage the collector only collects when the heap has doubled, so a
// secondary under a flood held 281 to 330 MiB for a 64 MiB guest whose
// staging budget is 136 MiB (TestTrustStagingFlood). A soft memory limit
// of the largest budget in use plus heapSlack makes the collector keep
// up. It never fails an allocation: a live heap past the limit only
// costs collector CPU (at most half of it, Go's own cap). An operator's
// GOMEMLIMIT is left as it is.

// heapSlack is what the limit allows beyond the staging budget: decode
// buffers, the link's, a store's rewrite, the runtime's own.
const heapSlack = 128 << 20

var memLimit struct {
	sync.Mutex
	ours int64 // the limit this package set, 0 if none
}

// raiseMemoryLimit makes the process's soft memory limit at least
// budget+heapSlack, unless someone else set a limit.
func raiseMemoryLimit(budget uint64) {
	memLimit.Lock()
	defer memLimit.Unlock()
	cur := debug.SetMemoryLimit(-1)
	if cur != math.MaxInt64 && cur != memLimit.ours {
		return // GOMEMLIMIT or another caller: theirs stands
	}
	want := int64(min(budget, math.MaxInt64-heapSlack) + heapSlack)
	if want <= memLimit.ours {
		return
	}
	memLimit.ours = want
	debug.SetMemoryLimit(want)
}
