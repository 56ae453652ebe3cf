package postcopy

import (
	"context"
	"net"

	"github.com/tandemvm/tandem/precopy"
)

// limitPiece is the most one write takes from the shared limiter at a
// time, so a page requested by a vCPU waits behind at most a few pieces
// of the push, not behind a whole buffer of it.
const limitPiece = 16 << 10

// limitedConn is a connection whose writes share a byte-rate limiter
// with the source's other post-copy connection: the migration's
// --max-bandwidth holds for both together.
type limitedConn struct {
	net.Conn
	ctx context.Context
	lim *precopy.Limiter
}

func (c limitedConn) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), limitPiece)
		if err := c.lim.Wait(c.ctx, k); err != nil {
			return n, err
		}
		m, err := c.Conn.Write(p[:k])
		n += m
		if err != nil {
			return n, err
		}
		p = p[k:]
	}
	return n, nil
}
