package etcdcoord

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// serverMessages is how many gRPC calls the test's etcd members have
// seen started by clients: every unary request and every stream (a
// keepalive is a stream of one request; etcd's msg_received counter
// counts its end as a second message). Every member of the process
// counts into the default registry; peer traffic is HTTP, not counted.
func serverMessages(t *testing.T) float64 {
	t.Helper()
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "grpc_server_started_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			n += m.GetCounter().GetValue()
		}
	}
	return n
}

// TestSteadyStateLoad measures what one protected guest asks of etcd in
// steady state: a primary whose secondary acknowledges an epoch every
// 25 ms (the default --epoch) and heartbeats, and its secondary. It
// counts on both sides (the coordinators' own count of requests and
// stream messages, and etcd's gRPC counter of calls started) and
// fails if they disagree by more than a fifth or if a guest costs more
// than 20 requests/s (2 lease renewals per node per second and the
// committed epoch's record every 100 ms: 14/s expected).
// ETCD_LOAD_SECONDS sets the window (default 2 s). It runs alone (not in
// parallel): etcd's counter is shared by every member in the process.
func TestSteadyStateLoad(t *testing.T) {
	ec := startEtcd(t)
	a, b := protectedPair(t, t.TempDir(), "g1", ec.Endpoints(), ec.Endpoints())
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		tk := time.NewTicker(25 * time.Millisecond)
		defer tk.Stop()
		for e := uint64(6); ; e++ {
			select {
			case <-stop:
				return
			case <-tk.C:
				a.ReportEpoch(e)
				a.DataHeartbeat()
			}
		}
	}()
	defer func() { close(stop); <-done }()
	time.Sleep(500 * time.Millisecond) // past the start's registrations
	window := 2 * time.Second
	if s := os.Getenv("ETCD_LOAD_SECONDS"); s != "" {
		d, err := time.ParseDuration(strings.TrimSpace(s) + "s")
		if err != nil {
			t.Fatal(err)
		}
		window = d
	}
	c0, s0 := a.Requests()+b.Requests(), serverMessages(t)
	start := time.Now()
	time.Sleep(window)
	el := time.Since(start).Seconds()
	c1, s1 := a.Requests()+b.Requests(), serverMessages(t)
	client, server := float64(c1-c0)/el, (s1-s0)/el
	t.Logf("steady state, one protected guest: %.1f etcd requests/s counted by the nodes (primary %d, secondary %d in total), %.1f/s received by etcd; record at epoch %d",
		client, a.Requests(), b.Requests(), server, a.State().Epoch)
	if server > 0 && (client > 1.2*server || server > 1.2*client) {
		t.Errorf("the nodes count %.1f requests/s, etcd %.1f", client, server)
	}
	if client > 20 || client < 5 {
		t.Errorf("%.1f requests/s per guest, want 5 to 20", client)
	}
}
