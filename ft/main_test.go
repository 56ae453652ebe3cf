package ft

import (
	"testing"

	"github.com/tandemvm/tandem/failover"
	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine is still running
// once they are done: every goroutine has an owner that stops and joins it.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction(failover.UnansweredVerifyFunc), goleak.IgnoreAnyFunction(failover.UnansweredApplyFunc),
		goleak.IgnoreAnyFunction(failover.RaftTransferLeaks[0]), goleak.IgnoreAnyFunction(failover.RaftTransferLeaks[1]))
}
