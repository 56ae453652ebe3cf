package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/netlimit"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

func init() {
	register("receive", "wait for a migration (--listen) or restore a snapshot (--from file:PATH), then run the guest", cmdReceive)
}

func cmdReceive(args []string) error {
	fs := newFlagSet("receive")
	listen := fs.String("listen", "", "data address to receive a migration on")
	from := fs.String("from", "", "snapshot to restore: file:PATH")
	apiAddr := fs.String("api", "127.0.0.1:7080", "address of the HTTP API")
	consoleAddr := fs.String("console", "127.0.0.1:7081", "address of the console bridge")
	kind := fs.String("guest", "", "accept only this guest kind (kvm or synth); default: either")
	allowFaults := fs.Bool("allow-faults", false, "serve fault-injection endpoints (tests)")
	var rf receiveFlags
	addReceiveFlags(fs, &rf, true)
	var snapDir string
	addSnapshotDirFlag(fs, &snapDir)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	switch {
	case (*listen == "") == (*from == ""):
		return usagef("want exactly one of --listen ADDR or --from file:PATH")
	case *from != "" && !strings.HasPrefix(*from, "file:"):
		return usagef("--from %q: want file:PATH", *from)
	case *kind != "" && *kind != "kvm" && *kind != "synth":
		return usagef("--guest %q: want kvm or synth", *kind)
	}
	log := newLogger()
	n, err := newGuestNode("receive", *apiAddr, *consoleAddr, log)
	if err != nil {
		return err
	}
	n.allowFaults = *allowFaults
	if err := n.setSnapshotDir(snapDir); err != nil {
		n.close()
		return err
	}
	r := rf.apply(&replica.Receiver{NewGuest: emptyGuest, Build: version.Build(), Log: log, Kind: *kind}, "")

	if path, ok := strings.CutPrefix(*from, "file:"); ok {
		res, err := r.RestoreFile(path)
		if err != nil {
			n.close()
			return err
		}
		n.attach(res.Guest, res.Hello.Config)
		if _, err := res.Guest.Resume(); err != nil {
			n.close()
			return fmt.Errorf("resume the restored guest: %w", err)
		}
		n.mu.Lock()
		n.inbound, n.state = &res, "running"
		n.mu.Unlock()
		log.Info("snapshot restored; guest running", "path", path, "epochs", res.Epochs, "digest", res.Digest)
		return n.wait()
	}

	tcp, err := net.Listen("tcp", *listen)
	if err != nil {
		n.close()
		return fmt.Errorf("listen on %s: %w", *listen, err)
	}
	ln := netlimit.Wrap(tcp, "receive", netlimit.DataCap, log)
	log.Info("waiting for a migration", "listen", ln.Addr().String(), "api", n.api.addr())
	// Every connection is handshaken on its own goroutine, so a peer that
	// connects and says nothing holds up no one (its handshake has a
	// deadline); the first Hello that passes takes the one migration this
	// process receives, later ones are told it is busy.
	ctx, cancel := context.WithCancel(context.Background())
	var busy atomic.Bool
	var wg sync.WaitGroup
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				admitted := false
				rc := *r
				rc.Admit = func(replica.Hello) error {
					if !busy.CompareAndSwap(false, true) {
						return errors.New("this receiver is already receiving a migration")
					}
					admitted = true
					n.setState("receiving")
					return nil
				}
				res, err := rc.ReceiveMigration(ctx, conn, func(g guest.Guest, h replica.Hello) error {
					n.attach(g, h.Config)
					return nil
				})
				if err != nil {
					if admitted {
						n.setState("waiting")
						busy.Store(false)
					}
					log.Error("migration refused or failed; still waiting", "from", conn.RemoteAddr().String(), "err", err)
					return
				}
				n.mu.Lock()
				n.cfg = res.Hello.Config
				n.inbound, n.state = &res, "running"
				n.mu.Unlock()
				log.Info("migration received; guest running", "from", conn.RemoteAddr().String(),
					"epochs", res.Epochs, "digest", res.Digest, "load", res.LoadTime.String())
				// No more migrations: the guest runs here now.
				ln.Close()
				// Drain the end of the stream, then close.
				conn.SetReadDeadline(time.Now().Add(2 * time.Second))
				var b [512]byte
				for {
					if _, err := conn.Read(b[:]); err != nil {
						break
					}
				}
			}()
		}
	}()
	err = n.wait()
	ln.Close()
	cancel()
	<-done
	wg.Wait()
	return err
}
