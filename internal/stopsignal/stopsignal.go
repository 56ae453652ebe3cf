// Package stopsignal turns SIGTERM and SIGINT into contexts: how every
// long-running tandem command is stopped (besides POST /quit, which the
// node watches itself). Package ft never installs signal handlers; the
// command hands it these contexts.
package stopsignal

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

// Context ends on the first SIGTERM or SIGINT; cancel releases the
// signals.
func Context() (ctx context.Context, cancel context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
}

// Contexts are Context's for a node that does something on its way out (a
// primary's handover): stop ends on the first SIGTERM or SIGINT, force on
// the second. cancel releases the signals and ends both.
func Contexts() (stop, force context.Context, cancel func()) {
	stop, stopFn := context.WithCancel(context.Background())
	force, forceFn := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	go func() {
		for n := 0; ; n++ {
			select {
			case <-done:
				return
			case <-sigs:
				if n == 0 {
					stopFn()
				} else {
					forceFn()
					return
				}
			}
		}
	}()
	return stop, force, func() {
		signal.Stop(sigs)
		close(done)
		stopFn()
		forceFn()
	}
}
