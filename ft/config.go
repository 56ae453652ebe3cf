package ft

import (
	"time"

	"github.com/tandemvm/tandem/failover"
)

// EpochSettings are a primary's protection settings (see
// failover.EpochConfig for each).
type EpochSettings struct {
	Interval         time.Duration
	FlushBudget      time.Duration
	Verify           bool
	VerifySlicePages int
	MaxInFlight      int
	AckTimeout       time.Duration
	// Trigger, MaxOutputDelay and MaxPauseFraction: when an epoch ends
	// early for held output (failover.EpochConfig; zero: the defaults).
	Trigger          failover.EpochTrigger
	MaxOutputDelay   time.Duration
	MaxPauseFraction float64
	// NoThrottle: never throttle a guest whose dirty bytes outrun the
	// link (failover.ThrottlePolicy.Off); epochs stretch instead.
	NoThrottle bool
}
