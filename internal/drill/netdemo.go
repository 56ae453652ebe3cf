package drill

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
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
	u := &e2e.UDPKV{Conn: conn, Client: "net", Retry: udpRetry}
	for _, cmd := range []string{"SET greeting hello", "GET greeting"} {
		rep, err := u.Do(ctx, cmd, 5*time.Second)
		if err != nil {
			return err
		}
		say("  client %s> UDP to %s:7000  net:%d %-20s guest> %s", labnet.ClientIP, netDemoIP, u.Seq(), cmd, rep)
	}
	say("each reply frame left a's TAP only after b acknowledged the epoch that produced it")
	ld := e2e.StartUDPLoad(ctx, &e2e.UDPKV{Conn: conn, Client: "netload", Retry: udpRetry}, FailoverLimit)
	defer ld.Stop()
	sleep(ctx, time.Second)
	before := ld.Count()
	killAt := time.Now()
	if err := p.Kill(); err != nil {
		return err
	}
	rtt := ld.RoundTripP50()
	say("SIGKILL to the primary a (%d writes acknowledged over UDP so far, round trip p50 %.1f ms)", before, rtt.Seconds()*1000)
	first, err := firstAckAfter(ctx, ld, killAt, FailoverLimit)
	if err != nil {
		return err
	}
	sleep(ctx, 300*time.Millisecond)
	if err := ld.Stop(); err != nil {
		return err
	}
	np, _, err := d.Trio().CurrentPrimary(ctx, 5*time.Second)
	if err != nil {
		return err
	}
	say("%s runs the guest now and announced %s from its own TAP (gratuitous ARP); the client changed nothing", np.ID, netDemoIP)
	say("gap: the first reply at the same address came %d ms after the kill (the client resends every %d ms with the same id)",
		first.Sub(killAt).Milliseconds(), udpRetry.Milliseconds())
	check := &e2e.UDPKV{Conn: conn, Client: "netcheck", Retry: udpRetry}
	for _, k := range ld.Keys() {
		rep, err := check.Do(ctx, "GET "+k, 5*time.Second)
		if err != nil {
			return err
		}
		if want := "OK v" + strings.TrimPrefix(k, "k"); rep != want {
			return fmt.Errorf("acknowledged write %s lost: GET answered %q, want %q", k, rep, want)
		}
	}
	if rep, err := check.Do(ctx, "GET greeting", 5*time.Second); err != nil || rep != "OK hello" {
		return fmt.Errorf("GET greeting after the failover: %q %v", rep, err)
	}
	say("data intact: all %d writes acknowledged over UDP are there, and greeting is still hello", len(ld.Keys()))
	return nil
}

// firstAckAfter waits (up to limit) for the load's first write
// acknowledged after t and returns when that was.
func firstAckAfter(ctx context.Context, ld *e2e.UDPLoad, t time.Time, limit time.Duration) (time.Time, error) {
	for deadline := time.Now().Add(limit); time.Now().Before(deadline); sleep(ctx, 5*time.Millisecond) {
		if err := ctx.Err(); err != nil {
			return time.Time{}, err
		}
		if at := ld.FirstAckAfter(t); !at.IsZero() {
			return at, nil
		}
	}
	return time.Time{}, errors.New("no reply at the guest's address within " + limit.String() + " of the kill")
}
