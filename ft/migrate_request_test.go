package ft

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestParseMigrateRequest: without postcopy_after_rounds the controller
// alone decides the switch (-1); a given one is kept, one out of range is
// refused naming the field; a downtime limit under the default target
// takes the target down with it instead of failing as a bad policy.
func TestParseMigrateRequest(t *testing.T) {
	cases := []struct {
		body      string
		ok        bool
		rounds    int
		target    time.Duration
		errSubstr string
	}{
		{`{"to":"127.0.0.1:1","postcopy":true}`, true, -1, 20 * time.Millisecond, ""},
		{`{"to":"127.0.0.1:1","postcopy":true,"postcopy_after_rounds":0}`, true, 0, 20 * time.Millisecond, ""},
		{`{"to":"127.0.0.1:1","postcopy":true,"postcopy_after_rounds":3}`, true, 3, 20 * time.Millisecond, ""},
		{`{"to":"127.0.0.1:1","postcopy":true,"postcopy_after_rounds":-1}`, false, 0, 0, "postcopy_after_rounds -1 not in 0..1000"},
		{`{"to":"127.0.0.1:1","postcopy":true,"postcopy_after_rounds":1001}`, false, 0, 0, "postcopy_after_rounds 1001"},
		{`{"to":"127.0.0.1:1","downtime_limit_ms":2}`, true, -1, 2 * time.Millisecond, ""},
	}
	for _, c := range cases {
		w := httptest.NewRecorder()
		r := httptest.NewRequest(http.MethodPost, "/migrate", strings.NewReader(c.body))
		_, pol, _, rounds, ok := parseMigrateRequest(w, r)
		if ok != c.ok {
			t.Errorf("%s: ok %v, want %v (%d %s)", c.body, ok, c.ok, w.Code, w.Body.String())
			continue
		}
		if !ok {
			if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), c.errSubstr) {
				t.Errorf("%s: answered %d %s, want 400 with %q", c.body, w.Code, w.Body.String(), c.errSubstr)
			}
			continue
		}
		if rounds != c.rounds || pol.DowntimeTarget != c.target {
			t.Errorf("%s: rounds %d, target %v; want %d, %v", c.body, rounds, pol.DowntimeTarget, c.rounds, c.target)
		}
	}
}
