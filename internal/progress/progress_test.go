package progress

import (
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/precopy"
)

func TestNeverBackwards(t *testing.T) {
	var tr Tracker
	t0 := time.Unix(0, 0)
	// Round 0, no rate yet: no ETA.
	if _, _, ok := tr.Observe(Sample{At: t0, Total: 1000}); ok {
		t.Fatal("an ETA before any rate")
	}
	p1, e1, ok := tr.Observe(Sample{At: t0.Add(time.Second), Transferred: 400, Remaining: 600, Total: 1000, Mbps: 8e-6 * 100})
	if !ok || p1 != 40 || e1 != 6*time.Second {
		t.Fatalf("p %v eta %v ok %v", p1, e1, ok)
	}
	// The guest dirtied pages: remaining grew, the rate fell. Neither the
	// percentage nor the ETA goes backwards.
	p2, e2, _ := tr.Observe(Sample{At: t0.Add(2 * time.Second), Transferred: 500, Remaining: 900, Total: 1000, Mbps: 8e-6 * 50})
	if p2 < p1 || e2 > e1-time.Second {
		t.Fatalf("backwards: p %v -> %v, eta %v -> %v", p1, p2, e1, e2)
	}
	if p, e, _ := tr.Observe(Sample{At: t0.Add(3 * time.Second), Done: true}); p != 100 || e != 0 {
		t.Fatalf("done: %v %v", p, e)
	}
	if DowntimeVerdict(301*time.Millisecond, 300*time.Millisecond) == "" || DowntimeVerdict(300*time.Millisecond, 300*time.Millisecond) != "" {
		t.Fatal("downtime verdict")
	}
}

func TestFormat(t *testing.T) {
	if l := Line(precopy.MigrationStatus{Status: "active"}); !strings.Contains(l, "remaining=? ") {
		t.Errorf("round 0 before a measure: %q", l)
	}
	if got := HumanBytes(3 << 20); got != "3.0MiB" {
		t.Errorf("HumanBytes: %q", got)
	}
	var b strings.Builder
	s := precopy.MigrationStatus{Status: precopy.StatusCompleted, DowntimeMs: 500, Outcome: "committed", Error: "late"}
	WriteSummary(&b, s, 300*time.Millisecond)
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 4 || !strings.Contains(lines[3], "DOWNTIME OVER THE LIMIT") || !strings.Contains(lines[1], "outcome: committed") {
		t.Errorf("summary:\n%s", b.String())
	}
}

// A post-copy summary says what switched it and the switch's pause,
// expected and actual.
func TestSummaryPostcopySwitch(t *testing.T) {
	var b strings.Builder
	s := precopy.MigrationStatus{Status: precopy.StatusCompleted, PostcopyPages: 9, PostcopySwitchReason: precopy.SwitchController,
		PostcopySwitchWhy: "the dirty set stopped shrinking",
		Attempts:          []api.CompletionAttempt{{ExpectedDowntimeMs: 12, FinalExpectedMs: 11.5, ActualDowntimeMs: 14.25, Outcome: "post-copy switch"}}}
	WriteSummary(&b, s, 300*time.Millisecond)
	for _, want := range []string{"switched to post-copy (controller): the dirty set stopped shrinking",
		"switch pause: expected 12.0 ms (11.5 ms after the final sync), actual 14.2 ms: post-copy switch"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("summary lacks %q:\n%s", want, b.String())
		}
	}
}
