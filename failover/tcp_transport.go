package failover

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"
)

// registerMagic starts a registration connection on the raft port. raft's
// NetworkTransport starts every connection with an RPC type byte 0..4, so
// one byte tells the two apart and the trio needs a single port per node.
const registerMagic byte = 0xA7

// maxRegisterFrame bounds a registration message: a few addresses.
const maxRegisterFrame = 16 << 10

// classifyTimeout bounds how long an accepted connection may take to send
// its first byte.
const classifyTimeout = 5 * time.Second

// muxStream is the raft.StreamLayer under raft's NetworkTransport: plain
// TCP, plus (a) the registration RPC a follower uses to put its addresses
// into the FSM through the leader, and (b) an isolation switch tests use to
// cut a node off (dials fail, live connections break, accepted ones close).
type muxStream struct {
	ln        net.Listener
	raftConns chan net.Conn
	closed    chan struct{}
	closeOnce sync.Once
	isolated  atomic.Bool
	// handle serves a registration request; set before the accept loop
	// starts and never changed.
	handle func(registerRequest) registerReply

	// connsMu guards conns, every connection this layer handed out, so
	// isolation and Close can break them.
	connsMu sync.Mutex
	conns   map[*trackedConn]struct{}

	wg sync.WaitGroup
}

func listenMux(addr string, handle func(registerRequest) registerReply) (*muxStream, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("failover: listen on raft address %s: %w", addr, err)
	}
	m := &muxStream{
		ln:        ln,
		raftConns: make(chan net.Conn),
		closed:    make(chan struct{}),
		handle:    handle,
		conns:     make(map[*trackedConn]struct{}),
	}
	m.wg.Add(1)
	go m.acceptLoop()
	return m, nil
}

// Accept implements net.Listener for raft: only raft connections come out.
func (m *muxStream) Accept() (net.Conn, error) {
	select {
	case c := <-m.raftConns:
		return c, nil
	case <-m.closed:
		return nil, net.ErrClosed
	}
}

// Close stops accepting and breaks every connection. It waits for the
// accept loop and registration handlers, which are all bounded by deadlines.
func (m *muxStream) Close() error {
	m.closeOnce.Do(func() {
		close(m.closed)
		m.ln.Close()
		m.breakAll()
	})
	m.wg.Wait()
	return nil
}

func (m *muxStream) Addr() net.Addr { return m.ln.Addr() }

// Dial implements raft.StreamLayer.
func (m *muxStream) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	if m.isolated.Load() {
		return nil, fmt.Errorf("failover: dial %s: node isolated", address)
	}
	c, err := net.DialTimeout("tcp", string(address), timeout)
	if err != nil {
		return nil, err
	}
	return m.track(c), nil
}

// setIsolated cuts this node off the network (tests) or reconnects it.
func (m *muxStream) setIsolated(on bool) {
	m.isolated.Store(on)
	if on {
		m.breakAll()
	}
}

func (m *muxStream) breakAll() {
	m.connsMu.Lock()
	defer m.connsMu.Unlock()
	for c := range m.conns {
		c.Conn.Close()
	}
}

func (m *muxStream) track(c net.Conn) net.Conn {
	tc := &trackedConn{Conn: c, m: m}
	m.connsMu.Lock()
	m.conns[tc] = struct{}{}
	m.connsMu.Unlock()
	return tc
}

func (m *muxStream) acceptLoop() {
	defer m.wg.Done()
	for {
		c, err := m.ln.Accept()
		if err != nil {
			select {
			case <-m.closed:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Transient (EMFILE and the like): back off briefly.
			select {
			case <-time.After(20 * time.Millisecond):
			case <-m.closed:
				return
			}
			continue
		}
		if m.isolated.Load() {
			c.Close()
			continue
		}
		m.wg.Add(1)
		go m.classify(c)
	}
}

// classify reads the first byte and routes the connection.
func (m *muxStream) classify(c net.Conn) {
	defer m.wg.Done()
	c.SetReadDeadline(time.Now().Add(classifyTimeout))
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		c.Close()
		return
	}
	c.SetReadDeadline(time.Time{})
	if b[0] == registerMagic {
		m.serveRegister(c)
		return
	}
	tc := m.track(&rpcConn{Conn: &prefixConn{Conn: c, prefix: b[:]}})
	select {
	case m.raftConns <- tc:
	case <-m.closed:
		tc.Close()
	}
}

