package e2e

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// udpKVServer answers "<id> SET k v" with "<id> OK" on loopback, dropping
// the first datagram of every id (a lost frame) and answering a resend;
// received counts each id's datagrams.
func udpKVServer(t *testing.T) (addr string, received func(id string) int) {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	count := map[string]int{}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			id, _, _ := strings.Cut(string(buf[:n]), " ")
			mu.Lock()
			count[id]++
			first := count[id] == 1
			mu.Unlock()
			if !first {
				pc.WriteTo([]byte(id+" OK\n"), from)
			}
		}
	}()
	t.Cleanup(func() { pc.Close(); wg.Wait() })
	return pc.LocalAddr().String(), func(id string) int {
		mu.Lock()
		defer mu.Unlock()
		return count[id]
	}
}

func dialUDP(t *testing.T, addr string) *net.UDPConn {
	t.Helper()
	ua, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.DialUDP("udp4", nil, ua)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Do resends a lost request with the same id and returns the reply
// without it; a load records its acknowledged writes and Stop joins it.
func TestUDPKVResendsAndLoadStops(t *testing.T) {
	addr, received := udpKVServer(t)
	u := &UDPKV{Conn: dialUDP(t, addr), Client: "c", Retry: 10 * time.Millisecond}
	got, err := u.Do(context.Background(), "SET a 1", 2*time.Second)
	if err != nil || got != "OK" || u.Seq() != 1 || received("c:1") < 2 {
		t.Fatalf("Do: %q %v, seq %d, sent %d times (the first is dropped)", got, err, u.Seq(), received("c:1"))
	}
	ld := StartUDPLoad(context.Background(), &UDPKV{Conn: dialUDP(t, addr), Client: "l", Retry: 10 * time.Millisecond}, 2*time.Second)
	deadline := time.Now().Add(5 * time.Second)
	for ld.Count() < 5 {
		if time.Now().After(deadline) {
			t.Fatalf("%d writes acknowledged in 5 s (err %v)", ld.Count(), ld.Err())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := ld.Stop(); err != nil {
		t.Fatal(err)
	}
	keys, n := ld.Keys(), ld.Count()
	if len(keys) != n || keys[0] != "k1" || ld.FirstAckAfter(time.Time{}).IsZero() || ld.RoundTripP50() <= 0 {
		t.Fatalf("after Stop: keys %v, count %d, first ack %v, p50 %v", keys, n, ld.FirstAckAfter(time.Time{}), ld.RoundTripP50())
	}
	if last, first := ld.LongestGap(time.Time{}, time.Now()); !first.After(last) {
		t.Fatalf("longest gap %v..%v", last, first)
	}
	time.Sleep(50 * time.Millisecond)
	if ld.Count() != n {
		t.Fatalf("writes acknowledged after Stop returned: %d, then %d", n, ld.Count())
	}
}

// A load whose writes go unanswered fails with the writer's error.
func TestUDPLoadFails(t *testing.T) {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0") // reads nothing, answers nothing
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	ld := StartUDPLoad(context.Background(), &UDPKV{Conn: dialUDP(t, pc.LocalAddr().String())}, 100*time.Millisecond)
	time.Sleep(300 * time.Millisecond)
	if err := ld.Stop(); err == nil || !strings.Contains(err.Error(), "no reply to w:1 SET k1 v1") {
		t.Fatalf("Stop: %v, want no reply to w:1", err)
	}
}
