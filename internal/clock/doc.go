// Package clock is Tandem's one time source: the Clock interface, the Real
// clock (the time package) and a Fake one for tests that moves only when
// told to (Advance) and fires its timers and tickers in deadline order.
//
// What must use it: anything below cmd whose behaviour a reading of the
// time decides. That is the failover node's lease, Decide and their ticks
// (failover.Config.Clock), the primary's epoch loop (epoch ticker,
// back-off between joins, acknowledgement deadlines, status rates:
// failover.EpochConfig.Clock) and its output gate (output delays), and the
// precopy engine (Migration.Clock: round timing, downtime and completion
// deadlines, the bandwidth Limiter; Core.Clock: the pause time an epoch's
// acknowledgement latency is measured from). Each takes a Clock in its
// config; nil means Real, so default behaviour is the time package's.
//
// The rule: nothing below cmd reads time.Now, or waits on time.After or a
// time ticker, to decide what to do; it asks the Clock it was given. What
// may stay on the time package: socket deadlines (the kernel keeps those
// in real time), context timeouts handed to I/O, and phase measurements
// that only feed timing.Recorder and status figures.
//
// Not converted yet (issue 13, item 7 is open until they are): package
// replica (the secondary's sender-live window and its receive and
// confirmation timeouts), failover's accept-loop back-off and
// Node.WaitSynced's poll, and netlimit's log rate.
//
// The Fake is safe for concurrent use. A test that drives a goroutine
// through a Fake calls BlockUntil(n) before Advance, so the goroutine has
// set up the timer the advance is meant to fire. BlockUntil gives up after
// BlockLimit of real time and says so, so such a test fails, never hangs.
package clock
