package main

import (
	"bufio"
	"context"
	"net"
	"strings"
	"testing"
	"time"
)

func TestCheckState(t *testing.T) {
	t0 := time.Now()
	sets := map[string]setRec{
		"k0": {value: "a", acked: true, ackAt: t0},
		"k1": {value: "b", acked: true, ackAt: t0},
		"k2": {value: "c"}, // sent, never acknowledged
	}
	cases := []struct {
		name            string
		gets            []getRec
		final           map[string]string
		lost, divergent int
	}{
		{"all there", []getRec{{"k0", "OK a", t0.Add(time.Millisecond)}}, map[string]string{"k0": "OK a", "k1": "OK b", "k2": "NOTFOUND"}, 0, 0},
		{"unacked write may land", nil, map[string]string{"k0": "OK a", "k1": "OK b", "k2": "OK c"}, 0, 0},
		{"acked write lost", nil, map[string]string{"k0": "OK a", "k1": "NOTFOUND"}, 1, 0},
		{"acked write changed", nil, map[string]string{"k0": "OK a", "k1": "OK x"}, 1, 0},
		{"seen value gone", []getRec{{"k2", "OK c", t0}}, map[string]string{"k0": "OK a", "k1": "OK b", "k2": "NOTFOUND"}, 0, 1},
		{"notfound before the ack is fine", []getRec{{"k1", "NOTFOUND", t0.Add(-time.Millisecond)}}, map[string]string{"k0": "OK a", "k1": "OK b"}, 0, 0},
		{"notfound after the ack", []getRec{{"k1", "NOTFOUND", t0.Add(time.Millisecond)}}, map[string]string{"k0": "OK a", "k1": "OK b"}, 0, 1},
		{"value never written", []getRec{{"k9", "OK z", t0}}, map[string]string{"k0": "OK a", "k1": "OK b", "k9": "OK z"}, 0, 1},
		{"error reply", []getRec{{"k0", "ERR busy", t0}}, map[string]string{"k0": "OK a", "k1": "OK b"}, 0, 1},
	}
	for _, c := range cases {
		lost, div, detail := checkState(sets, c.gets, c.final)
		if lost != c.lost || div != c.divergent {
			t.Errorf("%s: lost %d divergent %d, want %d %d (%v)", c.name, lost, div, c.lost, c.divergent, detail)
		}
	}
}

func TestFirstReplyAfterSkipsTheKilledNode(t *testing.T) {
	t0 := time.Now()
	rs := []kvReply{{addr: "a", at: t0.Add(-time.Second)}, {addr: "a", at: t0.Add(time.Millisecond)}, {addr: "b", at: t0.Add(300 * time.Millisecond)}, {addr: "b", at: t0.Add(200 * time.Millisecond)}}
	got, ok := firstReplyAfter(rs, t0, "a")
	if !ok || got.Sub(t0) != 200*time.Millisecond {
		t.Fatalf("first reply %v %v, want 200ms after", got.Sub(t0), ok)
	}
	if _, ok := firstReplyAfter(rs[:2], t0, "a"); ok {
		t.Fatal("a reply from the killed node counted")
	}
}

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

// fakeConsole answers like a node's console bridge: a node that is not
// primary turns clients away; the primary answers "<id>:<seq> OK" after
// repeating another client's reply first (clients see every reply).
func fakeConsole(t *testing.T, primary bool) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if !primary {
				c.Write([]byte("ERR not the primary\n"))
				c.Close()
				continue
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					id, _, _ := strings.Cut(sc.Text(), " ")
					c.Write([]byte("other:1 OK\n" + id + " OK\n"))
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func TestKVClientFollowsThePrimary(t *testing.T) {
	dead, err := freeLoopback() // nobody listens: connection refused
	if err != nil {
		t.Fatal(err)
	}
	addrs := []string{dead, fakeConsole(t, false), fakeConsole(t, true)}
	c := newKVClient("c", addrs, nil)
	defer c.close()
	for seq := 1; seq <= 3; seq++ {
		rep, err := c.do(context.Background(), "SET k v", time.Now().Add(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if rep.text != "OK" || rep.addr != addrs[2] {
			t.Fatalf("reply %q from %s, want OK from the primary %s", rep.text, rep.addr, addrs[2])
		}
	}
	if c.seq != 3 {
		t.Fatalf("seq %d after 3 requests", c.seq)
	}
}

func TestKVClientGivesUpAtTheDeadline(t *testing.T) {
	c := newKVClient("c", []string{fakeConsole(t, false)}, nil)
	t0 := time.Now()
	if _, err := c.do(context.Background(), "GET k", time.Now().Add(300*time.Millisecond)); err == nil {
		t.Fatal("a reply from a node that is not primary")
	}
	if time.Since(t0) > 2*time.Second {
		t.Fatalf("gave up after %v", time.Since(t0))
	}
}

func TestKVClientBatch(t *testing.T) {
	c := newKVClient("c", []string{fakeConsole(t, false), fakeConsole(t, true)}, nil)
	defer c.close()
	reps, err := c.doBatch(context.Background(), []string{"GET a", "GET b", "GET c"}, time.Now().Add(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range reps {
		if r.text != "OK" {
			t.Fatalf("reply %d: %q", i, r.text)
		}
	}
}
