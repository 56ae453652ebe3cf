package drill

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tandemvm/tandem/internal/e2e"
	"github.com/tandemvm/tandem/internal/labnet"
)

// The demo's network part: the guest's clients on a real network. A
// bridge and a client namespace (labnet), a and b each with a TAP of its
// own on the bridge, the guest's card at netDemoIP; a client in the
// namespace writes kv over UDP, the primary is killed with SIGKILL, and
// the same address answers from the new primary.

const netDemoIP = "10.77.0.10"

// udpRetry is how long the demo's UDP client waits for a reply before it
// sends the request again (with the same id: the guest answers a retry
// from its record, never applying it twice).
const udpRetry = 50 * time.Millisecond

// networkDemo is the demo's network part on a trio of its own; without
// root or /dev/net/tun it says why in one line and returns nil.
func networkDemo(ctx context.Context, kind, memory string, plaintext bool, say func(string, ...any)) error {
	if err := labnet.Usable(); err != nil {
		say("network part skipped: %v", err)
		return nil
	}
	ln, err := labnet.Make()
	if err != nil {
		return fmt.Errorf("network part: %w", err)
	}
	defer ln.Close()
	tapA, tapB := ln.TapName(), ln.TapName()
	onBridge := func(tap string) []string { return []string{"--net", "tap:" + tap + ",bridge=" + ln.Bridge} }
	d, err := New(Config{Guest: kind, Memory: memory, Seed: uint64(time.Now().UnixNano()), Plaintext: plaintext, Clients: 1,
		NodeExtra: map[string][]string{"a": append([]string{"--guest-ip", netDemoIP + "/24"}, onBridge(tapA)...), "b": onBridge(tapB)}})
	if err != nil {
		return err
	}
	failed := true
	defer func() { // one function, in order: the nodes die before their directory goes
		d.Close()
		if failed {
			say("network part's logs kept in %s; their tails:\n%s", d.Dir(), d.LogTails())
		}
		d.Cleanup(failed)
	}()
	say("network: a bridge %s and a client namespace %s at %s; a and b each have a TAP on the bridge (%s, %s); the %s guest's card is %s",
		ln.Bridge, ln.NS, labnet.ClientIP, tapA, tapB, kind, netDemoIP)
	p, _, err := d.FreshTrio(ctx)
	if err != nil {
		return err
	}
	conn, err := ln.DialUDP(netDemoIP + ":7000")
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := netDemoFailover(ctx, d, p, conn, say); err != nil {
		return err
	}
	failed = false
	return nil
}

// netDemoFailover talks to the guest's address, kills the primary p
// under UDP load and shows the same address answering, with every
// acknowledged write.
func netDemoFailover(ctx context.Context, d *Drill, p *e2e.Node, conn *net.UDPConn, say func(string, ...any)) error {
	u := &udpKV{c: conn, id: "net"}
	for _, cmd := range []string{"SET greeting hello", "GET greeting"} {
		rep, err := u.do(ctx, cmd, 5*time.Second)
		if err != nil {
			return err
		}
		say("  client %s> UDP to %s:7000  net:%d %-20s guest> %s", labnet.ClientIP, netDemoIP, u.seq, cmd, rep)
	}
	say("each reply frame left a's TAP only after b acknowledged the epoch that produced it")
	ld := startUDPLoad(ctx, &udpKV{c: conn, id: "netload"})
	defer ld.stop()
	sleep(ctx, time.Second)
	before := ld.count()
	killAt := time.Now()
	if err := p.Kill(); err != nil {
		return err
	}
	rtt := ld.roundTripP50()
	say("SIGKILL to the primary a (%d writes acknowledged over UDP so far, round trip p50 %.1f ms)", before, rtt.Seconds()*1000)
	first, err := ld.firstAfter(ctx, killAt, FailoverLimit)
	if err != nil {
		return err
	}
	sleep(ctx, 300*time.Millisecond)
	if err := ld.stop(); err != nil {
		return err
	}
	np, _, err := d.Trio().CurrentPrimary(ctx, 5*time.Second)
	if err != nil {
		return err
	}
	say("%s runs the guest now and announced %s from its own TAP (gratuitous ARP); the client changed nothing", np.ID, netDemoIP)
	say("gap: the first reply at the same address came %d ms after the kill (the client resends every %d ms with the same id)",
		first.Sub(killAt).Milliseconds(), udpRetry.Milliseconds())
	check := &udpKV{c: conn, id: "netcheck"}
	for _, k := range ld.keys() {
		rep, err := check.do(ctx, "GET "+k, 5*time.Second)
		if err != nil {
			return err
		}
		if want := "OK v" + strings.TrimPrefix(k, "k"); rep != want {
			return fmt.Errorf("acknowledged write %s lost: GET answered %q, want %q", k, rep, want)
		}
	}
	if rep, err := check.do(ctx, "GET greeting", 5*time.Second); err != nil || rep != "OK hello" {
		return fmt.Errorf("GET greeting after the failover: %q %v", rep, err)
	}
	say("data intact: all %d writes acknowledged over UDP are there, and greeting is still hello", len(ld.keys()))
	return nil
}

