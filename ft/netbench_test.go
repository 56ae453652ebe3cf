package ft

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/netlab"
)

// BenchmarkUDPKV: kv requests per second over UDP from a client
// namespace on a real bridge, per guest kind, unprotected (a node that
// runs the guest, frames straight to its TAP) against protected (an
// in-process pair, frames through the output gate: testEpochs' 10 ms
// clock epochs, then output-triggered epochs of at most 25 ms), measured
// in the same run. Loads: one client waiting for each reply, and
// udpClients clients at once, each waiting for its own.
func BenchmarkUDPKV(b *testing.B) {
	kinds := []string{synth.Kind}
	if kvm.Available() == nil {
		if _, err := kvm.DefaultImage(); err == nil {
			kinds = append(kinds, kvm.Kind)
		}
	}
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			for b.Loop() {
				benchUDPKV(b, kind)
			}
		})
	}
}

const (
	udpClients = 16
	udpWindow  = 3 * time.Second
)

func benchUDPKV(b *testing.B, kind string) {
	l := netlab.New(b)
	gcfg := testGuestConfig
	if kind == kvm.Kind {
		gcfg.Memory = kvm.MinMemory
	}
	gcfg.Net.IP = "10.77.0.10/24"
	plain1, plainN := func() (float64, float64) {
		g, err := BootGuest(kind, gcfg, kvm.DirtyGetLog)
		if err != nil {
			b.Fatal(err)
		}
		n := testNodeWith(b, NodeConfig{Role: "run", Net: openTap(b, l)})
		n.Start()
		n.Attach(g, gcfg)
		n.SetState("running")
		defer n.Close()
		if _, err := g.Resume(); err != nil {
			b.Fatal(err)
		}
		return udpLoad(b, l, "u", 1), udpLoad(b, l, "u", udpClients)
	}()
	clock1, clockN := protectedUDPLoad(b, l, gcfg, kind, testEpochs(), "c")
	out := testEpochs()
	out.Trigger, out.Interval = failover.TriggerOutput, 25*time.Millisecond
	out1, outN := protectedUDPLoad(b, l, gcfg, kind, out, "o")
	b.ReportMetric(plain1, "unprotected-1-req/s")
	b.ReportMetric(plainN, "unprotected-16-req/s")
	b.ReportMetric(clock1, "protected-clock-1-req/s")
	b.ReportMetric(clockN, "protected-clock-16-req/s")
	b.ReportMetric(out1, "protected-output-1-req/s")
	b.ReportMetric(outN, "protected-output-16-req/s")
	b.Logf("%s: one client: unprotected %.0f, protected %.0f (10 ms clock epochs) and %.0f req/s (output-triggered); %d clients: unprotected %.0f, protected %.0f and %.0f req/s",
		kind, plain1, clock1, out1, udpClients, plainN, clockN, outN)
}

// protectedUDPLoad starts a pair with epochs (the previous pair's members
// stop, and so free the address, at the test's end: each pair gets its
// own guest address) and runs the two loads against it.
func protectedUDPLoad(b *testing.B, l *netlab.Lab, gcfg guest.Config, kind string, epochs EpochSettings, prefix string) (float64, float64) {
	sec, sn := startMember(b, "secondary", memberOpts{coord: NewPairSecondary(""), data: true, net: openTap(b, l), epochs: &epochs})
	pri, pn := startMember(b, "primary", memberOpts{coord: NewPairPrimary(sec.cfg.Data.Addr().String(), ""),
		boot: &bootCounter{cfg: &gcfg, kind: kind}, fresh: true, net: openTap(b, l), epochs: &epochs})
	defer func() {
		pri.Stop()
		sec.Stop()
		pn.Close()
		sn.Close()
	}()
	eventually(b, "pair protected", func() bool {
		loop := pri.currentLoop()
		return loop != nil && loop.Status().Protected
	})
	return udpLoad(b, l, prefix, 1), udpLoad(b, l, prefix, udpClients)
}

// udpLoad runs clients synchronous UDP kv clients (ids prefix0, prefix1,
// ...) for udpWindow and returns the replies per second. A lost datagram
// is retried with the same id after 200 ms, as a client would.
func udpLoad(b *testing.B, l *netlab.Lab, prefix string, clients int) float64 {
	conns := make([]*net.UDPConn, clients)
	for i := range conns {
		conns[i] = l.DialUDP("10.77.0.10:7000")
		defer conns[i].Close()
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	start := time.Now()
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := udpClient(c, fmt.Sprintf("%s%d", prefix, i), start.Add(udpWindow))
			mu.Lock()
			total += n
			mu.Unlock()
		}()
	}
	wg.Wait()
	return float64(total) / time.Since(start).Seconds()
}

// udpClient sends SETs one at a time until end and counts the replies.
func udpClient(c *net.UDPConn, id string, end time.Time) int {
	buf := make([]byte, 2048)
	done := 0
	for seq := 1; time.Now().Before(end); seq++ {
		req := fmt.Sprintf("%s:%d SET k%d v%d", id, seq, seq%1000, seq)
		want := fmt.Sprintf("%s:%d ", id, seq)
		for answered := false; !answered && time.Now().Before(end); {
			c.Write([]byte(req))
			c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			for {
				n, err := c.Read(buf)
				if err != nil {
					break
				}
				if strings.HasPrefix(string(buf[:n]), want) {
					answered = true
					done++
					break
				}
			}
		}
	}
	return done
}
