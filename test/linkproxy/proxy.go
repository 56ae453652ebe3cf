package linkproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/tandemvm/tandem/precopy"
)

// Shape is how the link behaves. The zero Shape is a plain proxy.
type Shape struct {
	// Bandwidth is the limit in bits per second, applied to each direction
	// separately and shared by all connections; 0 means unlimited.
	Bandwidth uint64
	// Latency is added to every byte in each direction (so a round trip
	// gains twice this).
	Latency time.Duration
}

// Stats counts what the proxy has done.
type Stats struct {
	Accepted int    // connections accepted since Start
	Active   int    // connections open now (including ones held by a partition)
	Up, Down uint64 // bytes delivered client->target and target->client
}

const (
	// dialTimeout bounds the connection to the target; a test's target is
	// local, so a slow dial means something is wrong.
	dialTimeout = 5 * time.Second
	// queueChunks bounds the in-flight data per direction of a connection
	// to queueChunks*maxChunk bytes (32 MiB): enough to keep a 1 Gbit/s link
	// full across 250 ms of latency.
	queueChunks = 1024
	maxChunk    = 32 << 10
	minChunk    = 1 << 10
)

// Proxy forwards TCP connections from its listener to a target, shaped.
// Its methods are safe for concurrent use.
type Proxy struct {
	ln     net.Listener
	target string
	ctx    context.Context
	cancel context.CancelFunc
	up     *precopy.Limiter // client -> target
	down   *precopy.Limiter // target -> client
	wg     sync.WaitGroup   // every goroutine the proxy owns

	// mu guards the fields below.
	mu       sync.Mutex
	shape    Shape
	links    map[*link]struct{}
	healed   chan struct{} // closed while not partitioned
	closed   bool
	accepted int
	upBytes  uint64
	dnBytes  uint64
	triggers map[Direction]*trigger // armed CutOn faults
}

// Start listens on listenAddr (e.g. "127.0.0.1:0") and forwards every
// accepted connection to targetAddr, shaped by cfg.
func Start(listenAddr, targetAddr string, cfg Shape) (*Proxy, error) {
	ln, err := net.Listen("tcp", listenAddr)
	if err != nil {
		return nil, fmt.Errorf("linkproxy: listen %s: %w", listenAddr, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	healed := make(chan struct{})
	close(healed)
	p := &Proxy{
		ln:     ln,
		target: targetAddr,
		ctx:    ctx,
		cancel: cancel,
		up:     precopy.NewLimiter(0, 0, nil),
		down:   precopy.NewLimiter(0, 0, nil),
		links:  make(map[*link]struct{}),
		healed: healed,
	}
	p.SetShape(cfg)
	p.wg.Add(1)
	go p.acceptLoop()
	return p, nil
}

// Addr is the address clients connect to.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Shape returns the shape in force.
func (p *Proxy) Shape() Shape {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.shape
}

// SetShape changes the shape for data read from now on. Data already
// queued keeps the delay it was given.
func (p *Proxy) SetShape(s Shape) {
	if s.Latency < 0 {
		s.Latency = 0
	}
	rate := s.Bandwidth / 8
	// 100 ms of burst: a test machine's scheduler can oversleep by tens
	// of milliseconds, and tokens lost to a full bucket are throughput
	// lost for good.
	burst := max(rate/10, 2*maxChunk)
	p.mu.Lock()
	p.shape = s
	p.mu.Unlock()
	p.up.SetRate(rate, burst)
	p.down.SetRate(rate, burst)
}

// Partition turns a partition on or off. While on, nothing is delivered in
// either direction, connections stop being read once their current chunk
// is held, and new connections are accepted (the kernel completes the
// handshake anyway) but held without dialling the target: peers see
// silence and time out, never a reset. Turning it off delivers what was
// held, in order, and lets held connections through.
func (p *Proxy) Partition(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.healed:
		if on {
			p.healed = make(chan struct{})
		}
	default:
		if !on {
			close(p.healed)
		}
	}
}

// Partitioned reports whether a partition is on.
func (p *Proxy) Partitioned() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.healed:
		return false
	default:
		return true
	}
}

// Cut closes every current connection abruptly (a reset to both peers) and
// returns how many it cut. Later connections are unaffected.
func (p *Proxy) Cut() int {
	p.mu.Lock()
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		l.abort()
	}
	return len(links)
}

// Stats returns the counters.
func (p *Proxy) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return Stats{Accepted: p.accepted, Active: len(p.links), Up: p.upBytes, Down: p.dnBytes}
}

// Close stops the listener, cuts every connection and returns once every
// goroutine of the proxy has ended. It is idempotent.
func (p *Proxy) Close() error {
	p.mu.Lock()
	already := p.closed
	p.closed = true
	p.mu.Unlock()
	var err error
	if !already {
		p.cancel()
		if cerr := p.ln.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
			err = fmt.Errorf("linkproxy: close listener: %w", cerr)
		}
		p.Cut()
	}
	p.wg.Wait()
	return err
}

func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if p.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors or the like: back off briefly rather
			// than spin, and give up when the proxy closes.
			select {
			case <-p.ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		l := &link{client: c}
		l.ctx, l.cancel = context.WithCancel(p.ctx)
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			l.abort()
			return
		}
		p.accepted++
		p.links[l] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(l)
	}
}

// link is one proxied connection.
type link struct {
	client net.Conn
	ctx    context.Context
	cancel context.CancelFunc

	// mu guards server and aborted.
	mu      sync.Mutex
	server  net.Conn // nil until dialled
	aborted bool
}

