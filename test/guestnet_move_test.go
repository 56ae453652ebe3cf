package test

import (
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/netlab"
)

// The guest's address moves with it on the planned paths too: a
// switchover of a raft trio and a live migration to a receiver, each
// under UDP kv load from the lab's client namespace. The client never
// changes anything: it retries each request with the same id to the
// same IP until answered. Each test proves that no acknowledged write is
// lost, that the node now running the guest is the one answering (its
// own TAP carries the replies), and reports the client's gap: its last
// reply before the handover and its first after.

// TestGuestNetworkSwitchover: `tandem switchover` hands the guest from a
// to b; b's TAP takes over the address.
func TestGuestNetworkSwitchover(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		l, tr := netTrio(t, kind)
		tr.startAll()
		tr.waitProtected("a", "b", 30*time.Second)
		c := l.DialUDP(guestNetAddr + ":7000")
		ld := startUDPLoad(t, c, gapResend)
		ld.waitAcked(50, 20*time.Second)
		sentBefore := tr.waitMember("b", 5*time.Second, "a secondary with its TAP", hasTap).Net.FramesSent

		swAt := time.Now()
		r := runCLI(t, 30*time.Second, "switchover", "--api", tr.m["a"].API)
		if r.code != 0 {
			t.Fatalf("switchover exit %d: %s%s", r.code, r.stdout, r.stderr)
		}
		swDone := time.Now()
		n := ld.Count()
		ld.waitAcked(n+50, 20*time.Second)
		ld.finish()
		last, first := ld.LongestGap(swAt, swDone)

		sb := tr.waitMember("b", 10*time.Second, "the primary running the card", func(s trioStatus) bool {
			return s.Role == "primary" && s.Net != nil && s.Net.GuestIP == guestNetAddr+"/24"
		})
		// At least the 50 replies after the switchover left through b's
		// own TAP (a secondary sends nothing).
		if got := sb.Net.FramesSent - sentBefore; got < 50 {
			t.Errorf("b's TAP sent %d frames since the switchover, want at least the 50 replies", got)
		}
		if sa, err := trioStat(tr.m["a"].API); err != nil {
			t.Error(err)
		} else if sa.Net != nil && sa.Net.GuestIP != "" {
			t.Errorf("a still runs the card (%s) after handing the guest over", sa.Net.GuestIP)
		}
		lost := checkUDPAcked(t, c, ld, "check")
		t.Logf("%s: switchover (%s) took %v; the client's gap at the same address %v (its last reply before at %+v from the command's start, the first after at %+v); %d writes acknowledged, %d lost",
			kind, strings.TrimSpace(r.stdout), swDone.Sub(swAt).Round(time.Millisecond), first.Sub(last).Round(time.Millisecond),
			last.Sub(swAt).Round(time.Millisecond), first.Sub(swAt).Round(time.Millisecond), ld.Count(), lost)
	})
}

// TestGuestNetworkMigrate: `tandem migrate` moves a `tandem run` guest
// with a card to a receiver with a TAP of its own; after the switch the
// same IP answers from the receiver, with every acknowledged write.
func TestGuestNetworkMigrate(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		l := netlab.New(t)
		args := append(guestOpts{memory: "64MiB", workload: "kv"}.args(kind),
			"--guest-ip", guestNetAddr+"/24", "--net", "tap:"+l.TapName()+",bridge="+l.Bridge)
		src := startWithPorts(t, "source-"+kind, false, args...)
		dst := startReceiver(t, "--net", "tap:"+l.TapName()+",bridge="+l.Bridge)
		c := l.DialUDP(guestNetAddr + ":7000")
		ld := startUDPLoad(t, c, gapResend)
		ld.waitAcked(50, 20*time.Second)

		migAt := time.Now()
		st := mustMigrate(t, src, dst.data, "--downtime-limit", downtimeFlag)
		migDone := time.Now()
		n := ld.Count()
		ld.waitAcked(n+50, 20*time.Second)
		ld.finish()
		last, first := ld.LongestGap(migAt, migDone)
		checkSwitchover(t, src, dst, st)

		ds, err := trioStat(dst.api)
		if err != nil {
			t.Fatal(err)
		}
		if ds.Net == nil || ds.Net.GuestIP != guestNetAddr+"/24" {
			t.Fatalf("the destination does not run the card: %+v", ds.Net)
		} else if ds.Net.FramesSent < 50 {
			t.Errorf("the destination's TAP sent %d frames, want at least the 50 replies after the switch", ds.Net.FramesSent)
		}
		lost := checkUDPAcked(t, c, ld, "check")
		t.Logf("%s: migration took %v, downtime %d ms (source's figure); the client's gap at the same address %v (first reply %v after migrate started); %d writes acknowledged, %d lost",
			kind, migDone.Sub(migAt).Round(time.Millisecond), st.DowntimeMs, first.Sub(last).Round(time.Millisecond),
			first.Sub(migAt).Round(time.Millisecond), ld.Count(), lost)
	})
}

// gapResend is how often the load of these tests resends an unanswered
// request: the resolution of the gap they measure (a request whose
// datagram met the handover is answered at its next resend). A resend
// is answered from the guest's record, so it costs a reply, not a write.
const gapResend = 5 * time.Millisecond

// hasTap: the node reports its TAP device.
func hasTap(s trioStatus) bool { return s.Net != nil && s.Net.Tap != "" }
