package failover

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// TestTriggeredFailoverLosesNoAcknowledgedWrite is issue 17's drill: a
// synchronous kv client on the console of a primary with output-triggered
// epochs, each SET to its own key; the primary stops dead (no final
// epoch) while the client runs, the secondary's committed image is
// activated, and every SET whose reply the client saw must be there with
// its value. A reply released before its epoch was acknowledged would
// show up as a missing key whenever the crash falls in between.
func TestTriggeredFailoverLosesNoAcknowledgedWrite(t *testing.T) {
	for _, kind := range pairKinds(t) {
		t.Run(kind, func(t *testing.T) {
			cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
			c := newKVConsole("w", nil)
			p := startTestPair(t, kind, cfg, EpochConfig{Verify: true, Trigger: TriggerOutput, Release: c.sink})
			defer p.stop()
			c.con = p.g.Console()
			waitFor(t, 30*time.Second, "protection", func() bool { return p.loop.Status().Protected })

			// The client runs until a reply does not come (the crash).
			var ackedN atomic.Uint64
			done := make(chan struct{})
			go func() {
				defer close(done)
				for seq := uint64(1); ; seq++ {
					if err := c.send(fmt.Sprintf("w:%d SET k%d v%d\n", seq, seq, seq)); err != nil {
						return
					}
					if err := c.waitReplies(seq, time.Second); err != nil {
						return
					}
					ackedN.Store(seq)
				}
			}()
			// At least 700 ms of writes and 20 acknowledged (a loaded host
			// answers fewer per second), then the crash.
			time.Sleep(700 * time.Millisecond)
			waitFor(t, 20*time.Second, "20 acknowledged writes", func() bool { return ackedN.Load() >= 20 })
			p.cancel() // the primary stops dead: held output never leaves
			p.wg.Wait()
			<-done
			acked := ackedN.Load()
			st := p.loop.Status()
			if acked < 20 {
				t.Fatalf("only %d writes acknowledged before the crash", acked)
			}
			t.Logf("%d writes acknowledged; %d epochs by output, %d by clock; output delay p50 %.2f p99 %.2f ms",
				acked, st.EpochsByOutput, st.EpochsByClock, st.OutputDelayP50Ms, st.OutputDelayP99Ms)
			if st.EpochsByOutput == 0 {
				t.Error("no epoch was triggered by output")
			}

			g2, _, _, err := p.sec.Activate()
			if err != nil {
				t.Fatalf("activate the secondary: %v", err)
			}
			defer g2.Close()
			var mu sync.Mutex
			var out bytes.Buffer
			g2.Console().SetOutput(func(b []byte) { mu.Lock(); out.Write(b); mu.Unlock() })
			if _, err := g2.Resume(); err != nil {
				t.Fatal(err)
			}
			var req strings.Builder
			for seq := uint64(1); seq <= acked; seq++ {
				fmt.Fprintf(&req, "r:%d GET k%d\n", seq, seq)
			}
			if err := g2.Console().Input([]byte(req.String())); err != nil {
				t.Fatal(err)
			}
			// Only the reader's replies: the replica may also say what its
			// guest had still to say (the reply to the write the crash
			// cut off, w:acked+1), which no client has seen.
			replies := func() []string {
				mu.Lock()
				defer mu.Unlock()
				var rs []string
				for _, l := range strings.Split(out.String(), "\n") {
					if strings.HasPrefix(l, "r:") {
						rs = append(rs, l)
					}
				}
				return rs
			}
			waitFor(t, 20*time.Second, "the replica's answers", func() bool { return uint64(len(replies())) >= acked })
			for i, line := range replies()[:acked] {
				want := fmt.Sprintf("r:%d OK v%d", i+1, i+1)
				if strings.TrimSpace(line) != want {
					t.Errorf("acknowledged write %d lost on the replica: %q, want %q", i+1, line, want)
				}
			}
		})
	}
}
