package failover

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/clock"
)

func records(t *testing.T, b *bytes.Buffer) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(b.String()), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

func TestRaftLogLevelsAttributesAndRepeats(t *testing.T) {
	var b bytes.Buffer
	clk := clock.NewFake(time.Time{})
	r := newRaftLog(slog.New(slog.NewJSONHandler(&b, &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", "a"), clk)
	hl := r.hclog()
	for i := 0; i < 5; i++ { // a peer down: raft retries every 150 ms
		hl.Error("failed to heartbeat to", "peer", "10.0.0.2:7000", "backoff time", "10ms")
		clk.Advance(150 * time.Millisecond)
	}
	hl.Error("failed to heartbeat to", "peer", "10.0.0.3:7000") // another peer: its own line
	hl.Warn("rejecting vote request", "candidate", "c")
	hl.Info("entering follower state") // below raft's level: dropped
	clk.Advance(raftLogRepeat)
	hl.Error("failed to heartbeat to", "peer", "10.0.0.2:7000", "backoff time", "80ms")

	recs := records(t, &b)
	if len(recs) != 4 {
		t.Fatalf("%d records, want 4:\n%s", len(recs), b.String())
	}
	first := recs[0]
	if first["level"] != "ERROR" || first["msg"] != "failed to heartbeat to" || first["peer"] != "10.0.0.2:7000" ||
		first["backoff_time"] != "10ms" || first["component"] != "raft" || first["node"] != "a" {
		t.Fatalf("first record %v", first)
	}
	if _, ok := first["repeated"]; ok {
		t.Fatalf("first record claims repeats: %v", first)
	}
	if strings.Count(b.String(), `"component"`) != 4 {
		t.Fatalf("component given more than once a line:\n%s", b.String())
	}
	if recs[1]["peer"] != "10.0.0.3:7000" {
		t.Fatalf("second record %v, want the other peer's", recs[1])
	}
	if recs[2]["level"] != "WARN" || recs[2]["candidate"] != "c" {
		t.Fatalf("third record %v, want raft's warning at WARN", recs[2])
	}
	if recs[3]["repeated"] != float64(4) || recs[3]["backoff_time"] != "80ms" {
		t.Fatalf("last record %v, want the 4 left-out repeats counted", recs[3])
	}
}

func TestRaftLogNotJSON(t *testing.T) {
	var b bytes.Buffer
	r := newRaftLog(slog.New(slog.NewJSONHandler(&b, nil)), nil)
	if n, err := r.Write([]byte("plain text line\n")); err != nil || n != 16 {
		t.Fatalf("Write = %d, %v", n, err)
	}
	recs := records(t, &b)
	if len(recs) != 1 || recs[0]["msg"] != "plain text line" || recs[0]["level"] != "WARN" {
		t.Fatalf("records %v", recs)
	}
}