// udpKV is a kv client over UDP: one request per datagram, resent with
// the same <id>:<seq> every udpRetry until its reply comes.
type udpKV struct {
	c   *net.UDPConn
	id  string
	seq uint64
}

// do sends req and returns the reply's text (without the id).
func (u *udpKV) do(ctx context.Context, req string, within time.Duration) (string, error) {
	u.seq++
	tag := fmt.Sprintf("%s:%d ", u.id, u.seq)
	msg, buf := []byte(tag+req), make([]byte, 2048)
	for deadline := time.Now().Add(within); time.Now().Before(deadline); {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		if _, err := u.c.Write(msg); err != nil {
			return "", err
		}
		u.c.SetReadDeadline(time.Now().Add(udpRetry))
		for {
			n, err := u.c.Read(buf)
			if err != nil {
				break // timeout, or ICMP refusal while nobody has the address: resend
			}
			if rest, ok := strings.CutPrefix(string(buf[:n]), tag); ok {
				return strings.TrimSuffix(rest, "\n"), nil
			}
		}
	}
	return "", fmt.Errorf("no reply to %s%s within %v", tag, req, within)
}

// udpLoad writes k1=v1, k2=v2, ... through one udpKV until stopped,
// recording when each write was acknowledged and its round trip.
type udpLoad struct {
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
	err    error

	// mu guards the records below.
	mu    sync.Mutex
	acked []string
	at    []time.Time
	rtt   []time.Duration
}

func startUDPLoad(ctx context.Context, u *udpKV) *udpLoad {
	lctx, cancel := context.WithCancel(ctx)
	ld := &udpLoad{cancel: cancel, done: make(chan error, 1)}
	go func() {
		for i := 1; ; i++ {
			k, t0 := fmt.Sprintf("k%d", i), time.Now()
			rep, err := u.do(lctx, fmt.Sprintf("SET %s v%d", k, i), FailoverLimit)
			if err != nil || rep != "OK" {
				if lctx.Err() != nil {
					err = nil // stopped
				} else if err == nil {
					err = fmt.Errorf("SET %s answered %q", k, rep)
				}
				ld.done <- err
				return
			}
			ld.mu.Lock()
			ld.acked, ld.at, ld.rtt = append(ld.acked, k), append(ld.at, time.Now()), append(ld.rtt, time.Since(t0))
			ld.mu.Unlock()
		}
	}()
	return ld
}

// stop ends the load and waits for its writer; it returns the writer's
// error (the same on every call).
func (ld *udpLoad) stop() error {
	ld.once.Do(func() {
		ld.cancel()
		ld.err = <-ld.done
	})
	return ld.err
}

func (ld *udpLoad) count() int {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return len(ld.acked)
}

func (ld *udpLoad) keys() []string {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return slices.Clone(ld.acked)
}

func (ld *udpLoad) roundTripP50() time.Duration {
	ld.mu.Lock()
	s := slices.Clone(ld.rtt)
	ld.mu.Unlock()
	if len(s) == 0 {
		return 0
	}
	slices.Sort(s)
	return s[len(s)/2]
}

// firstAfter waits (up to limit) for the first write acknowledged after
// t and returns when that was.
func (ld *udpLoad) firstAfter(ctx context.Context, t time.Time, limit time.Duration) (time.Time, error) {
	for deadline := time.Now().Add(limit); time.Now().Before(deadline); sleep(ctx, 5*time.Millisecond) {
		if err := ctx.Err(); err != nil {
			return time.Time{}, err
		}
		ld.mu.Lock()
		i := slices.IndexFunc(ld.at, func(a time.Time) bool { return a.After(t) })
		var at time.Time
		if i >= 0 {
			at = ld.at[i]
		}
		ld.mu.Unlock()
		if i >= 0 {
			return at, nil
		}
	}
	return time.Time{}, errors.New("no reply at the guest's address within " + limit.String() + " of the kill")
}
