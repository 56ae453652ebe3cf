package test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// pcWriter writes key<i> = v<i> on a console until stop is closed or a
// request goes unanswered (the source paused for the switch), and keeps
// the keys whose writes were acknowledged.
type pcWriter struct {
	c     *console
	acked []int
}

func (w *pcWriter) run(stop <-chan struct{}, from int) {
	for i := from; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		w.c.seq++
		r, err := w.c.requestSeq(w.c.seq, fmt.Sprintf("SET key%d v%d", i, i), 3*time.Second)
		if err != nil {
			return
		}
		if r == "OK" {
			w.acked = append(w.acked, i)
		}
	}
}

// A kv guest under load migrates with --postcopy over loopback, switched
// after one round (the default) and before any (0): every write the
// client saw acknowledged is on the destination, the source's output
// says the destination's switch-over digest (taken as the last page
// arrived) equals its own, the destination served faults by post-copy,
// and the client goes on there.
func TestMigratePostcopyKV(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		for _, rounds := range []string{"1", "0"} {
			t.Run("after-"+rounds, func(t *testing.T) { testPostcopyKV(t, kind, rounds) })
		}
	})
}

func testPostcopyKV(t *testing.T, kind, rounds string) {
	src := startSource(t, kind, guestOpts{workload: "kv", vcpus: 2})
	dst := startReceiver(t)
	w := &pcWriter{c: dialConsole(t, src, "w")}
	for i := range 300 {
		if r := w.c.do(fmt.Sprintf("SET key%d v%d", i, i)); r != "OK" {
			t.Fatalf("SET key%d: %q", i, r)
		}
		w.acked = append(w.acked, i)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { w.run(stop, 300) })
	time.Sleep(200 * time.Millisecond) // load before the migration starts
	r, st := migrate(t, src, dst.data, "--postcopy", "--postcopy-after-rounds", rounds, "--downtime-limit", downtimeFlag)
	close(stop)
	wg.Wait()
	if r.code != 0 || st.Status != "completed" {
		t.Fatalf("migrate exit %d, status %q\nstdout:\n%s\nstderr:\n%s", r.code, st.Status, r.stdout, r.stderr)
	}
	if st.SwitchoverDigest == "" || st.DestinationDigest != st.SwitchoverDigest {
		t.Errorf("source output: destination digest %q, source's %q", st.DestinationDigest, st.SwitchoverDigest)
	}
	if st.PostcopyPages == 0 || st.PostcopyRefused != "" {
		t.Errorf("source output: %d pages owed at the switch, refused %q: want a post-copy switch", st.PostcopyPages, st.PostcopyRefused)
	}
	ss, ds := mustStatus(t, src), mustStatus(t, dst)
	if !ss.Paused || ds.State != "running" || ds.Paused {
		t.Errorf("source paused %v; destination state %q paused %v", ss.Paused, ds.State, ds.Paused)
	}
	if ds.PostcopyActive || ds.PostcopyRemainingPages != 0 {
		t.Errorf("destination: post-copy still active (%d pages remaining) after the source completed", ds.PostcopyRemainingPages)
	}
	d := &pcWriter{c: dialConsole(t, dst, "w")}
	d.c.seq = w.c.seq + 1 // past a request the source never answered
	for _, i := range w.acked {
		if got := d.c.do(fmt.Sprintf("GET key%d", i)); got != fmt.Sprintf("OK v%d", i) {
			t.Fatalf("destination GET key%d = %q, want the acknowledged v%d", i, got, i)
		}
	}
	// The client goes on, on the destination.
	for i := range 50 {
		if got := d.c.do(fmt.Sprintf("SET after%d x", i)); got != "OK" {
			t.Fatalf("destination SET after%d: %q", i, got)
		}
	}
	t.Logf("%s after %s rounds: %d writes acknowledged (%d under load), %d pages owed at the switch, %d requested by faults (destination %d, blocked ms per vCPU %v); downtime %d ms, total %d ms",
		kind, rounds, len(w.acked), len(w.acked)-300, st.PostcopyPages, st.PostcopyRequests, ds.PostcopyRequests, ds.PostcopyBlocktimeMs, st.DowntimeMs, st.TotalTimeMs)
	if strings.Contains(r.stderr, "refused") {
		t.Errorf("stderr: %s", r.stderr)
	}
}
