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

// serveSecondary hands each primary connection to the current Secondary
// (which serves one at a time, ending the one before); with none, the
// connection is closed at once. Over TLS a connection must first complete
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
			sec := current()
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
