package failover

import (
	"context"
	"encoding/json"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/tandemvm/tandem/internal/clock"
)

// raftLogRepeat is how long a repeated raft message (the same text about
// the same peer) stays quiet after it was logged: raft says "failed to
// heartbeat" every 150 ms while a peer is down.
const raftLogRepeat = 10 * time.Second

// raftLog carries raft's log lines into slog: hclog writes JSON, each
// line becomes one slog record at raft's level, with raft's fields as
// attributes, component=raft once, and a repeat of the same message about
// the same peer within raftLogRepeat counted instead of logged (the next
// one logged says how many were left out).
type raftLog struct {
	log *slog.Logger
	clk clock.Clock

	// mu guards seen.
	mu   sync.Mutex
	seen map[string]*repeat
}

type repeat struct {
	logged     time.Time
	suppressed int
}

func newRaftLog(log *slog.Logger, clk clock.Clock) *raftLog {
	return &raftLog{log: log.With("component", "raft"), clk: clock.Or(clk), seen: map[string]*repeat{}}
}

// hclog returns the hclog.Logger raft is given: warnings and errors only
// (raft's info lines are per-election chatter the node logs itself).
func (r *raftLog) hclog() hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: "raft", Level: hclog.Warn, Output: r, JSONFormat: true})
}

// Write takes one JSON line from hclog. A line that is not JSON is logged
// as it came, at warning level.
func (r *raftLog) Write(p []byte) (int, error) {
	var f map[string]any
	if err := json.Unmarshal(p, &f); err != nil {
		r.log.Warn(strings.TrimSpace(string(p)))
		return len(p), nil
	}
	msg, _ := f["@message"].(string)
	level := raftLevel(f["@level"])
	keys := make([]string, 0, len(f))
	for k := range f {
		if !strings.HasPrefix(k, "@") {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	attrs := make([]any, 0, 2*len(keys)+2)
	for _, k := range keys {
		attrs = append(attrs, strings.ReplaceAll(k, " ", "_"), f[k])
	}
	peer, _ := f["peer"].(string)
	n, ok := r.admit(msg + "\x00" + peer)
	if !ok {
		return len(p), nil
	}
	if n > 0 {
		attrs = append(attrs, "repeated", n)
	}
	r.log.Log(context.Background(), level, msg, attrs...)
	return len(p), nil
}

// admit says whether a message with this key is logged now and how many
// of its repeats were left out since it last was.
func (r *raftLog) admit(key string) (int, bool) {
	now := r.clk.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	rp := r.seen[key]
	if rp != nil && now.Sub(rp.logged) < raftLogRepeat {
		rp.suppressed++
		return 0, false
	}
	if rp == nil {
		if len(r.seen) >= 1024 { // bounded: forget everything rather than grow
			clear(r.seen)
		}
		rp = &repeat{}
		r.seen[key] = rp
	}
	n := rp.suppressed
	rp.logged, rp.suppressed = now, 0
	return n, true
}

func raftLevel(v any) slog.Level {
	s, _ := v.(string)
	switch strings.ToLower(s) {
	case "trace", "debug":
		return slog.LevelDebug
	case "info":
		return slog.LevelInfo
	case "warn", "warning":
		return slog.LevelWarn
	}
	return slog.LevelError
}
