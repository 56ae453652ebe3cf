package failover

import "github.com/tandemvm/tandem/internal/failpoint"

// FPBeforeReleaseOutput is passed when an acknowledged epoch's output is
// about to be released (OutputGate.Release). Armed by a test, its error
// makes the release refuse, as a refused fence does: output stays held.
var FPBeforeReleaseOutput = failpoint.New("failover.gate.before-release-output")
