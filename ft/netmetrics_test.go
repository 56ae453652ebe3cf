package ft

import (
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/netlab"
	"github.com/tandemvm/tandem/replica"
)

// metricValue is the value of the sample line of name (labels included,
// e.g. `tandem_net_tap_frames_total{dir="sent"}`); -1 when absent.
func metricValue(t *testing.T, body, name string) float64 {
	t.Helper()
	for _, l := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", l, err)
			}
			return f
		}
	}
	return -1
}

// A protected primary's /metrics follow real UDP traffic through its
// TAP and output gate: frames held while an acknowledgement is delayed,
// then released; the frames' output delays and per-epoch counts in
// their histograms; the device's and the card's counts, drops included,
// equal to what status says.
func TestNetMetricsFollowTraffic(t *testing.T) {
	l := netlab.New(t)
	gcfg := testGuestConfig
	gcfg.Net.IP = "10.77.0.10/24"
	sec, ns := startMember(t, "secondary", memberOpts{coord: NewPairSecondary(""), data: true, net: openTap(t, l)})
	pri, np := startMember(t, "primary", memberOpts{coord: NewPairPrimary(sec.cfg.Data.Addr().String(), ""),
		boot: &bootCounter{cfg: &gcfg}, fresh: true, net: openTap(t, l)})
	eventually(t, "pair protected", func() bool {
		loop := pri.currentLoop()
		return loop != nil && loop.Status().Protected
	})
	before := scrape(t, np.api)
	for _, name := range []string{`tandem_net_frames_released_total`, `tandem_net_tap_frames_total{dir="sent"}`} {
		if v := metricValue(t, before, name); v < 0 {
			t.Fatalf("%s missing before any traffic", name)
		}
	}
	// The announcements of a primary that booted its guest.
	eventually(t, "five announcements counted", func() bool {
		return metricValue(t, scrape(t, np.api), "tandem_net_announcements_total") == announceCount
	})

	c := l.DialUDP("10.77.0.10:7000")
	const requests = 10
	for i := 1; i <= requests; i++ {
		req := "m:" + strconv.Itoa(i) + " SET k v"
		if got, _ := udpKV(t, c, req, 5*time.Second); !strings.HasSuffix(got, " OK\n") {
			t.Fatalf("%s: %q", req, got)
		}
	}
	// A datagram to a port the guest does not serve: the card drops it.
	other := l.DialUDP("10.77.0.10:7001")
	other.Write([]byte("nobody listens here"))
	heldReply(t, np, c)

	// Traffic has stopped (the client sends nothing more; a late ARP or
	// a neighbour's multicast can still arrive, hence eventually): the
	// metrics and status say the same.
	eventually(t, "metrics equal status", func() bool { return metricsEqualStatus(t, np) })
	checkMoved(t, before, scrape(t, np.api), requests)
	// A secondary runs no card and has no gate: only its device counts.
	sbody := scrape(t, ns.api)
	if metricValue(t, sbody, `tandem_net_tap_frames_total{dir="received"}`) < 0 || metricValue(t, sbody, "tandem_net_frames_released_total") >= 0 ||
		metricValue(t, sbody, `tandem_net_card_frames_total{what="datagrams"}`) >= 0 {
		t.Errorf("the secondary's net metrics: device counts must be there, card and gate ones absent")
	}
}

// heldReply delays the secondary's acknowledgements 400 ms and sends one
// request on c: its reply frame is held (the held gauge shows it), comes
// once its epoch was acknowledged, and the gauge returns to zero.
func heldReply(t *testing.T, np *Node, c *net.UDPConn) {
	t.Helper()
	disable := replica.FPBeforeAck.Enable(func() error { time.Sleep(400 * time.Millisecond); return nil })
	t.Cleanup(disable) // disarmed even if the test fails first; a second call is harmless
	c.Write([]byte("m:100 SET k v"))
	eventually(t, "a frame held for its epoch", func() bool {
		return metricValue(t, scrape(t, np.api), "tandem_net_frames_held") >= 1
	})
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2048)
	if n, err := c.Read(buf); err != nil || !strings.HasPrefix(string(buf[:n]), "m:100 OK") {
		t.Fatalf("the held request's reply: %q, %v", buf[:n], err)
	}
	disable()
	eventually(t, "the held frame released", func() bool {
		return metricValue(t, scrape(t, np.api), "tandem_net_frames_held") == 0
	})
}

// metricsEqualStatus reports whether np's net metrics (device, card,
// gate and drop counts) equal its status's.
func metricsEqualStatus(t *testing.T, np *Node) bool {
	t.Helper()
	body, st := scrape(t, np.api), np.status(false).Net
	if st == nil || st.FramesReleased == nil {
		t.Fatal("the primary's status has no net or no gate figures")
	}
	var dropped uint64
	for _, d := range []uint64{st.Dropped.Short, st.Dropped.TooLong, st.Dropped.BadLength, st.Dropped.BadChecksum,
		st.Dropped.Fragment, st.Dropped.Unsupported, st.Dropped.NotOurs, st.Dropped.QueueFull} {
		dropped += d
	}
	var mdropped float64
	for _, r := range []string{"short", "too_long", "bad_length", "bad_checksum", "fragment", "unsupported", "not_ours", "queue_full"} {
		mdropped += metricValue(t, body, `tandem_net_card_frames_dropped_total{reason="`+r+`"}`)
	}
	return metricValue(t, body, `tandem_net_tap_frames_total{dir="sent"}`) == float64(st.FramesSent) &&
		metricValue(t, body, `tandem_net_tap_frames_total{dir="received"}`) == float64(st.FramesReceived) &&
		metricValue(t, body, `tandem_net_card_frames_total{what="datagrams"}`) == float64(st.Datagrams) &&
		metricValue(t, body, "tandem_net_frames_released_total") == float64(*st.FramesReleased) &&
		mdropped == float64(dropped)
}

// checkMoved checks the primary's metrics moved with the traffic between
// the scrapes before and after: requests answered, one held reply, one
// datagram dropped, and a frame delay over 250 ms.
func checkMoved(t *testing.T, before, after string, requests float64) {
	t.Helper()
	moved := func(name string, least float64) {
		t.Helper()
		if d := metricValue(t, after, name) - max(metricValue(t, before, name), 0); d < least {
			t.Errorf("%s moved by %v with the traffic, want at least %v", name, d, least)
		}
	}
	moved("tandem_net_frames_released_total", requests+1)
	moved(`tandem_net_tap_frames_total{dir="sent"}`, requests+1)
	moved(`tandem_net_tap_frames_total{dir="delivered"}`, requests+2)
	moved(`tandem_net_card_frames_total{what="datagrams"}`, requests+1)
	moved(`tandem_output_delay_seconds_count{kind="frame"}`, requests+1)
	moved("tandem_net_epoch_frames_count", 1)
	if v := metricValue(t, after, `tandem_net_card_frames_dropped_total{reason="not_ours"}`) +
		metricValue(t, after, `tandem_net_card_frames_dropped_total{reason="unsupported"}`); v < 1 {
		t.Errorf("the datagram to port 7001 was not counted as a drop (not_ours + unsupported = %v)", v)
	}
	// The held reply waited for its delayed acknowledgement: at least
	// one frame's delay is in the buckets above 250 ms.
	if slow := metricValue(t, after, `tandem_output_delay_seconds_count{kind="frame"}`) -
		metricValue(t, after, `tandem_output_delay_seconds_bucket{kind="frame",le="0.25"}`); slow < 1 {
		t.Errorf("no frame delay over 250 ms recorded, though one reply waited 400 ms for its acknowledgement")
	}
}
