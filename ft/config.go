package ft

import "time"

// EpochSettings are a primary's protection settings (see
// failover.EpochConfig for each).
type EpochSettings struct {
	Interval         time.Duration
	FlushBudget      time.Duration
	Verify           bool
	VerifySlicePages int
	MaxInFlight      int
	AckTimeout       time.Duration
}
