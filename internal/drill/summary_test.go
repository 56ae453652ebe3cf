package drill

import (
	"bytes"
	"encoding/json"
	"io"
	"strings"
	"testing"

	"github.com/tandemvm/tandem/internal/e2e"
)

func TestPercentile(t *testing.T) {
	xs := []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	for _, c := range []struct{ p, want float64 }{{0.5, 5}, {0.99, 10}, {0, 1}, {1, 10}} {
		if got := percentile(xs, c.p); got != c.want {
			t.Errorf("p%v = %v, want %v", c.p, got, c.want)
		}
	}
	if percentile(nil, 0.5) != 0 {
		t.Error("empty percentile not 0")
	}
}

// TestSummaryLinearizable: the summary's verdict is false once a run's
// is, unknown while none is false and some unknown, and a history shown
// not linearizable fails the drill while an unknown one does not.
func TestSummaryLinearizable(t *testing.T) {
	yes, no, unk := Linearizable(e2e.Linearizable), Linearizable(e2e.NotLinearizable), Linearizable(e2e.Unknown)
	cases := []struct {
		runs []Linearizable
		want string
		ok   bool
	}{
		{[]Linearizable{yes, yes}, "true", true},
		{[]Linearizable{yes, "", yes}, "true", true},
		{[]Linearizable{""}, "null", true},
		{[]Linearizable{yes, unk}, `"unknown"`, true},
		{[]Linearizable{unk, no, yes}, "false", false},
	}
	for _, c := range cases {
		var s Summary
		for i, l := range c.runs {
			s.record(io.Discard, RunResult{Run: i + 1, Linearizable: l, OK: l != no})
		}
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		var got struct {
			Lin     json.RawMessage   `json:"linearizable"`
			Results []json.RawMessage `json:"results"`
		}
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatal(err)
		}
		if string(got.Lin) != c.want || s.OK() != c.ok {
			t.Errorf("runs %v: summary linearizable %s ok %v, want %s %v", c.runs, got.Lin, s.OK(), c.want, c.ok)
		}
		var back Summary
		if err := json.Unmarshal(b, &back); err != nil || back.Linearizable != s.Linearizable || len(back.Results) != len(c.runs) {
			t.Errorf("runs %v: round trip %v %v", c.runs, back.Linearizable, err)
		}
	}
}

func TestPickScenarios(t *testing.T) {
	scs, err := PickScenarios("w-s, p-w/p-first")
	if err != nil || len(scs) != 3 || scs[2].Name != "p-w/p-first" {
		t.Fatalf("%v %v", scs, err)
	}
	if all, _ := PickScenarios("all"); len(all) != len(Scenarios) {
		t.Fatalf("all: %d scenarios", len(all))
	}
	if _, err := PickScenarios("x-y"); err == nil || !strings.Contains(err.Error(), `"x-y"`) {
		t.Fatalf("unknown name: %v", err)
	}
}

func TestRunRowShowsTheVerdict(t *testing.T) {
	var b bytes.Buffer
	var s Summary
	s.record(&b, RunResult{Run: 1, Killed: "a", NewPri: "b", RTOMs: 812, Acked: 10, Linearizable: Linearizable(e2e.NotLinearizable)})
	if !strings.Contains(b.String(), " NO  FAIL") {
		t.Fatalf("row %q", b.String())
	}
}

// TestJSONNames pins the names of `tandem drill --json`: scripts read
// them.
func TestJSONNames(t *testing.T) {
	s := Summary{Results: []RunResult{{Reason: "x", NewPri: "b", Gen: 2}}, Scenarios: []ScenarioResult{{Reason: "x", Primary: "a", Gen: 1, Waiting: []string{"w"}}}}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Top       map[string]json.RawMessage
		Results   []map[string]json.RawMessage `json:"results"`
		Scenarios []map[string]json.RawMessage `json:"scenarios"`
	}
	if err := json.Unmarshal(b, &got.Top); err != nil {
		t.Fatal(err)
	}
	json.Unmarshal(b, &got)
	check := func(what string, m map[string]json.RawMessage, names string) {
		for _, n := range strings.Fields(names) {
			if _, ok := m[n]; !ok {
				t.Errorf("%s: no %q in %s", what, n, b)
			}
		}
		if len(m) != len(strings.Fields(names)) {
			t.Errorf("%s: %d names, want %d (a new name belongs in this test)", what, len(m), len(strings.Fields(names)))
		}
	}
	check("summary", got.Top, "runs guest seed rto_ms acked_writes acked_writes_lost divergent_replies failed_runs verified_epochs digest_mismatches linearizable non_linearizable_runs linearizability_unknown_runs dir results scenarios")
	check("run", got.Results[0], "run killed new_primary generation rto_ms acked_writes lost divergent verified_epochs digest_mismatches linearizable history_ops history_pending ok reason")
	check("scenario", got.Scenarios[0], "run scenario stopped returned primary generation outage_ms reply_after_first_return_ms serve_after_last_return_ms acked_writes acked_writes_between lost divergent served two_primaries_samples waiting_reasons linearizable history_ops history_pending ok reason")
}
