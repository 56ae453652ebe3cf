package e2e

import (
	"testing"
	"time"
)

func TestCheckState(t *testing.T) {
	t0 := time.Now()
	sets := map[string]SetRec{
		"k0": {Value: "a", Acked: true, AckAt: t0},
		"k1": {Value: "b", Acked: true, AckAt: t0},
		"k2": {Value: "c"}, // sent, never acknowledged
	}
	cases := []struct {
		name            string
		gets            []GetRec
		final           map[string]string
		lost, divergent int
	}{
		{"all there", []GetRec{{"k0", "OK a", t0.Add(time.Millisecond)}}, map[string]string{"k0": "OK a", "k1": "OK b", "k2": "NOTFOUND"}, 0, 0},
		{"unacked write may land", nil, map[string]string{"k0": "OK a", "k1": "OK b", "k2": "OK c"}, 0, 0},
		{"acked write lost", nil, map[string]string{"k0": "OK a", "k1": "NOTFOUND"}, 1, 0},
		{"acked write changed", nil, map[string]string{"k0": "OK a", "k1": "OK x"}, 1, 0},
		{"seen value gone", []GetRec{{"k2", "OK c", t0}}, map[string]string{"k0": "OK a", "k1": "OK b", "k2": "NOTFOUND"}, 0, 1},
		{"notfound before the ack is fine", []GetRec{{"k1", "NOTFOUND", t0.Add(-time.Millisecond)}}, map[string]string{"k0": "OK a", "k1": "OK b"}, 0, 0},
		{"notfound after the ack", []GetRec{{"k1", "NOTFOUND", t0.Add(time.Millisecond)}}, map[string]string{"k0": "OK a", "k1": "OK b"}, 0, 1},
		{"value never written", []GetRec{{"k9", "OK z", t0}}, map[string]string{"k0": "OK a", "k1": "OK b", "k9": "OK z"}, 0, 1},
		{"error reply", []GetRec{{"k0", "ERR busy", t0}}, map[string]string{"k0": "OK a", "k1": "OK b"}, 0, 1},
	}
	for _, c := range cases {
		lost, div, detail := CheckState(sets, c.gets, c.final)
		if lost != c.lost || div != c.divergent {
			t.Errorf("%s: lost %d divergent %d, want %d %d (%v)", c.name, lost, div, c.lost, c.divergent, detail)
		}
	}
}

func TestFirstReplyAfterSkipsTheKilledNode(t *testing.T) {
	t0 := time.Now()
	rs := []KVReply{{Addr: "a", At: t0.Add(-time.Second)}, {Addr: "a", At: t0.Add(time.Millisecond)}, {Addr: "b", At: t0.Add(300 * time.Millisecond)}, {Addr: "b", At: t0.Add(200 * time.Millisecond)}}
	got, ok := FirstReplyAfter(rs, t0, "a")
	if !ok || got.Sub(t0) != 200*time.Millisecond {
		t.Fatalf("first reply %v %v, want 200ms after", got.Sub(t0), ok)
	}
	if _, ok := FirstReplyAfter(rs[:2], t0, "a"); ok {
		t.Fatal("a reply from the killed node counted")
	}
}

func TestMaxReplyGap(t *testing.T) {
	t0 := time.Now()
	rs := []KVReply{{At: t0.Add(-time.Hour)}, {At: t0.Add(30 * time.Millisecond)}, {At: t0.Add(10 * time.Millisecond)}, {At: t0.Add(100 * time.Millisecond)}}
	if g := MaxReplyGap(rs, t0); g != 70*time.Millisecond {
		t.Fatalf("gap %v, want 70ms (the reply before since does not count)", g)
	}
}
