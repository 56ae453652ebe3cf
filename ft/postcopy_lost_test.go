package ft

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/uffd"
	"github.com/tandemvm/tandem/postcopy"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

const lostID = "0123456789abcdef"

// lostTarget is a post-copy destination's side holding a Target of 16
// pages, 4 of them owed, granted to migration lostID.
func lostTarget(t *testing.T) (*pcInbound, *postcopy.Target) {
	t.Helper()
	mem, err := unix.Mmap(-1, 0, 16*guest.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	missing := precopy.NewBitmap(16)
	for p := range uint64(4) {
		missing.Set(p)
	}
	tg, err := postcopy.NewTarget(postcopy.TargetConfig{Regions: []guest.Region{{Mem: mem}}, Missing: missing, VCPUs: 1})
	if errors.Is(err, uffd.ErrUnavailable) {
		t.Skipf("userfaultfd: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tg.Close)
	return &pcInbound{log: quietLog(), id: lostID, tg: tg, source: "10.0.0.1:7000"}, tg
}

// POST /migrate/abandon's refusals, each with nothing changed, and once
// given, what stays refused: the migration's channels (a source that
// comes back cannot resume it) and a second abandon.
func TestAbandonRefusalsAndAfter(t *testing.T) {
	p, tg := lostTarget(t)
	for _, c := range []struct{ id, want string }{
		{"", "is connected and its pages are arriving (4 left)"},
		{"fedcba9876543210", `"fedcba9876543210" is not this destination's: it holds post-copy migration ` + lostID},
	} {
		if _, _, err := p.abandon(c.id); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("abandon(%q): %v, want %q", c.id, err, c.want)
		}
	}
	// The link fails: the source is unreachable from now on.
	serveLost(t, p)
	reg := prometheus.NewRegistry()
	reg.MustRegister(p.collectors()...)
	gauge := func(name string) float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == name {
				return mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		t.Fatalf("no %s", name)
		return 0
	}
	time.Sleep(20 * time.Millisecond)
	if s, lost := gauge("tandem_postcopy_source_unreachable_seconds"), gauge("tandem_guest_lost"); s < 0.01 || lost != 0 {
		t.Errorf("metrics while unreachable: %v s, lost %v", s, lost)
	}
	l, got, err := p.abandon(lostID)
	if err != nil || got != tg || l.id != lostID || l.source != "10.0.0.1:7000" || l.stats.Remaining != 4 {
		t.Fatalf("abandon: %+v %v", l, err)
	}
	if s, lost := gauge("tandem_postcopy_source_unreachable_seconds"), gauge("tandem_guest_lost"); s != 0 || lost != 1 {
		t.Errorf("metrics after abandon: %v s, lost %v", s, lost)
	}
	var st nodeStatus
	p.fill(&st)
	if st.MigrationID != lostID || st.PostcopyRemainingPages != 4 || st.PostcopyActive || st.PostcopyAbandonedAt == "" || st.PostcopySource != l.source {
		t.Errorf("status after abandon: %+v", st.MigrationStatus)
	}
	if !strings.Contains(l.reason(), "4 pages never arrived") || !strings.Contains(l.reason(), "stays paused") {
		t.Errorf("reason %q", l.reason())
	}
	err = p.take(replica.Hello{MigrationID: lostID, Channel: replica.ChannelUrgent}, nil)
	if err == nil || !strings.Contains(err.Error(), "was abandoned here") {
		t.Errorf("a channel of the abandoned migration: %v, want refused as abandoned", err)
	}
	if _, _, err := p.abandon(""); err == nil || !strings.Contains(err.Error(), "already abandoned") {
		t.Errorf("second abandon: %v", err)
	}
	// Nothing here at all, or a migration that completed.
	for _, c := range []struct {
		p    *pcInbound
		want string
	}{
		{&pcInbound{}, "no post-copy migration"},
		{&pcInbound{last: &postcopy.TargetStats{}, lastID: lostID}, "complete: every page arrived and the guest is whole"},
	} {
		if _, _, err := c.p.abandon(""); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("abandon: %v, want %q", err, c.want)
		}
	}
}

// The handler refuses a bad body, a node with no post-copy migration and
// one still awaiting its commit (its guest never ran: abort is for that).
func TestAbandonHandlerRefusals(t *testing.T) {
	call := func(n *Node, body string) (int, string) {
		w := httptest.NewRecorder()
		n.handleMigrateAbandon(w, httptest.NewRequest(http.MethodPost, "/migrate/abandon", strings.NewReader(body)))
		return w.Code, w.Body.String()
	}
	n := &Node{log: quietLog(), state: "waiting", pcIn: &pcInbound{}}
	if code, body := call(n, "{"); code != http.StatusBadRequest || !strings.Contains(body, "migration_id") {
		t.Errorf("bad body: %d %s", code, body)
	}
	if code, body := call(n, ""); code != http.StatusConflict || !strings.Contains(body, "no post-copy migration") {
		t.Errorf("waiting: %d %s", code, body)
	}
	n.pending = &pendingCommit{res: &replica.MigrationResult{Hello: replica.Hello{MigrationID: lostID}}}
	n.state = "awaiting-commit"
	if code, body := call(n, ""); code != http.StatusConflict || !strings.Contains(body, "awaits its commit") || !strings.Contains(body, "/migrate/abort") {
		t.Errorf("awaiting commit: %d %s", code, body)
	}
}

// A peer's SourceAPI is kept only as a HOST:PORT of bounded length:
// status, state_reason and logs repeat it.
func TestSourceAPIOfBounded(t *testing.T) {
	for in, want := range map[string]string{
		"10.0.0.1:7000":                  "10.0.0.1:7000",
		"[fd00::1]:7000":                 "[fd00::1]:7000",
		"":                               "",
		"no port":                        "",
		"a:1\nGUEST FINE":                "",
		strings.Repeat("h", 300) + ":70": "",
	} {
		if got := sourceAPIOf(in); got != want {
			t.Errorf("sourceAPIOf(%.40q) = %q, want %q", in, got, want)
		}
	}
}
