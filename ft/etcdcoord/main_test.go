package etcdcoord

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine is still running
// once they are done. The embedded etcd servers the tests start are
// closed by each test; what they leave behind after Close is named here,
// narrowly.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, etcdLeaks()...)
}
