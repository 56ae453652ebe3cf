package e2e

import (
	"cmp"
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"time"
)

// UDPKV is a kv client of a guest's network card (UDP port 7000): one
// request per datagram, "<client>:<seq> <request>", resent with the same
// id every Retry until its reply comes; the guest answers a resend from
// its record, never applying it twice. One goroutine at a time.
type UDPKV struct {
	Conn   *net.UDPConn
	Client string        // the id's client part; "" means "w"
	Retry  time.Duration // how long to wait for a reply before resending; 0 means 50 ms
	seq    uint64
}

// Seq is the sequence number of the last request sent.
func (u *UDPKV) Seq() uint64 { return u.seq }

// Do sends req and waits, resending, up to within (or until ctx ends)
// for its reply, returned without the id.
func (u *UDPKV) Do(ctx context.Context, req string, within time.Duration) (string, error) {
	u.seq++
	id := fmt.Sprintf("%s:%d ", cmp.Or(u.Client, "w"), u.seq)
	msg, buf := []byte(id+req), make([]byte, 2048)
	for deadline := time.Now().Add(within); time.Now().Before(deadline); {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		if _, err := u.Conn.Write(msg); err != nil {
			return "", err
		}
		u.Conn.SetReadDeadline(time.Now().Add(cmp.Or(u.Retry, 50*time.Millisecond)))
		for {
			n, err := u.Conn.Read(buf)
			if err != nil {
				break // timeout, or ICMP refusal while nobody has the address: resend
			}
			if rest, ok := strings.CutPrefix(string(buf[:n]), id); ok {
				return strings.TrimSuffix(rest, "\n"), nil
			}
		}
	}
	return "", fmt.Errorf("no reply to %s%s within %v", id, req, within)
}

// UDPLoad writes k1=v1, k2=v2, ... through one UDPKV in the background,
// recording when each write was acknowledged and its round trip.
type UDPLoad struct {
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once

	// mu guards the records below and err.
	mu    sync.Mutex
	acked []string
	at    []time.Time
	rtt   []time.Duration
	err   error // why the writer ended early (nil: it runs, or was stopped)
}

// StartUDPLoad starts the writer; each write is given up (the load
// fails) after within without a reply. The caller must Stop it.
func StartUDPLoad(ctx context.Context, u *UDPKV, within time.Duration) *UDPLoad {
	lctx, cancel := context.WithCancel(ctx)
	ld := &UDPLoad{cancel: cancel, done: make(chan struct{})}
	go func() { // joined by Stop
		defer close(ld.done)
		for i := 1; ; i++ {
			k, t0 := fmt.Sprintf("k%d", i), time.Now()
			rep, err := u.Do(lctx, fmt.Sprintf("SET %s v%d", k, i), within)
			if err != nil || rep != "OK" {
				if lctx.Err() != nil {
					return // stopped; a write cut short was not acknowledged
				}
				if err == nil {
					err = fmt.Errorf("SET %s answered %q", k, rep)
				}
				ld.mu.Lock()
				ld.err = err
				ld.mu.Unlock()
				return
			}
			ld.mu.Lock()
			ld.acked, ld.at, ld.rtt = append(ld.acked, k), append(ld.at, time.Now()), append(ld.rtt, time.Since(t0))
			ld.mu.Unlock()
		}
	}()
	return ld
}

// Stop ends the load, waits for its writer and returns the writer's
// error (the same on every call).
func (ld *UDPLoad) Stop() error {
	ld.once.Do(func() {
		ld.cancel()
		<-ld.done
	})
	return ld.Err()
}

// Err is why the writer ended early, nil while it runs or once stopped.
func (ld *UDPLoad) Err() error {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return ld.err
}

// Count is how many writes were acknowledged so far.
func (ld *UDPLoad) Count() int {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return len(ld.acked)
}

// Keys are the acknowledged writes' keys, in order (key kN holds vN).
func (ld *UDPLoad) Keys() []string {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return slices.Clone(ld.acked)
}

// RoundTripP50 is the median round trip of the acknowledged writes.
func (ld *UDPLoad) RoundTripP50() time.Duration {
	ld.mu.Lock()
	s := slices.Clone(ld.rtt)
	ld.mu.Unlock()
	if len(s) == 0 {
		return 0
	}
	slices.Sort(s)
	return s[len(s)/2]
}

// FirstAckAfter is when the first write acknowledged after t was (zero:
// none yet).
func (ld *UDPLoad) FirstAckAfter(t time.Time) time.Time {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	if i := slices.IndexFunc(ld.at, func(a time.Time) bool { return a.After(t) }); i >= 0 {
		return ld.at[i]
	}
	return time.Time{}
}

// LongestGap is the longest wait between two consecutive
// acknowledgements that spans any moment of [from, to]: the last reply
// before an event and the first after it.
func (ld *UDPLoad) LongestGap(from, to time.Time) (last, first time.Time) {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	for i := 1; i < len(ld.at); i++ {
		if ld.at[i].Before(from) || ld.at[i-1].After(to) {
			continue
		}
		if ld.at[i].Sub(ld.at[i-1]) > first.Sub(last) {
			last, first = ld.at[i-1], ld.at[i]
		}
	}
	return last, first
}