func (m *muxStream) serveRegister(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(classifyTimeout))
	var req registerRequest
	if err := readFrame(c, &req); err != nil {
		return
	}
	reply := m.handle(req)
	writeFrame(c, &reply)
}

// trackedConn fails every call once its layer is isolated, so a partition
// in a test also breaks pooled connections raft keeps open.
type trackedConn struct {
	net.Conn
	m *muxStream
}

func (c *trackedConn) Read(p []byte) (int, error) {
	if c.m.isolated.Load() {
		return 0, errors.New("failover: node isolated")
	}
	return c.Conn.Read(p)
}

func (c *trackedConn) Write(p []byte) (int, error) {
	if c.m.isolated.Load() {
		return 0, errors.New("failover: node isolated")
	}
	return c.Conn.Write(p)
}

func (c *trackedConn) Close() error {
	c.m.connsMu.Lock()
	delete(c.m.conns, c)
	c.m.connsMu.Unlock()
	return c.Conn.Close()
}

// rpcReadTimeout bounds one inbound raft RPC, from its first byte until
// this node writes the response, and the writing of that response.
// raft's NetworkTransport sets no deadline at all on the connections it
// accepts (its Timeout is for the RPCs it sends), so without this a peer
// that sent one byte and then trickled, or stopped, held a goroutine
// and a connection forever. A real RPC (a heartbeat, a few log entries,
// the trio's small FSM snapshot) takes milliseconds; the sender itself
// gives up after its NetworkTransportConfig.Timeout.
var rpcReadTimeout = 5 * time.Second // a var for tests

// rpcConn applies rpcReadTimeout to the RPCs raft reads from an accepted
// connection. Between RPCs it sets no deadline: raft pools its outgoing
// connections and reuses an idle one for the next RPC, so closing idle
// connections would fail RPCs for nothing; a connection only gets past
// its first RPC by speaking raft, which the peer authentication of the
// transport is for. raft's handler reads an RPC and writes its response
// on one goroutine, with NoPipeline (node.go) never more than one
// outstanding per connection, so the response marks the end of an RPC.
type rpcConn struct {
	net.Conn
	inRPC bool // a request has begun and its response is not written yet
}

func (c *rpcConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 && !c.inRPC {
		c.inRPC = true
		c.Conn.SetReadDeadline(time.Now().Add(rpcReadTimeout))
	}
	return n, err
}

func (c *rpcConn) Write(p []byte) (int, error) {
	if c.inRPC {
		c.inRPC = false
		c.Conn.SetReadDeadline(time.Time{})
	}
	c.Conn.SetWriteDeadline(time.Now().Add(rpcReadTimeout))
	return c.Conn.Write(p)
}

// prefixConn replays the byte classify consumed.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// registerRequest asks the leader to record Info in the FSM.
type registerRequest struct {
	ClusterID string   `codec:"cluster"`
	Info      NodeInfo `codec:"info"`
}

// registerReply: Err is empty on success. LeaderAddr is the raft address of
// the leader when the receiver is not it.
type registerReply struct {
	Err        string `codec:"err"`
	LeaderAddr string `codec:"leader"`
}

// registerRemote sends req to the node at addr and returns its reply. The
// whole exchange is bounded by timeout.
func (m *muxStream) registerRemote(addr string, req registerRequest, timeout time.Duration) (registerReply, error) {
	c, err := m.Dial(raft.ServerAddress(addr), timeout)
	if err != nil {
		return registerReply{}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte{registerMagic}); err != nil {
		return registerReply{}, err
	}
	if err := writeFrame(c, &req); err != nil {
		return registerReply{}, err
	}
	var reply registerReply
	if err := readFrame(c, &reply); err != nil {
		return registerReply{}, fmt.Errorf("failover: register with %s: %w", addr, err)
	}
	return reply, nil
}

func writeFrame(w io.Writer, v any) error {
	var body []byte
	if err := codec.NewEncoderBytes(&body, mh).Encode(v); err != nil {
		return err
	}
	buf := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	_, err := w.Write(append(buf, body...))
	return err
}

func readFrame(r io.Reader, v any) error {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > maxRegisterFrame {
		return fmt.Errorf("%w: frame of %d bytes", ErrCorrupt, n)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return err
	}
	if err := codec.NewDecoderBytes(body, mh).Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return nil
}
