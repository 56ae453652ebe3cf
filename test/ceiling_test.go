package test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// attemptReport mirrors api.CompletionAttempt.
type attemptReport struct {
	ExpectedDowntimeMs float64 `json:"expected_downtime_ms"`
	FinalPages         uint64  `json:"final_pages"`
	FinalExpectedMs    float64 `json:"final_expected_ms"`
	ActualDowntimeMs   float64 `json:"actual_downtime_ms"`
	FinalSendMs        float64 `json:"final_send_ms"`
	Outcome            string  `json:"outcome"`
}

// TestMigrateCeiling: the downtime limit is a ceiling (issue 11 item 7),
// at several dirty rates, with and without compression, on incompressible
// memory rewritten a whole page at a time (the case where predictions
// built on round 0's compressible pages went wrong): every migration ends
// within the limit plus the tolerance every test allows, and reports each
// attempt with the downtime it expected and the one it got.
func TestMigrateCeiling(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind string) {
		for _, rate := range []int{2000, 25000} {
			for _, comp := range []string{"none", "default"} {
				t.Run(fmt.Sprintf("%d-pages-s/%s", rate, comp), func(t *testing.T) {
					src := startWithPorts(t, "source-"+kind, false, profileArgs(kind, "256MiB", "64MiB", fmt.Sprint(rate),
						"--fill", "random", "--write-bytes", "4096", "--write-data", "random")...)
					dst := startReceiver(t)
					waitWorkload(t, src, 64<<20)
					r, st := migrate(t, src, dst.data, "--downtime-limit", downtimeFlag, "--compression", comp)
					if r.code != 0 || st.Status != "completed" {
						t.Fatalf("migrate exit %d, status %q\n%s", r.code, st.Status, r.stderr)
					}
					var full struct {
						Attempts []attemptReport `json:"attempts"`
					}
					if i := strings.Index(r.stdout, "\n{"); i >= 0 {
						if err := json.Unmarshal([]byte(r.stdout[i+1:]), &full); err != nil {
							t.Fatal(err)
						}
					}
					checkDowntime(t, st)
					if n := len(full.Attempts); n == 0 || full.Attempts[n-1].Outcome != "completed" {
						t.Fatalf("attempts %+v: want the last one completed", full.Attempts)
					}
					for i, a := range full.Attempts {
						t.Logf("attempt %d: expected %.0f ms, final sync left %d pages (expected %.0f ms), actual %.0f ms, final send %.0f ms: %s",
							i+1, a.ExpectedDowntimeMs, a.FinalPages, a.FinalExpectedMs, a.ActualDowntimeMs, a.FinalSendMs, a.Outcome)
					}
				})
			}
		}
	})
}
