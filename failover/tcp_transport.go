package failover

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"
	"github.com/tandemvm/tandem/internal/trust"
)

// registerMagic starts a registration connection on the raft port. raft's
// NetworkTransport starts every connection with an RPC type byte 0..4, so
// one byte tells the two apart and the trio needs a single port per node.
const registerMagic byte = 0xA7

// maxRegisterFrame bounds a registration message: an ID, a role and four
// addresses fit many times over.
const maxRegisterFrame = 4 << 10

// Deadlines on the raft port. handshakeTimeout bounds an accepted
// connection's TLS handshake, classifyTimeout the wait for its first byte
// after it, registerReadTimeout the registration frame, registerWriteTimeout
// the reply.
const (
	handshakeTimeout     = trust.HandshakeTimeout
	classifyTimeout      = 5 * time.Second
	registerReadTimeout  = 2 * time.Second
	registerWriteTimeout = 2 * time.Second
)

// maxUnclassified bounds the accepted connections still in their handshake
// or before their first byte (or in a registration); beyond it new ones are
// closed at once.
const maxUnclassified = 64

// maxRaftConns bounds the connections serving raft RPCs at once. Two
// peers need a handful each (raft's connection pool per peer, plus
// heartbeats); beyond it a new one is closed, so a peer cannot hold an
// unbounded number of 256 KiB readers, each decoding a request for up to
// rpcReadTimeout.
const maxRaftConns = 32

// muxConfig configures a muxStream.
type muxConfig struct {
	// Addr is the address to listen on, and the address raft advertises
	// (Addr()); a port 0 advertises the port chosen.
	Addr string
	// TLS: mutual TLS against the cluster CA; nil: plaintext, loopback
	// only unless Insecure.
	TLS      *trust.Identity
	Insecure bool
	// Members maps every voter's ID to its raft address: the only
	// addresses Dial reaches, and the only IDs a peer may be.
	Members map[string]string
	// Handle serves a registration request already checked against the
	// connection's identity. Nil: registrations are refused.
	Handle func(registerRequest) registerReply
	// Policy answers the raft RPC rules (who leads, which transfer this
	// node started). Nil: every TimeoutNow is refused.
	Policy raftPolicy
	Log    *slog.Logger
}

// muxStream is the raft.StreamLayer under raft's NetworkTransport, and the
// server side of raft's RPCs on this node: TCP or mutual TLS, plus (a) the
// registration RPC a follower uses to put its addresses into the FSM
// through the leader, and (b) an isolation switch tests use to cut a node
// off (dials fail, live connections break, accepted ones close).
//
// Accepted raft connections are served here (rpc.go), not by the
// NetworkTransport, so that every RPC is checked against the connection's
// certificate and the node's view of raft before raft sees it.
type muxStream struct {
	ln        net.Listener
	advertise net.Addr
	id        *trust.Identity
	insecure  bool
	members   map[string]string // ID -> raft address
	byAddr    map[string]string // raft address -> ID
	handle    func(registerRequest) registerReply
	policy    raftPolicy
	log       *slog.Logger

	// rpcs carries checked RPCs to raft (the transport's Consumer).
	rpcs        chan raft.RPC
	heartbeatMu sync.Mutex
	heartbeatFn func(raft.RPC)

	unclassified chan struct{} // semaphore, maxUnclassified
	serving      chan struct{} // semaphore, maxRaftConns: connections serving raft RPCs
	closed       chan struct{}
	closeOnce    sync.Once
	isolated     atomic.Bool

	// connsMu guards conns, every connection this layer handed out or
	// serves, so isolation and Close can break them.
	connsMu sync.Mutex
	conns   map[*trackedConn]struct{}

	// heard is, for each member ID, when this node last heard from it
	// (unix nanoseconds; 0: never): an answer on a connection dialed to
	// it, or a request it sent that was admitted. down is when an RPC to
	// it last failed (0: the last one did not). Both maps are set once
	// and read freely.
	heard map[string]*atomic.Int64
	down  map[string]*atomic.Int64
	// leaderCommit is the highest commit index a leader's AppendEntries
	// (not a heartbeat: those carry none) told this node of since it
	// started: what WaitSynced must have applied on a follower.
	leaderCommit atomic.Uint64

	wg sync.WaitGroup
}

