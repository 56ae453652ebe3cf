// Package drill is `tandem drill` and the cluster half of `tandem demo`:
// failover runs (a trio under kv load, kill -9 of the primary at a random
// moment, the recovery time, every acknowledged write checked, the old
// primary restarted and protected again) and double-failure scenarios
// (two nodes go away and come back in a given order).
//
// Every run's kv history (every request's invocation and response,
// retries under the same id included) is checked for linearizability
// with porcupine (e2e.History); a history shown not linearizable fails
// the run, one the checker could not decide in time is reported as
// unknown.
//
// The processes, the kv clients and the checks are internal/e2e's; this
// package owns the runs' timeline, their bounds and the summary whose
// JSON names are part of `tandem drill --json`'s contract. It never
// prints anything but to the Out writer it is given, and never waits
// without a bound (each bound is a named constant and a run that misses
// one fails with it as its reason).
package drill
