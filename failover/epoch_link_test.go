package failover

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/clock"
)

// The acknowledgement deadline is one timer, not a poll: while a silent
// secondary's catch-up is outstanding the loop arms exactly one timer on
// its clock (the deadline), drops the link when it passes and not a
// millisecond before, and then backs off. The deadline runs from the
// first send (fake time 0 here, however long the catch-up took).
func TestEpochsAckDeadlineOnFakeClock(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				if _, err := br.ReadString('\n'); err != nil {
					return
				}
				io.WriteString(c, `{"ok":true}`+"\n")
				io.Copy(io.Discard, br) // never acknowledges
			}()
		}
	}()
	const limit = 2 * time.Second
	clk := clock.NewFake(time.Time{})
	loop, _ := startTrustLoop(t, EpochConfig{Clock: clk, AckTimeout: limit, Release: func([]byte) {}})
	loop.SetSecondary(ln.Addr().String())
	// No timer until something is outstanding; then the deadline's alone.
	clk.BlockUntil(1)
	waitFor(t, 10*time.Second, "the deadline armed alone", func() bool { return clk.Waiters() == 1 })

	clk.Advance(limit - time.Millisecond)
	time.Sleep(100 * time.Millisecond)
	if st := loop.Status(); st.Joins != 1 || st.Protection != StateJoining {
		t.Fatalf("link dropped %v before its ack deadline: %+v", time.Millisecond, st)
	}
	clk.Advance(time.Millisecond)
	waitFor(t, 10*time.Second, "the silent link dropped", func() bool {
		st := loop.Status()
		return st.Protection == StateUnprotected && strings.Contains(st.ProtectionReason, "no acknowledgement")
	})
	// The back-off: its timer and its release ticker, nothing else.
	clk.BlockUntil(2)
	if n := clk.Waiters(); n != 2 {
		t.Fatalf("%d timers armed during the back-off, want 2", n)
	}
}