func listenMux(cfg muxConfig) (*muxStream, error) {
	ln, err := trust.Listen(cfg.TLS, cfg.Insecure, "--raft", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("failover: raft port: %w", err)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	m := &muxStream{
		ln:           ln,
		advertise:    ln.Addr(),
		id:           cfg.TLS,
		insecure:     cfg.Insecure,
		members:      map[string]string{},
		byAddr:       map[string]string{},
		handle:       cfg.Handle,
		policy:       cfg.Policy,
		log:          cfg.Log,
		rpcs:         make(chan raft.RPC),
		unclassified: make(chan struct{}, maxUnclassified),
		serving:      make(chan struct{}, maxRaftConns),
		closed:       make(chan struct{}),
		conns:        make(map[*trackedConn]struct{}),
		heard:        map[string]*atomic.Int64{},
		down:         map[string]*atomic.Int64{},
	}
	if _, port, err := net.SplitHostPort(cfg.Addr); err == nil && port != "0" {
		// raft puts this address in every RPC it sends; peers check it
		// against their member list, which holds the configured form.
		m.advertise = advertisedAddr(cfg.Addr)
	}
	for id, a := range cfg.Members {
		m.members[id] = a
		m.byAddr[a] = id
		m.heard[id] = new(atomic.Int64)
		m.down[id] = new(atomic.Int64)
	}
	m.wg.Add(1)
	go m.acceptLoop()
	return m, nil
}

// advertisedAddr is the raft address as configured (a host name stays a
// host name), which is what raft must advertise to its peers.
type advertisedAddr string

func (advertisedAddr) Network() string  { return "tcp" }
func (a advertisedAddr) String() string { return string(a) }

// Accept implements net.Listener for raft's NetworkTransport. Nothing comes
// out: this layer serves accepted raft connections itself (rpc.go). It
// returns when the layer closes.
func (m *muxStream) Accept() (net.Conn, error) {
	<-m.closed
	return nil, net.ErrClosed
}

// Close stops accepting and breaks every connection. It waits for the
// accept loop and every connection's goroutine, which all end on close.
func (m *muxStream) Close() error {
	m.closeOnce.Do(func() {
		close(m.closed)
		m.ln.Close()
		m.breakAll()
	})
	m.wg.Wait()
	return nil
}

func (m *muxStream) Addr() net.Addr { return m.advertise }

// Dial implements raft.StreamLayer. It reaches members only: the address
// must be a member's raft address, and with TLS the server's certificate
// must name that member.
func (m *muxStream) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	if m.isolated.Load() {
		return nil, fmt.Errorf("failover: dial %s: node isolated", address)
	}
	id, ok := m.byAddr[string(address)]
	if !ok {
		return nil, fmt.Errorf("failover: dial %s: not the raft address of a member (%s)", address, m.memberList())
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := trust.Dial(ctx, m.id, string(address), id)
	if err != nil {
		return nil, fmt.Errorf("failover: dial %s (%s): %w", id, address, err)
	}
	tc := m.track(c)
	tc.from = m.heard[id] // what comes back on it is id's answer
	return tc, nil
}

// noteHeard records that member id was heard from now.
func (m *muxStream) noteHeard(id string) {
	if h := m.heard[id]; h != nil {
		h.Store(time.Now().UnixNano())
	}
}

// noteResult records the outcome of an RPC to member id (a failure marks
// it down until it is heard again) and returns err.
func (m *muxStream) noteResult(id string, err error) error {
	if d := m.down[id]; d != nil {
		if err != nil {
			d.Store(time.Now().UnixNano())
		} else {
			d.Store(0)
		}
	}
	return err
}

// reachableWaitTick is how often waitReachable looks again.
const reachableWaitTick = 10 * time.Millisecond

// maxReachableWait bounds waitReachable: past it the RPC is sent (and
// fails, or not) as raft would have sent it, so a follower raft stops
// replicating to (removed, or never heard again) holds its replication
// goroutine no longer than this.
const maxReachableWait = 5 * time.Second

// waitReachable returns once member id may be sent an RPC that carries
// the log: at once unless its last RPC failed; otherwise once it has been
// heard since (a heartbeat answered, or a request of its own), this node
// stops leading, the layer closes, or maxReachableWait passes.
func (m *muxStream) waitReachable(id string) {
	d, h := m.down[id], m.heard[id]
	if d == nil || d.Load() == 0 {
		return
	}
	t := time.NewTicker(reachableWaitTick)
	defer t.Stop()
	deadline := time.Now().Add(maxReachableWait)
	for {
		if since := d.Load(); since == 0 || h.Load() > since || time.Now().After(deadline) {
			return
		}
		if m.policy == nil || !m.policy.leading() {
			return
		}
		select {
		case <-m.closed:
			return
		case <-t.C:
		}
	}
}

// lastHeard is when member id was last heard from (zero: never).
func (m *muxStream) lastHeard(id string) time.Time {
	h := m.heard[id]
	if h == nil || h.Load() == 0 {
		return time.Time{}
	}
	return time.Unix(0, h.Load())
}

func (m *muxStream) memberList() string {
	var parts []string
	for id, a := range m.members {
		parts = append(parts, id+"="+a)
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
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

func (m *muxStream) track(c net.Conn) *trackedConn {
	tc := &trackedConn{Conn: c, m: m}
	m.connsMu.Lock()
	m.conns[tc] = struct{}{}
	m.connsMu.Unlock()
	select {
	case <-m.closed: // Close's breakAll may have run before this insert
		c.Close()
	default:
	}
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
		select {
		case m.unclassified <- struct{}{}:
		default:
			m.log.Warn("raft port: connection refused", "remote", c.RemoteAddr().String(), "why", fmt.Sprintf("%d connections already in their handshake", maxUnclassified))
			c.Close()
			continue
		}
		m.wg.Add(1)
		go m.classify(c)
	}
}

// classify authenticates a connection, reads its first byte and routes it:
// a registration, or raft RPCs.
func (m *muxStream) classify(raw net.Conn) {
	defer m.wg.Done()
	c := m.track(raw) // Close and isolation break it from here on
	release := sync.OnceFunc(func() { <-m.unclassified })
	defer release()
	peer, err := m.authenticate(raw)
	if err != nil {
		m.log.Warn("raft port: connection refused", "remote", raw.RemoteAddr().String(), "why", err.Error())
		c.Close()
		return
	}
	c.SetReadDeadline(time.Now().Add(classifyTimeout))
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		c.Close()
		return
	}
	c.SetReadDeadline(time.Time{})
	switch {
	case b[0] == registerMagic:
		m.serveRegister(c, raw, peer)
	case b[0] <= rpcTypeMax:
		release()
		select {
		case m.serving <- struct{}{}:
		default:
			m.log.Warn("raft port: connection refused", "remote", raw.RemoteAddr().String(), "peer", peer,
				"why", fmt.Sprintf("%d connections already serving raft RPCs", maxRaftConns))
			c.Close()
			return
		}
		m.serveRaft(&rpcConn{Conn: c}, b[0], peer)
		<-m.serving
	default:
		m.log.Warn("raft port: connection refused", "remote", raw.RemoteAddr().String(), "peer", peer, "why", fmt.Sprintf("first byte %#x is neither a raft RPC nor a registration", b[0]))
		c.Close()
	}
}

// authenticate completes an accepted connection's TLS handshake within
// handshakeTimeout and returns the member its certificate names. Without
// TLS it returns "" (the listener binds loopback only, unless Insecure).
func (m *muxStream) authenticate(c net.Conn) (string, error) {
	if m.id == nil {
		return "", nil
	}
	if err := trust.Handshake(c, handshakeTimeout); err != nil {
		cert := "no certificate"
		var ve *tls.CertificateVerificationError
		if errors.As(err, &ve) && len(ve.UnverifiedCertificates) > 0 {
			cert = "certificate " + certDesc(ve.UnverifiedCertificates[0].Subject.CommonName, ve.UnverifiedCertificates[0].DNSNames)
		}
		return "", fmt.Errorf("%s: TLS handshake failed: %v", cert, err)
	}
	name, _ := trust.PeerName(c)
	return m.memberNamed(trust.PeerNames(c), name)
}

// memberNamed is the one member a certificate's names name.
func (m *muxStream) memberNamed(names []string, name string) (string, error) {
	var found, uniq []string
	for _, n := range names {
		if !slices.Contains(uniq, n) {
			uniq = append(uniq, n)
		}
		if _, ok := m.members[n]; ok && !slices.Contains(found, n) {
			found = append(found, n)
		}
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		return "", fmt.Errorf("certificate %s (names %s) is of the cluster CA but names no member (%s)", certDesc(name, nil), strings.Join(uniq, ","), m.memberList())
	}
	return "", fmt.Errorf("certificate %s names several members (%s): ambiguous, refused", certDesc(name, nil), strings.Join(found, ","))
}

func certDesc(cn string, dns []string) string {
	if cn == "" && len(dns) > 0 {
		cn = dns[0]
	}
	return fmt.Sprintf("%q", cn)
}

// serveRegister serves one registration. A registration may change only
// the registering node's own entry: with TLS, the NodeInfo's ID must be
// the member the connection's certificate names; without TLS the peer
// must be on loopback (or the operator chose Insecure).
func (m *muxStream) serveRegister(c net.Conn, raw net.Conn, peer string) {
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(registerReadTimeout))
	var req registerRequest
	if err := readFrame(c, &req); err != nil {
		m.log.Warn("raft port: registration refused", "remote", raw.RemoteAddr().String(), "peer", peer, "why", err.Error())
		return
	}
	var reply registerReply
	if err := m.checkRegistrant(raw, peer, req.Info.ID); err != nil {
		m.log.Warn("raft port: registration refused", "remote", raw.RemoteAddr().String(), "peer", peer, "claims", req.Info.ID, "why", err.Error())
		reply.Err = fmt.Sprintf("failover: registration of %q refused: %s", req.Info.ID, errNotYours)
	} else if m.handle == nil {
		reply.Err = ErrClosed.Error()
	} else {
		reply = m.handle(req)
	}
	c.SetWriteDeadline(time.Now().Add(registerWriteTimeout))
	writeFrame(c, &reply)
}

