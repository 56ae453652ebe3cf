package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"time"
)

// FreshOptions describe one node StartFresh starts: a run source, a
// receiver, a pair's primary.
type FreshOptions struct {
	Name   string   // attempt i logs to LogDir/<Name>-<i>.log
	Argv   []string // the command and its flags, without the addresses
	LogDir string
	// Listen adds a fresh --listen address (a receiver's).
	Listen bool
	// OnAddrs, when set, is told each attempt's addresses before it
	// starts (a caller that talks TLS to them registers them).
	OnAddrs func(api, console string)
	// Ready says whether the node at api answers; StartFresh waits for it
	// at most ReadyTimeout (0: 30 s) per attempt.
	Ready        func(ctx context.Context, api string) error
	ReadyTimeout time.Duration
}

// Fresh is a node StartFresh started: its process and addresses.
type Fresh struct {
	Proc                 *Proc
	API, Console, Listen string
}

// StartFresh starts o.Argv with fresh --api and --console addresses (and
// --listen), and waits until it is ready. When the node lost a port race
// (PortClash) it is started again on fresh addresses, at most three
// times; any other failure ends it at once, with the log's tail. The
// caller owns the returned process.
func StartFresh(ctx context.Context, o FreshOptions) (*Fresh, error) {
	var last error
	for attempt := 0; attempt < 3; attempt++ {
		f := &Fresh{}
		var err error
		for _, p := range []*string{&f.API, &f.Console} {
			if *p, err = FreeAddr(); err != nil {
				return nil, err
			}
		}
		argv := append(append([]string(nil), o.Argv...), "--api", f.API, "--console", f.Console)
		if o.Listen {
			if f.Listen, err = FreeAddr(); err != nil {
				return nil, err
			}
			argv = append(argv, "--listen", f.Listen)
		}
		if o.OnAddrs != nil {
			o.OnAddrs(f.API, f.Console)
		}
		name := fmt.Sprintf("%s-%d", o.Name, attempt)
		if f.Proc, err = StartProc(name, filepath.Join(o.LogDir, name+".log"), argv...); err != nil {
			return nil, err
		}
		if last = WaitReady(ctx, f.Proc, func(ctx context.Context) error { return o.Ready(ctx, f.API) }, o.ReadyTimeout); last == nil {
			return f, nil
		}
		f.Proc.Kill()
		if !PortClash(f.Proc.Log()) {
			return nil, fmt.Errorf("%v; its log ends:\n%s", last, f.Proc.Tail(40))
		}
	}
	return nil, last
}

// WaitReady polls ready every 50 ms until it succeeds, p exits or timeout
// (0: 30 s) passes.
func WaitReady(ctx context.Context, p *Proc, ready func(context.Context) error, timeout time.Duration) error {
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	deadline := time.Now().Add(timeout)
	for {
		if !p.Running() {
			return fmt.Errorf("%s exited before it was ready: %v", p.Name(), p.WaitErr())
		}
		if ready(ctx) == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %v", p.Name(), timeout)
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
}
