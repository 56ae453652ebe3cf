package ft

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/replica"
)

// serveJoinTimeout bounds how long a stopping node waits for its data
// connections' goroutines (serveSecondary) once their context has ended.
const serveJoinTimeout = 5 * time.Second

// secondaryWait is how long a primary's connection waits for this node to
// become a secondary (a node starting, or one handing its guest over)
// before it is closed. The primary's join gives its handshake 5 s.
const secondaryWait = 3 * time.Second

// waitSecondary is current() once it is not nil, or nil after
// secondaryWait or ctx's end. A restarted node's data port listens before
// raft has told it its part; a connection closed then failed the
// primary's join after it connected, which backs off up to 5 s (issue
// 20: seconds from a restart to protected), where a wait lets the join
// go on the moment the node is secondary.
func waitSecondary(ctx context.Context, current func() *replica.Secondary) *replica.Secondary {
	if sec := current(); sec != nil {
		return sec
	}
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	deadline := time.Now().Add(secondaryWait)
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if sec := current(); sec != nil {
			return sec
		}
	}
	return nil
}

// serveSecondary hands each primary connection to the current Secondary
// (which serves one at a time, ending the one before); with none, the
// connection waits for one up to secondaryWait, then is closed. Over TLS a connection must first complete
// its handshake within handshakeTimeout and pass checkPeer (the node its
// certificate names) before a byte of it is read: a refused one never
// reaches the Secondary, so it cannot end the legitimate stream.
//
// It owns a goroutine per connection: ctx's end closes every connection,
// and serveSecondary returns only once ln is closed and those goroutines
// are gone (each is bounded: the handshake by handshakeTimeout, checkPeer
// by its own wait, the stream by ctx).
func serveSecondary(ctx context.Context, ln net.Listener, current func() *replica.Secondary, checkPeer func(context.Context, net.Conn) error, log *slog.Logger) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conn.Close()
			stop := context.AfterFunc(ctx, func() { conn.Close() })
			defer stop()
			if err := trust.Handshake(conn, handshakeTimeout); err != nil {
				log.Warn("data connection refused: TLS handshake", "from", conn.RemoteAddr().String(), "err", err)
				return
			}
			if checkPeer != nil {
				if err := checkPeer(ctx, conn); err != nil {
					log.Warn("data connection refused", "from", conn.RemoteAddr().String(), "err", err)
					return
				}
			}
			sec := waitSecondary(ctx, current)
			if sec == nil {
				return
			}
			err := sec.Serve(ctx, conn)
			if ctx.Err() == nil && !errors.Is(err, replica.ErrActivated) {
				log.Warn("primary connection ended", "from", conn.RemoteAddr().String(), "err", err)
			}
		}()
	}
}
