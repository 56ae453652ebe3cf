package e2e

import (
	"bufio"
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeConsole answers like a node's console bridge: a node that is not
// primary turns clients away; the primary answers "<id>:<seq> OK" after
// repeating another client's reply first (clients see every reply). drop,
// when > 0, is how many requests the primary reads and leaves unanswered
// (closing the connection) before it answers.
func fakeConsole(t *testing.T, primary bool, drop int) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	var mu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
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
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					mu.Lock()
					lose := drop > 0
					drop--
					mu.Unlock()
					if lose {
						return
					}
					id, _, _ := strings.Cut(sc.Text(), " ")
					c.Write([]byte("other:1 OK\n" + id + " OK\n"))
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func TestKVClientFollowsThePrimary(t *testing.T) {
	dead, err := FreeAddr() // nobody listens: connection refused
	if err != nil {
		t.Fatal(err)
	}
	addrs := []string{dead, fakeConsole(t, false, 0), fakeConsole(t, true, 0)}
	c := NewKVClient("c", addrs, nil)
	defer c.Close()
	for seq := 1; seq <= 3; seq++ {
		rep, err := c.Do(context.Background(), "SET k v", time.Now().Add(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if rep.Text != "OK" || rep.Addr != addrs[2] {
			t.Fatalf("reply %q from %s, want OK from the primary %s", rep.Text, rep.Addr, addrs[2])
		}
	}
	if c.Seq != 3 {
		t.Fatalf("seq %d after 3 requests", c.Seq)
	}
}

// TestKVClientRetryIsOneOperation: a request whose connection is lost is
// resent under the same seq and is one operation of the history, whose
// answer is the one finally read.
func TestKVClientRetryIsOneOperation(t *testing.T) {
	c := NewKVClient("c", []string{fakeConsole(t, true, 2)}, nil)
	c.History = NewHistory()
	defer c.Close()
	rep, err := c.Do(context.Background(), "SET k v", time.Now().Add(5*time.Second))
	if err != nil || rep.Text != "OK" {
		t.Fatalf("reply %q, %v", rep.Text, err)
	}
	ops := c.History.Operations()
	if len(ops) != 1 || c.Seq != 1 {
		t.Fatalf("%d operations, seq %d after one request sent three times; want 1, 1", len(ops), c.Seq)
	}
	if out := ops[0].Output.(KVOutput); out.Unknown || out.Text != "OK" {
		t.Fatalf("the operation's answer is %+v, want OK", out)
	}
}

func TestKVClientGivesUpAtTheDeadline(t *testing.T) {
	c := NewKVClient("c", []string{fakeConsole(t, false, 0)}, nil)
	c.History = NewHistory()
	t0 := time.Now()
	if _, err := c.Do(context.Background(), "GET k", time.Now().Add(300*time.Millisecond)); err == nil {
		t.Fatal("a reply from a node that is not primary")
	}
	if time.Since(t0) > 2*time.Second {
		t.Fatalf("gave up after %v", time.Since(t0))
	}
	if ops, pending := c.History.Len(); ops != 1 || pending != 1 {
		t.Fatalf("history %d operations, %d pending; want the one unanswered request pending", ops, pending)
	}
}

func TestKVClientBatch(t *testing.T) {
	c := NewKVClient("c", []string{fakeConsole(t, false, 0), fakeConsole(t, true, 0)}, nil)
	defer c.Close()
	reps, err := c.DoBatch(context.Background(), []string{"GET a", "GET b", "GET c"}, time.Now().Add(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range reps {
		if r.Text != "OK" {
			t.Fatalf("reply %d: %q", i, r.Text)
		}
	}
}
