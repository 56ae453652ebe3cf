package test

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkFTSyncPolicy: the cost of each --sync policy on a protected kv
// guest with a disk (every SET is a disk write), beside its baseline from
// the same run: a secondary that keeps no stored image at all. Reports,
// for each of none, memory and disk: pipelined and one-client kv req/s
// and the primary's acknowledgement latency p50/p99. The secondary's data
// dir is under the worktree (the machine's real disk), not a tmpfs.
func BenchmarkFTSyncPolicy(b *testing.B) {
	skipUnlessKind(b, "synth")
	window := ftBenchWindow() / 2
	for i := 0; i < b.N; i++ {
		for _, policy := range []string{"none", "memory", "disk"} {
			root, err := os.MkdirTemp(".", ".bench-sync-")
			if err != nil {
				b.Fatal(err)
			}
			defer os.RemoveAll(root)
			root, _ = filepath.Abs(root)
			secExtra := []string{"--disk", filepath.Join(root, "sec-disk.img")}
			if policy != "none" {
				secExtra = []string{"--data-dir", filepath.Join(root, "sec"), "--sync", policy}
			}
			pri, sec, _ := startPair(b, "synth", primaryOpts{memory: "256MiB",
				extra: []string{"--disk", filepath.Join(root, "pri-disk.img")}}, secExtra...)
			time.Sleep(time.Second) // past the catch-up
			pipe := kvLoad(b, pri, kvClients(), kvDepth("synth"), window, nil)
			one := kvLoad(b, pri, 1, 1, window/2, nil)
			st := mustFT(b, pri, false)
			pri.kill()
			sec.kill()
			b.ReportMetric(pipe, policy+"-req/s")
			b.ReportMetric(one, policy+"-sync-client-req/s")
			b.ReportMetric(st.AckLatencyP99Ms, policy+"-ack-p99-ms")
			b.Logf("--sync %s: pipelined %.0f req/s, one client %.0f req/s, ack p50 %.2f p99 %.2f ms, output delay p99 %.1f ms",
				policy, pipe, one, st.AckLatencyP50Ms, st.AckLatencyP99Ms, st.OutputDelayP99Ms)
		}
	}
}
