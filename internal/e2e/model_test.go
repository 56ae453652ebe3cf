package e2e

import (
	"fmt"
	"testing"
	"time"
)

// op is one hand-made operation: client, command, call and return in ms
// after the history's start, and the reply ("" with ret < 0: never
// answered).
type op struct {
	client, cmd string
	call, ret   int
	reply       string
}

func historyOf(ops ...op) *History {
	h := NewHistory()
	at := func(ms int) time.Time { return h.start.Add(time.Duration(ms) * time.Millisecond) }
	for _, o := range ops {
		id := h.Invoke(o.client, o.cmd, at(o.call))
		if o.ret >= 0 {
			h.Return(id, o.reply, at(o.ret))
		}
	}
	return h
}

func TestKVModel(t *testing.T) {
	cases := []struct {
		name string
		ops  []op
		want Verdict
	}{
		{"sequential", []op{
			{"a", "GET k", 0, 1, "NOTFOUND"},
			{"a", "SET k v1", 2, 3, "OK"},
			{"b", "GET k", 4, 5, "OK v1"},
			{"a", "DEL k", 6, 7, "OK"},
			{"b", "GET k", 8, 9, "NOTFOUND"},
			{"b", "DEL k", 10, 11, "NOTFOUND"},
		}, Linearizable},
		{"a read concurrent with the write may see either", []op{
			{"a", "SET k v1", 0, 10, "OK"},
			{"b", "GET k", 1, 2, "NOTFOUND"},
			{"c", "GET k", 3, 4, "OK v1"},
		}, Linearizable},
		{"stale read after an acknowledged write", []op{
			{"a", "SET k v1", 0, 1, "OK"},
			{"a", "SET k v2", 2, 3, "OK"},
			{"b", "GET k", 4, 5, "OK v1"},
		}, NotLinearizable},
		{"an acknowledged write lost", []op{
			{"a", "SET k v1", 0, 1, "OK"},
			{"b", "GET k", 2, 3, "NOTFOUND"},
		}, NotLinearizable},
		{"a value nobody wrote", []op{
			{"b", "GET k", 0, 1, "OK zz"},
		}, NotLinearizable},
		{"a read going back in time", []op{
			{"a", "SET k v1", 0, 10, "OK"},
			{"b", "GET k", 1, 2, "OK v1"},
			{"c", "GET k", 3, 4, "NOTFOUND"},
		}, NotLinearizable},
		{"a write never answered may have happened", []op{
			{"a", "SET k v1", 0, -1, ""},
			{"b", "GET k", 5, 6, "OK v1"},
		}, Linearizable},
		{"or not", []op{
			{"a", "SET k v1", 0, -1, ""},
			{"b", "GET k", 5, 6, "NOTFOUND"},
		}, Linearizable},
		{"but not before it was sent", []op{
			{"b", "GET k", 0, 1, "OK v1"},
			{"a", "SET k v1", 2, -1, ""},
		}, NotLinearizable},
		{"a full table refuses a write", []op{
			{"a", "SET k v1", 0, 1, "ERR table full"},
			{"b", "GET k", 2, 3, "NOTFOUND"},
		}, Linearizable},
		{"keys are independent", []op{
			{"a", "SET k v1", 0, 1, "OK"},
			{"a", "SET j w1", 2, 3, "OK"},
			{"b", "GET j", 4, 5, "OK w1"},
			{"b", "GET k", 6, 7, "OK v1"},
		}, Linearizable},
	}
	for _, c := range cases {
		r := historyOf(c.ops...).Check(10 * time.Second)
		if r.Verdict != c.want {
			t.Errorf("%s: %s, want %s", c.name, r, c.want)
		}
	}
}

// TestKVModelRetry: a request resent under the same seq after its
// connection was lost is one operation from its first send to the answer
// finally read, so a read that saw its write between the two sends is
// fine; recorded as two operations it would not be (the first, answered
// "nothing", ending before the read).
func TestKVModelRetry(t *testing.T) {
	h := NewHistory()
	at := func(ms int) time.Time { return h.start.Add(time.Duration(ms) * time.Millisecond) }
	w := h.Invoke("a", "SET k v1", at(0)) // sent; the connection dies
	r := h.Invoke("b", "GET k", at(2))
	h.Return(r, "OK v1", at(3)) // the new primary had it
	h.Return(w, "OK", at(5))    // the resend, answered from the guest's record
	h.Return(w, "ERR late", at(6))
	if got := h.Check(10 * time.Second); got.Verdict != Linearizable || got.Ops != 2 || got.Pending != 0 {
		t.Fatalf("%s, want linearizable with 2 operations", got)
	}
}

// TestCheckTimeoutIsUnknown: a history the checker cannot finish in time
// is reported unknown, not linearizable.
func TestCheckTimeoutIsUnknown(t *testing.T) {
	var ops []op
	// One key, many concurrent writes and reads: a large search space.
	for i := range 400 {
		ops = append(ops, op{fmt.Sprint("c", i%40), fmt.Sprintf("SET k v%d", i), i, i + 1000, "OK"})
		ops = append(ops, op{fmt.Sprint("r", i%40), "GET k", i, i + 1000, fmt.Sprintf("OK v%d", (i*7)%400)})
	}
	r := historyOf(ops...).Check(time.Nanosecond)
	if r.Verdict == Linearizable {
		t.Fatalf("%s after a 1 ns budget, want unknown (or false)", r)
	}
	t.Logf("%s", r)
}

func TestParseKV(t *testing.T) {
	for cmd, want := range map[string]KVInput{
		"SET k v": {Op: "SET", Key: "k", Value: "v"},
		"GET k":   {Op: "GET", Key: "k"},
		"DEL k":   {Op: "DEL", Key: "k"},
		"PING":    {Op: "?", Key: "PING"},
	} {
		if got := ParseKV(cmd); got != want {
			t.Errorf("ParseKV(%q) = %+v, want %+v", cmd, got, want)
		}
	}
}
