package ft

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/tandemvm/tandem/internal/timing"
)

// TestConsoleBridgeKeepsUpWithManySmallWrites: a guest that writes every
// reply on its own (an unprotected primary) must not get a fast client
// dropped for the number of writes, only for bytes it cannot take.
func TestConsoleBridgeKeepsUpWithManySmallWrites(t *testing.T) {
	reg := prometheus.NewRegistry()
	rec := timing.New(reg, slog.New(slog.NewTextHandler(io.Discard, nil)), time.Second)
	b, err := newConsoleBridge("127.0.0.1:0", func([]byte) error { return nil }, nil, rec, slog.New(slog.NewTextHandler(io.Discard, nil)), Trust{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.close()
	c, err := net.Dial("tcp", b.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b.mu.Lock()
		n := len(b.clients)
		b.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("client never registered")
		}
		time.Sleep(time.Millisecond)
	}
	const lines = 50000 // far more writes than any chunk-counted queue held
	go func() {
		for i := 0; i < lines; i++ {
			b.release([]byte(fmt.Sprintf("c:%d OK\n", i)))
		}
	}()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(c)
	for i := 0; i < lines; i++ {
		l, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("after %d lines: %v", i, err)
		}
		if want := fmt.Sprintf("c:%d OK\n", i); l != want {
			t.Fatalf("line %d = %q, want %q", i, l, want)
		}
	}
	// Every delivery is timed as the console device's writes.
	if n := testutil.CollectAndCount(reg, "tandem_device_seconds"); n != 1 {
		t.Fatalf("%d device series after console deliveries, want 1 (console write)", n)
	}
}

func TestClientOutBoundedInBytes(t *testing.T) {
	o := &clientOut{wake: make(chan struct{}, 1)}
	chunk := make([]byte, 1<<20)
	for i := 0; i < clientQueueBytes>>20; i++ {
		if !o.push(chunk) {
			t.Fatalf("push %d refused below the bound", i)
		}
	}
	if o.push([]byte("x")) {
		t.Fatal("push beyond the bound accepted")
	}
	if p := o.take(nil); len(p) != clientQueueBytes {
		t.Fatalf("take returned %d bytes, want %d", len(p), clientQueueBytes)
	}
	o.close()
	if p := o.take(nil); p != nil {
		t.Fatalf("take after close returned %d bytes", len(p))
	}
}

// TestConsoleBridgeCloseJoinsItsGoroutines: once close returns, none of
// the bridge's goroutines (accept loop, each client's reader and writer)
// is left, with clients still connected.
func TestConsoleBridgeCloseJoinsItsGoroutines(t *testing.T) {
	b, err := newConsoleBridge("127.0.0.1:0", func([]byte) error { return nil }, nil, nil, slog.New(slog.NewTextHandler(io.Discard, nil)), Trust{})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		c, err := net.Dial("tcp", b.addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		b.mu.Lock()
		n := len(b.clients)
		b.mu.Unlock()
		if n == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("clients never registered")
		}
		time.Sleep(time.Millisecond)
	}
	b.close()
	// close has joined every goroutine (wg.Done was their last call);
	// one may still be returning from it for a moment, so look again
	// briefly before calling it left behind.
	buf := make([]byte, 1<<20)
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		stacks := string(buf[:runtime.Stack(buf, true)])
		if !strings.Contains(stacks, "(*consoleBridge)") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("bridge goroutines left after close:\n%s", stacks)
		}
	}
}