// errNotYours is what a registrant refused by checkRegistrant is told.
const errNotYours = "a node may register only itself (with TLS: the ID its certificate names; without: from loopback)"

func (m *muxStream) checkRegistrant(raw net.Conn, peer, claimed string) error {
	if m.id != nil {
		// peer is the one member the certificate names (authenticate).
		if claimed != peer {
			return fmt.Errorf("the connection's certificate names member %q, the registration is for %q", peer, claimed)
		}
		return nil
	}
	if m.insecure {
		return nil // plaintext off loopback: the operator's explicit choice
	}
	host, _, err := net.SplitHostPort(raw.RemoteAddr().String())
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("plaintext registration from %s, not loopback", raw.RemoteAddr())
	}
	return nil
}

// trackedConn fails every call once its layer is isolated, so a partition
// in a test also breaks pooled connections raft keeps open.
type trackedConn struct {
	net.Conn
	m *muxStream
	// from, on a connection this node dialed, is when its member was last
	// heard from: every read that returns bytes sets it.
	from *atomic.Int64
}

func (c *trackedConn) Read(p []byte) (int, error) {
	if c.m.isolated.Load() {
		return 0, errors.New("failover: node isolated")
	}
	n, err := c.Conn.Read(p)
	if n > 0 && c.from != nil {
		c.from.Store(time.Now().UnixNano())
	}
	return n, err
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
// serveRaft reads requests with no deadline of its own (raft's
// NetworkTransport set none either), so without this a peer
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

// registerRemote sends req to the node at addr (a member's raft address)
// and returns its reply. The whole exchange is bounded by timeout.
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
		return fmt.Errorf("%w: frame of %d bytes (limit %d)", ErrCorrupt, n, maxRegisterFrame)
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
