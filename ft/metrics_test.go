package ft

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
)

// roleMetricNames are the metrics every role exports (issue 20).
var roleMetricNames = []string{
	"tandem_role", "tandem_protected", "tandem_generation", "tandem_secondary_lag_epochs",
	"tandem_quorum_voters_reachable", "tandem_failovers_total", "tandem_fences_total",
	"tandem_epochs_total", "tandem_digest_mismatches_total", "tandem_epoch_throttle_percent",
}

// scrape answers GET /metrics of an API server, in process.
func scrape(t *testing.T, a *APIServer) string {
	t.Helper()
	rec := httptest.NewRecorder()
	a.mux.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("GET /metrics: %d", rec.Code)
	}
	b, _ := io.ReadAll(rec.Body)
	return string(b)
}

// metricLine is the sample line of name (with its labels), "" if absent.
func metricLine(body, name string) string {
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, name+" ") || strings.HasPrefix(l, name+"{") {
			return l
		}
	}
	return ""
}

// Every role of a raft trio (primary, secondary, witness) exports every
// role metric, and the figures say what each node is.
func TestRoleMetricsOnEveryRole(t *testing.T) {
	wit, _, na, _, _, nb, _ := startTrioWitness(t)
	wapi, err := newWitnessAPI(wit, "127.0.0.1:0", quietLog(), Trust{})
	if err != nil {
		t.Fatal(err)
	}
	defer wapi.Close()
	for _, c := range []struct {
		role string
		api  *APIServer
	}{{"primary", na.api}, {"secondary", nb.api}, {"witness", wapi}} {
		body := scrape(t, c.api)
		for _, name := range roleMetricNames {
			if metricLine(body, name) == "" {
				t.Errorf("%s: %s missing", c.role, name)
			}
		}
		if want := `tandem_role{role="` + c.role + `"} 1`; !strings.Contains(body, want) {
			t.Errorf("%s: no %q", c.role, want)
		}
		if l := metricLine(body, "tandem_generation"); l == "tandem_generation 0" {
			t.Errorf("%s: %s", c.role, l)
		}
		// A follower applies raft's record of protection a moment after
		// the leader.
		eventually(t, c.role+" protected", func() bool {
			return metricLine(scrape(t, c.api), "tandem_protected") == "tandem_protected 1"
		})
	}
	if l := metricLine(scrape(t, na.api), "tandem_epochs_total"); l == "tandem_epochs_total 0" {
		t.Errorf("primary: %s", l)
	}
}
