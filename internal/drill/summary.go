package drill

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"

	"github.com/tandemvm/tandem/internal/e2e"
)

// Linearizable is a history's verdict in the JSON: true, false, "unknown"
// (the checker timed out), or null (no history was checked: the run
// failed before its load).
type Linearizable e2e.Verdict

// MarshalJSON writes true, false, "unknown" or null.
func (l Linearizable) MarshalJSON() ([]byte, error) {
	switch e2e.Verdict(l) {
	case e2e.Linearizable:
		return []byte("true"), nil
	case e2e.NotLinearizable:
		return []byte("false"), nil
	case e2e.Unknown:
		return []byte(`"unknown"`), nil
	}
	return []byte("null"), nil
}

// UnmarshalJSON reads what MarshalJSON writes.
func (l *Linearizable) UnmarshalJSON(b []byte) error {
	switch string(b) {
	case "true":
		*l = Linearizable(e2e.Linearizable)
	case "false":
		*l = Linearizable(e2e.NotLinearizable)
	case `"unknown"`:
		*l = Linearizable(e2e.Unknown)
	case "null":
		*l = ""
	default:
		return fmt.Errorf("linearizable: want true, false, \"unknown\" or null, got %s", b)
	}
	return nil
}

// column is the verdict in the table: yes, NO, ? or -.
func (l Linearizable) column() string {
	switch e2e.Verdict(l) {
	case e2e.Linearizable:
		return "yes"
	case e2e.NotLinearizable:
		return "NO"
	case e2e.Unknown:
		return "?"
	}
	return "-"
}

// RunResult is one failover run; JSON names are part of `tandem drill
// --json`.
type RunResult struct {
	Run       int     `json:"run"`
	Killed    string  `json:"killed"`
	NewPri    string  `json:"new_primary,omitempty"`
	Gen       uint64  `json:"generation,omitempty"`
	RTOMs     float64 `json:"rto_ms"`
	Acked     int     `json:"acked_writes"`
	Lost      int     `json:"lost"`
	Divergent int     `json:"divergent"`
	// Verified and Mismatches are the killed primary's replica proof.
	Verified   uint64 `json:"verified_epochs"`
	Mismatches uint64 `json:"digest_mismatches"`
	// Linearizable is the verdict on the run's kv history; Ops and
	// Pending its size (operations, of them never answered).
	Linearizable Linearizable `json:"linearizable"`
	Ops          int          `json:"history_ops"`
	Pending      int          `json:"history_pending"`
	OK           bool         `json:"ok"`
	Reason       string       `json:"reason,omitempty"`
}

// RTOSummary is the recovery time's distribution over the runs.
type RTOSummary struct {
	P50 float64 `json:"p50"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

// Summary is a drill's outcome; JSON names are part of `tandem drill
// --json`.
type Summary struct {
	Runs             int        `json:"runs"`
	Guest            string     `json:"guest"`
	Seed             uint64     `json:"seed"`
	RTOMs            RTOSummary `json:"rto_ms"`
	AckedWrites      int        `json:"acked_writes"`
	AckedWritesLost  int        `json:"acked_writes_lost"`
	DivergentReplies int        `json:"divergent_replies"`
	FailedRuns       int        `json:"failed_runs"`
	VerifiedEpochs   uint64     `json:"verified_epochs"`
	DigestMismatches uint64     `json:"digest_mismatches"`
	// Linearizable is false when some run's history was not, "unknown"
	// when none was shown not to be but some could not be decided, true
	// when every checked history was linearizable.
	Linearizable           Linearizable `json:"linearizable"`
	NonLinearizable        int          `json:"non_linearizable_runs"`
	LinearizabilityUnknown int          `json:"linearizability_unknown_runs"`
	Dir                    string       `json:"dir"`
	Results                []RunResult  `json:"results,omitempty"`
	// Scenarios: the results of --scenario, one per scenario run.
	Scenarios []ScenarioResult `json:"scenarios,omitempty"`
}

// OK says whether the drill passed: no failed run, nothing lost or
// contradicted, no digest mismatch, no history shown not linearizable.
func (s Summary) OK() bool {
	return s.FailedRuns == 0 && s.AckedWritesLost == 0 && s.DivergentReplies == 0 && s.DigestMismatches == 0 && s.NonLinearizable == 0
}

// WriteJSON writes s as one indented JSON object.
func (s Summary) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(s)
}

// Print writes the summary's closing lines (the table was written as the
// runs went).
func (s Summary) Print(w io.Writer) {
	if len(s.Scenarios) > 0 {
		printScenarios(w, s)
		return
	}
	fmt.Fprintf(w, "\n%d runs on %s (seed %d): RTO p50 %.0f ms, p99 %.0f ms, max %.0f ms; %d acknowledged writes, %d lost, %d divergent replies, %d failed runs; %d epochs verified, %d digest mismatches; %s\n",
		s.Runs, s.Guest, s.Seed, s.RTOMs.P50, s.RTOMs.P99, s.RTOMs.Max, s.AckedWrites, s.AckedWritesLost, s.DivergentReplies, s.FailedRuns, s.VerifiedEpochs, s.DigestMismatches, s.linLine())
	for _, r := range s.Results {
		if !r.OK {
			fmt.Fprintf(w, "  run %d failed: %s\n", r.Run, r.Reason)
		}
	}
}

// linLine is the summary's linearizability clause.
func (s Summary) linLine() string {
	return fmt.Sprintf("histories linearizable: %s (%d not, %d unknown)", s.Linearizable.column(), s.NonLinearizable, s.LinearizabilityUnknown)
}

// tally adds one run's writes and verdicts to the summary and returns
// the verdict as the report prints it.
func (s *Summary) tally(acked, lost, divergent int, lin Linearizable, ok bool) string {
	s.AckedWrites += acked
	s.AckedWritesLost += lost
	s.DivergentReplies += divergent
	switch e2e.Verdict(lin) {
	case e2e.NotLinearizable:
		s.NonLinearizable++
	case e2e.Unknown:
		s.LinearizabilityUnknown++
	}
	switch {
	case s.NonLinearizable > 0:
		s.Linearizable = Linearizable(e2e.NotLinearizable)
	case s.LinearizabilityUnknown > 0:
		s.Linearizable = Linearizable(e2e.Unknown)
	case lin != "" || s.Linearizable != "":
		s.Linearizable = Linearizable(e2e.Linearizable)
	}
	if !ok {
		s.FailedRuns++
		return "FAIL"
	}
	return "ok"
}

const runHeader = "%4s  %-6s  %-7s  %8s  %6s  %5s  %9s  %4s  %s\n"

// record adds r to the summary and prints its row.
func (s *Summary) record(w io.Writer, r RunResult) {
	s.Results = append(s.Results, r)
	s.VerifiedEpochs += r.Verified
	s.DigestMismatches += r.Mismatches
	ok := s.tally(r.Acked, r.Lost, r.Divergent, r.Linearizable, r.OK)
	rto := "-"
	if r.RTOMs > 0 {
		rto = strconv.FormatFloat(r.RTOMs, 'f', 0, 64)
	}
	fmt.Fprintf(w, "%4d  %-6s  %-7s  %8s  %6d  %5d  %9d  %4s  %s\n", r.Run, r.Killed, r.NewPri, rto, r.Acked, r.Lost, r.Divergent, r.Linearizable.column(), ok)
}

// percentile is the p-quantile (0..1) of sorted xs by nearest rank.
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