// abort ends the connection with a reset on both sides: SO_LINGER 0 makes
// close send RST instead of FIN, which is what a cut link looks like to a
// peer that was mid-stream.
func (l *link) abort() {
	l.cancel()
	l.mu.Lock()
	l.aborted = true
	server := l.server
	l.mu.Unlock()
	resetClose(l.client)
	if server != nil {
		resetClose(server)
	}
}

func resetClose(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// setServer records the dialled target connection, unless the link was
// aborted meanwhile (then the caller must close it).
func (l *link) setServer(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.aborted {
		return false
	}
	l.server = c
	return true
}

// gate returns when no partition is on, or false when ctx ends first.
func (p *Proxy) gate(ctx context.Context) bool {
	p.mu.Lock()
	healed := p.healed
	p.mu.Unlock()
	select {
	case <-healed:
		return ctx.Err() == nil
	case <-ctx.Done():
		return false
	}
}

func (p *Proxy) serve(l *link) {
	defer p.wg.Done()
	defer func() {
		l.cancel()
		p.mu.Lock()
		delete(p.links, l)
		p.mu.Unlock()
	}()

	// A connection accepted during a partition is held here: the target
	// must not see it until the partition heals.
	if !p.gate(l.ctx) {
		l.abort()
		return
	}
	dctx, dcancel := context.WithTimeout(l.ctx, dialTimeout)
	var d net.Dialer
	server, err := d.DialContext(dctx, "tcp", p.target)
	dcancel()
	if err != nil {
		// The target is unreachable: the client sees its connection
		// close, as it would through a router with no route.
		l.abort()
		return
	}
	if !l.setServer(server) {
		resetClose(server)
		return
	}

	var dirs sync.WaitGroup
	dirs.Add(2)
	go p.direction(l, Up, l.client, server, p.up, &p.upBytes, &dirs)
	go p.direction(l, Down, server, l.client, p.down, &p.dnBytes, &dirs)
	finished := make(chan struct{})
	go func() { dirs.Wait(); close(finished) }()

	select {
	case <-finished:
		// Both directions ended with EOF, delivered as half-closes.
		_ = l.client.Close()
		_ = server.Close()
	case <-l.ctx.Done():
		l.abort()
		<-finished
	}
}

// chunk is data read from one side, due for delivery to the other at due.
type chunk struct {
	data []byte
	due  time.Time
	eof  bool
}

// direction moves src's bytes to dst: a reader that paces the bytes by the
// shared limiter and stamps them with their delivery time, and a writer
// that delivers them at that time. The queue between them is what lets
// latency add delay without costing throughput.
func (p *Proxy) direction(l *link, dir Direction, src, dst net.Conn, lim *precopy.Limiter, delivered *uint64, done *sync.WaitGroup) {
	defer done.Done()
	queue := make(chan chunk, queueChunks)
	var rw sync.WaitGroup
	rw.Add(1)
	go func() {
		defer rw.Done()
		p.writeLoop(l, dst, queue, delivered)
	}()
	p.readLoop(l, dir, src, lim, queue)
	rw.Wait()
}

func (p *Proxy) chunkSize() int {
	p.mu.Lock()
	bw := p.shape.Bandwidth
	p.mu.Unlock()
	if bw == 0 {
		return maxChunk
	}
	// About 10 ms of data per chunk keeps the pacing smooth at low rates.
	n := int(min(bw/8/100, maxChunk))
	return max(n, minChunk)
}

func (p *Proxy) latency() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.shape.Latency
}

func (p *Proxy) readLoop(l *link, dir Direction, src net.Conn, lim *precopy.Limiter, queue chan<- chunk) {
	buf := make([]byte, maxChunk)
	for {
		n, err := src.Read(buf[:p.chunkSize()])
		if n > 0 {
			data := make([]byte, n)
			copy(data, buf[:n])
			if p.tripped(dir, data) {
				// Cut before anything of this read is delivered.
				l.abort()
				close(queue)
				return
			}
			// Hold reading while partitioned so the sender's
			// buffers fill up, as on a dead link.
			if !p.gate(l.ctx) {
				return
			}
			if lim.Wait(l.ctx, n) != nil {
				return
			}
			if !send(l.ctx, queue, chunk{data: data, due: time.Now().Add(p.latency())}) {
				return
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				send(l.ctx, queue, chunk{eof: true, due: time.Now().Add(p.latency())})
			} else {
				l.cancel() // reset, or closed by an abort: end both directions
			}
			// Let the writer end once it has delivered the queue.
			close(queue)
			return
		}
	}
}

func send(ctx context.Context, queue chan<- chunk, c chunk) bool {
	select {
	case queue <- c:
		return true
	case <-ctx.Done():
		return false
	}
}

func (p *Proxy) writeLoop(l *link, dst net.Conn, queue <-chan chunk, delivered *uint64) {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		var c chunk
		var ok bool
		select {
		case c, ok = <-queue:
			if !ok {
				return
			}
		case <-l.ctx.Done():
			return
		}
		if wait := time.Until(c.due); wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-l.ctx.Done():
				return
			}
		}
		if !p.gate(l.ctx) {
			return
		}
		if c.eof {
			if cw, ok := dst.(interface{ CloseWrite() error }); ok {
				_ = cw.CloseWrite()
			}
			continue // the reader closes the queue right after
		}
		if _, err := dst.Write(c.data); err != nil {
			l.cancel()
			return
		}
		p.mu.Lock()
		*delivered += uint64(len(c.data))
		p.mu.Unlock()
	}
}
