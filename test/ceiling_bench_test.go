package test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

// BenchmarkCeiling: the downtime limit as a ceiling (issue 11 item 7) on
// the guest (1 GiB, 512 MiB touched, 300 ms limit, default
// compression): the old best case (zero fill, 8-byte writes) at 10,000
// pages/s, where the issue saw 339 and 436 ms, and random memory with
// whole-page random rewrites at 10,000 and 25,000 pages/s. Reports the
// mean and the largest downtime over the runs, and logs every attempt's
// expected and actual downtime.
func BenchmarkCeiling(b *testing.B) {
	cases := []struct {
		name    string
		rate    int
		profile []string
	}{
		{"zero-10k", 10000, nil},
		{"random-4k-writes-10k", 10000, []string{"--fill", "random", "--write-bytes", "4096", "--write-data", "random"}},
		{"random-4k-writes-25k", 25000, []string{"--fill", "random", "--write-bytes", "4096", "--write-data", "random"}},
	}
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			skipUnlessKind(b, kind)
			for _, c := range cases {
				b.Run(c.name, func(b *testing.B) {
					var sum, worst float64
					for i := 0; i < b.N; i++ {
						src := startWithPorts(b, "source-"+kind, false, profileArgs(kind, "1GiB", "512MiB", fmt.Sprint(c.rate), c.profile...)...)
						dst := startReceiver(b)
						waitWorkload(b, src, 512<<20)
						if c.profile != nil {
							time.Sleep(5 * time.Second) // generated fills take longer than one store per page, most in the micro-guest
						}
						r, st := migrate(b, src, dst.data, "--downtime-limit", downtimeFlag, "--max-time", "5m")
						if r.code != 0 || st.Status != "completed" {
							b.Fatalf("migrate exit %d, status %q\n%s", r.code, st.Status, r.stderr)
						}
						var full struct {
							Attempts []attemptReport `json:"attempts"`
						}
						if j := strings.Index(r.stdout, "\n{"); j >= 0 {
							_ = json.Unmarshal([]byte(r.stdout[j+1:]), &full)
						}
						var atts []string
						for _, a := range full.Attempts {
							atts = append(atts, fmt.Sprintf("[expected %.0f ms; final sync %d pages, expected %.0f ms; actual %.0f ms; %s]",
								a.ExpectedDowntimeMs, a.FinalPages, a.FinalExpectedMs, a.ActualDowntimeMs, a.Outcome))
						}
						b.Logf("%s %s: total %d ms, downtime %d ms, wire %.1f MiB, throttle %d%%; attempts %s", kind, c.name,
							st.TotalTimeMs, st.DowntimeMs, float64(st.TransferredBytes)/(1<<20), ptrInt(st.ThrottlePercent), strings.Join(atts, " "))
						sum += float64(st.DowntimeMs)
						worst = max(worst, float64(st.DowntimeMs))
						src.kill()
						dst.kill()
					}
					b.ReportMetric(sum/float64(b.N), "downtime-ms")
					b.ReportMetric(worst, "max-downtime-ms")
				})
			}
		})
	}
}
