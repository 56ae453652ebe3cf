package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"
)

// RunLog is what the kv clients of one run were told. Its fields are
// guarded by Mu while clients run.
type RunLog struct {
	Mu      sync.Mutex
	Sets    map[string]SetRec // key -> the one SET of it
	Gets    []GetRec
	Replies []KVReply // every reply, in the order seen per client
	Errs    []string
	// History is every operation of the run's clients (and of whoever
	// reads the run's keys back with it), for the linearizability check.
	History *History
}

// SetRec is the one SET of a key and whether it was acknowledged.
type SetRec struct {
	Value string
	Acked bool
	AckAt time.Time
}

// GetRec is a GET a client sent and the reply it saw.
type GetRec struct {
	Key    string
	Reply  string
	SentAt time.Time
}

// NewRunLog is an empty log with a fresh History.
func NewRunLog() *RunLog { return &RunLog{Sets: map[string]SetRec{}, History: NewHistory()} }

// Acked counts the acknowledged SETs.
func (lg *RunLog) Acked() int {
	lg.Mu.Lock()
	defer lg.Mu.Unlock()
	n := 0
	for _, s := range lg.Sets {
		if s.Acked {
			n++
		}
	}
	return n
}

// FirstErr is the first client error, or "".
func (lg *RunLog) FirstErr() string {
	lg.Mu.Lock()
	defer lg.Mu.Unlock()
	if len(lg.Errs) > 0 {
		return lg.Errs[0]
	}
	return ""
}

// NumReplies is how many replies the clients have seen.
func (lg *RunLog) NumReplies() int {
	lg.Mu.Lock()
	defer lg.Mu.Unlock()
	return len(lg.Replies)
}

// FirstReplyAfter is the earliest reply seen after t from a console
// other than skip; ok is false when there was none.
func (lg *RunLog) FirstReplyAfter(t time.Time, skip string) (time.Time, bool) {
	lg.Mu.Lock()
	defer lg.Mu.Unlock()
	return FirstReplyAfter(lg.Replies, t, skip)
}

// LoadOptions shape one client's load.
type LoadOptions struct {
	KeyPrefix, ValuePrefix string
	// Patience bounds one request (resent until then); Pace is the pause
	// between requests (0: none).
	Patience, Pace time.Duration
}

// Load runs client c until ctx ends or a request fails: SET k_i v_i for
// fresh keys, and every third request a GET of a key it wrote before
// (which must answer its value) or of the key it writes next (which must
// not exist yet). Every request goes into lg (and lg.History).
func Load(ctx context.Context, c *KVClient, o LoadOptions, rng *rand.Rand, lg *RunLog) {
	defer c.Close()
	c.History = lg.History
	for i := 0; ; i++ {
		var cmd, key, val string
		isGet := i%3 == 2
		if isGet {
			n := (i/3 + 1) * 2 // SETs sent so far: keys 0..n-1 exist, n is next
			key = fmt.Sprintf("%s%d", o.KeyPrefix, rng.IntN(n+1))
			cmd = "GET " + key
		} else {
			key = fmt.Sprintf("%s%d", o.KeyPrefix, i-i/3)
			val = fmt.Sprintf("%sv%d-%x", o.ValuePrefix, i, rng.Uint32())
			cmd = "SET " + key + " " + val
			lg.Mu.Lock()
			lg.Sets[key] = SetRec{Value: val}
			lg.Mu.Unlock()
		}
		sent := time.Now()
		if o.Pace > 0 && i > 0 && sleep(ctx, o.Pace) != nil {
			return
		}
		rep, err := c.Do(ctx, cmd, time.Now().Add(o.Patience))
		if err != nil {
			if ctx.Err() == nil {
				lg.Mu.Lock()
				lg.Errs = append(lg.Errs, err.Error())
				lg.Mu.Unlock()
			}
			return
		}
		lg.Mu.Lock()
		lg.Replies = append(lg.Replies, rep)
		if isGet {
			lg.Gets = append(lg.Gets, GetRec{Key: key, Reply: rep.Text, SentAt: sent})
		} else if rep.Text == "OK" {
			lg.Sets[key] = SetRec{Value: val, Acked: true, AckAt: rep.At}
		} else {
			lg.Errs = append(lg.Errs, fmt.Sprintf("SET %s: %q", key, rep.Text))
		}
		lg.Mu.Unlock()
	}
}

// CheckState compares what the clients were told with the final state
// (final[key] is the GET reply after failover, "NOTFOUND" or "OK v").
// lost counts acknowledged SETs whose value is not there; divergent
// counts GET replies the final state contradicts (each key is written
// once, so a value seen must be the final one, and NOTFOUND is wrong
// for a key whose SET was acknowledged before the GET was sent).
func CheckState(sets map[string]SetRec, gets []GetRec, final map[string]string) (lost, divergent int, detail []string) {
	keys := make([]string, 0, len(sets))
	for k := range sets {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		s := sets[k]
		if s.Acked && final[k] != "OK "+s.Value {
			lost++
			detail = append(detail, fmt.Sprintf("lost: SET %s %s was acknowledged; now %q", k, s.Value, final[k]))
		}
	}
	for _, g := range gets {
		s, written := sets[g.Key]
		switch {
		case strings.HasPrefix(g.Reply, "OK "):
			if !written || g.Reply != "OK "+s.Value || final[g.Key] != g.Reply {
				divergent++
				detail = append(detail, fmt.Sprintf("divergent: GET %s answered %q; now %q", g.Key, g.Reply, final[g.Key]))
			}
		case g.Reply == "NOTFOUND":
			if written && s.Acked && s.AckAt.Before(g.SentAt) {
				divergent++
				detail = append(detail, fmt.Sprintf("divergent: GET %s answered NOTFOUND after its SET was acknowledged", g.Key))
			}
		default:
			divergent++
			detail = append(detail, fmt.Sprintf("divergent: GET %s answered %q", g.Key, g.Reply))
		}
	}
	return lost, divergent, detail
}

// FirstReplyAfter is the earliest reply seen after t from a console other
// than skip (the killed node's); ok is false when there was none.
func FirstReplyAfter(replies []KVReply, t time.Time, skip string) (time.Time, bool) {
	var first time.Time
	for _, r := range replies {
		if r.At.After(t) && r.Addr != skip && (first.IsZero() || r.At.Before(first)) {
			first = r.At
		}
	}
	return first, !first.IsZero()
}

// MaxReplyGap is the longest time between consecutive replies after since.
func MaxReplyGap(replies []KVReply, since time.Time) time.Duration {
	var ts []time.Time
	for _, r := range replies {
		if r.At.After(since) {
			ts = append(ts, r.At)
		}
	}
	slices.SortFunc(ts, func(a, b time.Time) int { return a.Compare(b) })
	var gap time.Duration
	for i := 1; i < len(ts); i++ {
		gap = max(gap, ts[i].Sub(ts[i-1]))
	}
	return gap
}
