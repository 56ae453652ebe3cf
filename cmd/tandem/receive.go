package main

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/tandemvm/tandem/guest"
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
	r := &replica.Receiver{NewGuest: emptyGuest, Build: version.Build(), Log: log, Kind: *kind}

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

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		n.close()
		return fmt.Errorf("listen on %s: %w", *listen, err)
	}
	log.Info("waiting for a migration", "listen", ln.Addr().String(), "api", n.api.addr())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			n.setState("receiving")
			res, err := r.ReceiveMigration(context.Background(), conn, func(g guest.Guest, h replica.Hello) error {
				n.attach(g, h.Config)
				return nil
			})
			if err != nil {
				conn.Close()
				n.setState("waiting")
				log.Error("migration refused or failed; still waiting", "from", conn.RemoteAddr().String(), "err", err)
				continue
			}
			n.mu.Lock()
			n.cfg = res.Hello.Config
			n.inbound, n.state = &res, "running"
			n.mu.Unlock()
			log.Info("migration received; guest running", "from", conn.RemoteAddr().String(),
				"epochs", res.Epochs, "digest", res.Digest, "load", res.LoadTime.String())
			// Drain the end of the stream, then close.
			conn.SetReadDeadline(time.Now().Add(2 * time.Second))
			var b [512]byte
			for {
				if _, err := conn.Read(b[:]); err != nil {
					break
				}
			}
			conn.Close()
			ln.Close()
			return
		}
	}()
	err = n.wait()
	ln.Close()
	<-done
	return err
}
