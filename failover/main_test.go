package failover

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine is still running
// once they are done: every goroutine has an owner that stops and joins it.
// $TANDEM_EPOCH_TRIGGER (clock or output) runs every epoch loop that does
// not choose its trigger with that one: the whole package's tests with
// output-triggered epochs on.
func TestMain(m *testing.M) {
	if s := os.Getenv("TANDEM_EPOCH_TRIGGER"); s != "" {
		t, err := ParseEpochTrigger(s)
		if err != nil {
			fmt.Fprintln(os.Stderr, "$TANDEM_EPOCH_TRIGGER:", err)
			os.Exit(2)
		}
		defaultTrigger = t
	}
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction(UnansweredVerifyFunc), goleak.IgnoreAnyFunction(UnansweredApplyFunc),
		goleak.IgnoreAnyFunction(RaftTransferLeaks[0]), goleak.IgnoreAnyFunction(RaftTransferLeaks[1]))
}
