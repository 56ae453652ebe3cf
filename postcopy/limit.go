package postcopy

import (
	"context"
	"net"
	"time"

	"github.com/tandemvm/tandem/precopy"
)

// limitPiece is the most one write takes from the shared limiter at a
// time, so a page requested by a vCPU waits behind at most a few pieces
// of the push, not behind a whole buffer of it.
const limitPiece = 16 << 10

// limitedConn is a connection whose writes share a byte-rate limiter
// with the source's other post-copy connection: the migration's
// --max-bandwidth holds for both together.
//
// Each piece gets its own write deadline (timeout): a buffered flush of
// many pieces at a low rate takes longer than one deadline for the whole
// flush allows, yet the link is alive as long as each piece moves.
type limitedConn struct {
	net.Conn
	ctx     context.Context
	lim     *precopy.Limiter
	timeout time.Duration
}

func (c limitedConn) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), limitPiece)
		if err := c.lim.Wait(c.ctx, k); err != nil {
			return n, err
		}
		if c.timeout > 0 {
			if err := arm(c.Conn.SetWriteDeadline, c.timeout, c.ctx.Done()); err != nil {
				return n, err
			}
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
