package stopsignal

import (
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The first signal ends stop, the second force; cancel joins the watcher.
func TestContextsFirstStopsSecondForces(t *testing.T) {
	stop, force, cancel := Contexts()
	defer cancel()
	if err := syscall.Kill(syscall.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-stop.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("stop did not end on the first signal")
	}
	if force.Err() != nil {
		t.Fatal("force ended on the first signal")
	}
	if err := syscall.Kill(syscall.Getpid(), syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-force.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("force did not end on the second signal")
	}
}

func TestContextCancel(t *testing.T) {
	ctx, cancel := Context()
	cancel()
	if ctx.Err() == nil {
		t.Fatal("cancel did not end the context")
	}
}
