package linkproxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// server is a test target on 127.0.0.1 that runs handle on every
// connection and stops them all at cleanup.
type server struct {
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns []net.Conn
	got   atomic.Int64 // bytes read by sink handlers
}

func startServer(t *testing.T, handle func(s *server, c net.Conn)) *server {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &server{ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				handle(s, c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

func (s *server) accepted() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

func echo(_ *server, c net.Conn) { _, _ = io.Copy(c, c) }

func sink(s *server, c net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		s.got.Add(int64(n))
		if err != nil {
			return
		}
	}
}

// source writes to its connection until the connection breaks.
func source(_ *server, c net.Conn) {
	buf := make([]byte, 64<<10)
	_ = c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	for {
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}

func startProxy(t *testing.T, target string, s Shape) *Proxy {
	t.Helper()
	p, err := Start("127.0.0.1:0", target, s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return p
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip sends one line through an echo and returns how long the reply
// took, or an error (a timeout during a partition).
func roundTrip(c net.Conn, r *bufio.Reader, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	_ = c.SetDeadline(start.Add(timeout))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return 0, err
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return 0, err
	}
	if line != "ping\n" {
		return 0, errors.New("echo garbled: " + line)
	}
	return time.Since(start), nil
}

// TestThroughput measures the rate through the proxy over one second in
// each direction, alone, with latency, and shared by two connections.
func TestThroughput(t *testing.T) {
	const limit = 20_000_000 // bits/s
	const window = time.Second
	for _, tt := range []struct {
		name    string
		shape   Shape
		conns   int
		upwards bool // client -> target, else target -> client
	}{
		{"client to target", Shape{Bandwidth: limit}, 1, true},
		{"target to client", Shape{Bandwidth: limit}, 1, false},
		{"with 50ms latency", Shape{Bandwidth: limit, Latency: 50 * time.Millisecond}, 1, true},
		{"two connections share the limit", Shape{Bandwidth: limit}, 2, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			handler := source
			if tt.upwards {
				handler = sink
			}
			srv := startServer(t, handler)
			p := startProxy(t, srv.ln.Addr().String(), tt.shape)

			var total atomic.Int64
			var wg sync.WaitGroup
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			for i := 0; i < tt.conns; i++ {
				c := dial(t, p.Addr())
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, 64<<10)
					_ = c.SetDeadline(time.Now().Add(10 * time.Second))
					go func() { <-ctx.Done(); c.Close() }()
					for ctx.Err() == nil {
						var n int
						var err error
						if tt.upwards {
							n, err = c.Write(buf)
						} else {
							n, err = c.Read(buf)
						}
						if !tt.upwards {
							total.Add(int64(n))
						}
						if err != nil {
							return
						}
					}
				}()
			}
			got := func() int64 {
				if tt.upwards {
					return srv.got.Load()
				}
				return total.Load()
			}
			// Measure from when data arrives at the far end, so
			// connection set-up and the latency do not count against
			// the rate.
			waitFor(t, "data to flow", func() bool { return got() > 0 })
			b0, t0 := got(), time.Now()
			time.Sleep(window)
			b1, t1 := got(), time.Now()
			cancel()
			wg.Wait()
			rate := float64(b1-b0) * 8 / t1.Sub(t0).Seconds()
			t.Logf("%s: %.2f Mbit/s through a %d Mbit/s limit", tt.name, rate/1e6, limit/1_000_000)
			if rate < limit*0.8 || rate > limit*1.2 {
				t.Fatalf("rate %.2f Mbit/s, want %d ±20%%", rate/1e6, limit/1_000_000)
			}
		})
	}
}

func TestLatency(t *testing.T) {
	srv := startServer(t, echo)
	p := startProxy(t, srv.ln.Addr().String(), Shape{})
	c := dial(t, p.Addr())
	r := bufio.NewReader(c)
	base, err := roundTrip(c, r, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for _, lat := range []time.Duration{40 * time.Millisecond, 100 * time.Millisecond, 0} {
		p.SetShape(Shape{Latency: lat})
		if got := p.Shape(); got.Latency != lat {
			t.Fatalf("Shape() = %+v", got)
		}
		rtt, err := roundTrip(c, r, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("latency %v: round trip %v (base %v)", lat, rtt, base)
		if rtt < 2*lat || rtt > 2*lat+300*time.Millisecond {
			t.Fatalf("latency %v: round trip %v, want about %v", lat, rtt, 2*lat)
		}
	}
	// A negative latency is treated as none.
	p.SetShape(Shape{Latency: -time.Second})
	if got := p.Shape().Latency; got != 0 {
		t.Fatalf("negative latency kept as %v", got)
	}
}

func TestCut(t *testing.T) {
	srv := startServer(t, echo)
	p := startProxy(t, srv.ln.Addr().String(), Shape{Latency: 5 * time.Millisecond})
	c1 := dial(t, p.Addr())
	c2 := dial(t, p.Addr())
	for _, c := range []net.Conn{c1, c2} {
		if _, err := roundTrip(c, bufio.NewReader(c), 2*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if n := p.Cut(); n != 2 {
		t.Fatalf("Cut() = %d, want 2", n)
	}
	for _, c := range []net.Conn{c1, c2} {
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err := c.Read(make([]byte, 1))
		var ne net.Error
		if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
			t.Fatalf("read after cut: %v, want the connection closed", err)
		}
	}
	// The link itself still works.
	c3 := dial(t, p.Addr())
	if _, err := roundTrip(c3, bufio.NewReader(c3), 2*time.Second); err != nil {
		t.Fatalf("after cut: %v", err)
	}
	waitFor(t, "cut connections to be gone", func() bool { return p.Stats().Active == 1 })
}

func TestPartitionThenHeal(t *testing.T) {
	srv := startServer(t, echo)
	p := startProxy(t, srv.ln.Addr().String(), Shape{})
	old := dial(t, p.Addr())
	oldR := bufio.NewReader(old)
	if _, err := roundTrip(old, oldR, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	p.Partition(true)
	p.Partition(true) // idempotent
	if !p.Partitioned() {
		t.Fatal("Partitioned() = false")
	}

	// An existing connection: the write is accepted, the reply never
	// comes, and the failure is a timeout, not a reset.
	_, err := roundTrip(old, oldR, 200*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("during partition: %v, want a timeout", err)
	}
	// A new connection is held: its handshake completes but the target
	// never sees it.
	fresh := dial(t, p.Addr())
	freshR := bufio.NewReader(fresh)
	_ = fresh.SetDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := fresh.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := freshR.ReadString('\n'); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("new connection during partition: %v, want a timeout", err)
	}
	if n := srv.accepted(); n != 1 {
		t.Fatalf("target saw %d connections during the partition, want 1", n)
	}

	p.Partition(false)
	if p.Partitioned() {
		t.Fatal("Partitioned() = true after heal")
	}
	// What was held is delivered in order, on both connections.
	for _, cr := range []struct {
		c net.Conn
		r *bufio.Reader
	}{{old, oldR}, {fresh, freshR}} {
		_ = cr.c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err := cr.r.ReadString('\n')
		if err != nil || line != "ping\n" {
			t.Fatalf("after heal: %q %v", line, err)
		}
		if _, err := roundTrip(cr.c, cr.r, 2*time.Second); err != nil {
			t.Fatalf("after heal: %v", err)
		}
	}
}

func TestHalfCloseAndEOF(t *testing.T) {
	// The target answers once its input ends, then closes: the proxy must
	// pass the half-close and then the close.
	srv := startServer(t, func(_ *server, c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		b, _ := io.ReadAll(c)
		_, _ = c.Write(append([]byte("got:"), b...))
	})
	p := startProxy(t, srv.ln.Addr().String(), Shape{Latency: 10 * time.Millisecond, Bandwidth: 10_000_000})
	c := dial(t, p.Addr())
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "got:hello" {
		t.Fatalf("reply %q %v", b, err)
	}
	waitFor(t, "the connection to be released", func() bool { return p.Stats().Active == 0 })
	if s := p.Stats(); s.Accepted != 1 || s.Up != 5 || s.Down != 9 {
		t.Fatalf("stats %+v", s)
	}
}

func TestUnreachableTarget(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	p := startProxy(t, dead, Shape{})
	// The proxy may reset the client before its own dial returns; that
	// is as good as a reset afterwards.
	c, err := net.DialTimeout("tcp", p.Addr(), 2*time.Second)
	if err != nil {
		return
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("read through a proxy to nowhere succeeded")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("client left hanging: %v", err)
	}
}

func TestStartError(t *testing.T) {
	if _, err := Start("256.0.0.1:0", "127.0.0.1:1", Shape{}); err == nil {
		t.Fatal("Start on a bad address succeeded")
	}
}

// TestCloseStopsEverything closes a proxy with busy, partitioned, held and
// latency-queued connections and checks that Close is quick and leaves no
// goroutine behind.
func TestCloseStopsEverything(t *testing.T) {
	srv := startServer(t, source)
	before := runtime.NumGoroutine()
	p, err := Start("127.0.0.1:0", srv.ln.Addr().String(), Shape{Bandwidth: 50_000_000, Latency: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	busy := dial(t, p.Addr())
	_ = busy
	waitFor(t, "data to be queued", func() bool { return srv.accepted() == 1 })
	p.Partition(true)
	_ = dial(t, p.Addr()) // held
	waitFor(t, "two connections", func() bool { return p.Stats().Active == 2 })

	start := time.Now()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("Close took %v", el)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		t.Fatal("listener still accepting after Close")
	}
	waitFor(t, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
	p.Cut() // harmless after Close
	p.Partition(false)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			n := runtime.Stack(buf, true)
			os.Stderr.Write(buf[:n])
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestSetShapeAtRuntime starts a transfer on a slow link and lifts the
// limit mid-way: the rest must go through at full speed.
func TestSetShapeAtRuntime(t *testing.T) {
	const size = 2 << 20
	srv := startServer(t, sink)
	p := startProxy(t, srv.ln.Addr().String(), Shape{Bandwidth: 1_000_000}) // 2 MiB would take 17 s
	c := dial(t, p.Addr())
	done := make(chan error, 1)
	go func() {
		_ = c.SetWriteDeadline(time.Now().Add(10 * time.Second))
		_, err := c.Write(make([]byte, size))
		done <- err
	}()
	time.Sleep(300 * time.Millisecond)
	if got := srv.got.Load(); got > size/4 {
		t.Fatalf("%d bytes through a 1 Mbit/s link in 300ms", got)
	}
	p.SetShape(Shape{})
	waitFor(t, "the rest at full speed", func() bool { return srv.got.Load() == size })
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
