package failover

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/tandemvm/tandem/internal/trust"
)

// tlsClusterID is the cluster ID of TLS test trios: refusals must not
// reveal it.
const tlsClusterID = "tls-cluster-9b1e07"

// testCA makes a CA in a temp dir and certificates for names.
func testCA(t *testing.T, names ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "certs")
	now := time.Now()
	if err := trust.NewCA(dir, "failover test CA", now); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if err := trust.Issue(dir, n, trust.IssueOptions{IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}, now); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func loadIdentity(t *testing.T, dir, name string) *trust.Identity {
	t.Helper()
	id, err := trust.Load(trust.Config{CAFile: filepath.Join(dir, trust.CAFile), CertFile: filepath.Join(dir, trust.CertFile(name)), KeyFile: filepath.Join(dir, trust.KeyFile(name))})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// tlsTestCluster is a test trio whose raft ports are mutual TLS. Its CA
// also holds a certificate for "x", which names no member.
func tlsTestCluster(t *testing.T) (*testCluster, string) {
	dir := testCA(t, "p", "s", "w", "x")
	ids := map[string]*trust.Identity{}
	for _, n := range []string{"p", "s", "w"} {
		ids[n] = loadIdentity(t, dir, n)
	}
	c := newTestCluster(t)
	c.tweak = func(cfg *Config) {
		cfg.TLS = ids[cfg.ID]
		cfg.ClusterID = tlsClusterID
	}
	return c, dir
}

func TestTLSTrioFailsOverAndRejoins(t *testing.T) {
	c, _ := tlsTestCluster(t)
	failoverAndRejoin(t, c)
	if got := c.node("s").State().ClusterID; got != tlsClusterID {
		t.Fatalf("cluster id %q", got)
	}
}

func TestTLSTrioSwitchover(t *testing.T) {
	c, _ := tlsTestCluster(t)
	switchover(t, c)
}

func TestTLSTrioWitnessHandsOver(t *testing.T) {
	c, _ := tlsTestCluster(t)
	witnessHandsOver(t, c)
}

// startedTLSTrio is a TLS trio with p active and every member registered.
func startedTLSTrio(t *testing.T) (*testCluster, string) {
	c, dir := tlsTestCluster(t)
	for _, id := range []string{"p", "s", "w"} {
		c.start(id)
	}
	waitFor(t, 10*time.Second, "p active", func() bool { return activeGen(c.node("p")) == 1 })
	waitFor(t, 5*time.Second, "all members registered on p", func() bool { return len(c.node("p").State().Members) == 3 })
	return c, dir
}

// clientTLS is a TLS client configuration that accepts any server, with
// the certificate of name from dir (none if name is empty): the server's
// refusal is what is tested.
func clientTLS(t *testing.T, dir, name string) *tls.Config {
	t.Helper()
	cfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
	if name != "" {
		cert, err := tls.LoadX509KeyPair(filepath.Join(dir, trust.CertFile(name)), filepath.Join(dir, trust.KeyFile(name)))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg
}

// dialRaw connects to addr: plaintext if cfg is nil. The handshake may
// still be refused by the server after this returns (TLS 1.3 clients
// finish first).
func dialRaw(t *testing.T, addr string, cfg *tls.Config) net.Conn {
	t.Helper()
	d := &net.Dialer{Timeout: 2 * time.Second}
	var c net.Conn
	var err error
	if cfg == nil {
		c, err = d.Dial("tcp", addr)
	} else {
		c, err = tls.DialWithDialer(d, "tcp", addr, cfg)
	}
	if err != nil {
		return nil // refused in the handshake: fine
	}
	c.SetDeadline(time.Now().Add(3 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c
}

// expectClosed asserts the server closed c without a raft answer.
func expectClosed(t *testing.T, what string, c net.Conn) {
	t.Helper()
	if c == nil {
		return
	}
	if msg, err := readRPCReply(c, &raft.RequestVoteResponse{}); err == nil {
		t.Errorf("%s: the raft port answered (%q)", what, msg)
	}
}

// raftView is what an attack must not change.
type raftView struct {
	leader string
	terms  map[string]uint64
	gen    uint64 // p's active generation
}

func viewOf(c *testCluster) raftView {
	v := raftView{terms: map[string]uint64{}}
	v.leader, _ = c.node("p").Leader()
	for _, id := range []string{"p", "s", "w"} {
		v.terms[id] = c.node(id).raft.CurrentTerm()
	}
	v.gen = activeGen(c.node("p"))
	return v
}

// holdsFor asserts the cluster keeps view v (the same leader, p active
// under the same generation, no term change anywhere) for d. A moment
// with p not active at all (generation 0, same leader and terms) is its
// leader lease lapsing on a loaded host, which make test has shown: not
// a change any RPC made (a step-down or a vote moves the terms).
func holdsFor(t *testing.T, c *testCluster, v raftView, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		now := viewOf(c)
		genMoved := now.gen != v.gen && now.gen != 0
		if now.leader != v.leader || genMoved || now.terms["p"] != v.terms["p"] || now.terms["s"] != v.terms["s"] || now.terms["w"] != v.terms["w"] {
			t.Fatalf("the cluster changed: before %+v, now %+v", v, now)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func header(c *testCluster, id string) raft.RPCHeader {
	addr := c.peers[id]
	if addr == "" {
		addr = "127.0.0.1:1"
	}
	return raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte(id), Addr: []byte(addr)}
}

// TestRaftPortRefusesNonMembers: no certificate, another CA's
// certificate (even one naming a member), a certificate of the cluster's
// CA naming no member, and plain TCP are all closed before raft sees a
// byte; a forged RequestVote with a high term over them changes nothing.
func TestRaftPortRefusesNonMembers(t *testing.T) {
	c, dir := startedTLSTrio(t)
	other := testCA(t, "s", "w")
	before := viewOf(c)
	clients := map[string]*tls.Config{
		"plain TCP":             nil,
		"no certificate":        clientTLS(t, dir, ""),
		"another CA's w":        clientTLS(t, other, "w"),
		"the CA's non-member x": clientTLS(t, dir, "x"),
	}
	for name, cfg := range clients {
		for _, target := range []string{"s", "p"} {
			conn := dialRaw(t, c.peers[target], cfg)
			if conn == nil {
				continue
			}
			claim := "w"
			if name == "the CA's non-member x" {
				claim = "x"
			}
			sendRPC(conn, rpcRequestVote, &raft.RequestVoteRequest{RPCHeader: header(c, claim), Term: before.terms[target] + 100,
				LastLogIndex: 1 << 40, LastLogTerm: 1 << 40, LeadershipTransfer: true})
			expectClosed(t, name+" to "+target, conn)
			conn = dialRaw(t, c.peers[target], cfg)
			sendRPC(conn, rpcTimeoutNow, &raft.TimeoutNowRequest{RPCHeader: header(c, "p")})
			expectClosed(t, name+" TimeoutNow to "+target, conn)
			conn = dialRaw(t, c.peers[target], cfg)
			if conn != nil {
				conn.Write([]byte{registerMagic})
				writeFrame(conn, &registerRequest{ClusterID: tlsClusterID, Info: NodeInfo{ID: "s", Role: RoleSecondary, RaftAddr: c.peers["s"], DataAddr: "10.9.9.9:1"}})
				var reply registerReply
				if err := readFrame(conn, &reply); err == nil {
					t.Errorf("%s: registration answered %+v", name, reply)
				}
			}
		}
	}
	holdsFor(t, c, before, time.Second)
	if m, _ := c.node("p").State().Member("s"); m.DataAddr != "127.0.0.1:1s" {
		t.Fatalf("s's entry changed: %+v", m)
	}
}

// TestTimeoutNowOnlyFromLeader: the attack that made the secondary
// primary within 5 ms, over the witness's own (valid, member)
// certificate, and the same with the leader's name forged in the header.
func TestTimeoutNowOnlyFromLeader(t *testing.T) {
	c, dir := startedTLSTrio(t)
	before := viewOf(c)
	if before.leader != "p" {
		t.Fatalf("leader %q", before.leader)
	}
	wCert := clientTLS(t, dir, "w")
	// (a) no certificate.
	conn := dialRaw(t, c.peers["s"], clientTLS(t, dir, ""))
	if conn != nil {
		sendRPC(conn, rpcTimeoutNow, &raft.TimeoutNowRequest{RPCHeader: header(c, "p")})
		expectClosed(t, "no certificate", conn)
	}
	// (b) the witness, a member but not the leader, as itself and
	// claiming to be the leader.
	for _, claim := range []string{"w", "p"} {
		conn = dialRaw(t, c.peers["s"], wCert)
		if conn == nil {
			t.Fatal("the witness's certificate was refused")
		}
		if err := sendRPC(conn, rpcTimeoutNow, &raft.TimeoutNowRequest{RPCHeader: header(c, claim)}); err != nil {
			t.Fatal(err)
		}
		msg, err := readRPCReply(conn, &raft.TimeoutNowResponse{})
		if err != nil || msg == "" {
			t.Fatalf("witness claiming %s: TimeoutNow answered %q, %v; want a refusal", claim, msg, err)
		}
		t.Logf("witness claiming %s: %s", claim, msg)
	}
	holdsFor(t, c, before, 2*time.Second)
}

// TestTimeoutNowPlaintext: without TLS (loopback), the raw TimeoutNow of
// the original attack (no or a non-leader sender) is refused too.
func TestTimeoutNowPlaintext(t *testing.T) {
	c := newTestCluster(t)
	for _, id := range []string{"p", "s", "w"} {
		c.start(id)
	}
	waitFor(t, 10*time.Second, "p active", func() bool { return activeGen(c.node("p")) == 1 })
	before := viewOf(c)
	for _, h := range []raft.RPCHeader{{}, header(c, "w"), {ID: []byte("p"), Addr: []byte("127.0.0.1:9")}} {
		conn := dialRaw(t, c.peers["s"], nil)
		sendRPC(conn, rpcTimeoutNow, &raft.TimeoutNowRequest{RPCHeader: h})
		if msg, err := readRPCReply(conn, &raft.TimeoutNowResponse{}); err != nil || msg == "" {
			t.Fatalf("TimeoutNow claiming %q at %q answered %q, %v; want a refusal", h.ID, h.Addr, msg, err)
		}
	}
	holdsFor(t, c, before, 2*time.Second)
}

// TestForgedVotesChangeNothing: a RequestVote with a high term from a
// certificate naming no member never reaches raft; from a member that is
// not a transfer's target, its LeadershipTransfer flag is ignored, so the
// leader neither steps down nor votes.
func TestForgedVotesChangeNothing(t *testing.T) {
	c, dir := startedTLSTrio(t)
	before := viewOf(c)
	conn := dialRaw(t, c.peers["s"], clientTLS(t, dir, "x"))
	if conn != nil {
		sendRPC(conn, rpcRequestVote, &raft.RequestVoteRequest{RPCHeader: header(c, "x"), Term: before.terms["s"] + 1000, LastLogIndex: 1 << 40, LastLogTerm: 1 << 40})
		expectClosed(t, "non-member x", conn)
	}
	conn = dialRaw(t, c.peers["p"], clientTLS(t, dir, "w"))
	sendRPC(conn, rpcRequestVote, &raft.RequestVoteRequest{RPCHeader: header(c, "w"), Term: before.terms["p"] + 1000,
		LastLogIndex: 1 << 40, LastLogTerm: 1 << 40, LeadershipTransfer: true})
	var resp raft.RequestVoteResponse
	if _, err := readRPCReply(conn, &resp); err != nil || resp.Granted {
		t.Fatalf("witness's forged transfer vote: granted %v, err %v", resp.Granted, err)
	}
	holdsFor(t, c, before, time.Second)
	if got := c.node("s").raft.CurrentTerm(); got != before.terms["s"] {
		t.Fatalf("s's term %d, was %d", got, before.terms["s"])
	}
}

// TestRegistrationOnlyForSelf: the witness's certificate cannot register
// s with a foreign data address; a wrong cluster ID is refused without
// revealing the cluster's.
func TestRegistrationOnlyForSelf(t *testing.T) {
	c, dir := startedTLSTrio(t)
	p := c.node("p")
	sBefore, _ := p.State().Member("s")
	register := func(as string, req registerRequest) registerReply {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		conn, err := trust.Dial(ctx, loadIdentity(t, dir, as), c.peers["p"], "p")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(3 * time.Second))
		conn.Write([]byte{registerMagic})
		if err := writeFrame(conn, &req); err != nil {
			t.Fatal(err)
		}
		var reply registerReply
		if err := readFrame(conn, &reply); err != nil {
			t.Fatal(err)
		}
		return reply
	}
	forged := NodeInfo{ID: "s", Role: RoleSecondary, RaftAddr: c.peers["s"], DataAddr: "10.9.9.9:7312"}
	reply := register("w", registerRequest{ClusterID: tlsClusterID, Info: forged})
	if reply.Err == "" {
		t.Fatal("w's certificate registered s")
	}
	t.Logf("w as s: %s", reply.Err)
	// The same from the certificate "x" (of the CA, no member) never gets
	// that far: the connection is closed.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if conn, err := trust.Dial(ctx, loadIdentity(t, dir, "x"), c.peers["p"], "p"); err == nil {
		conn.SetDeadline(time.Now().Add(3 * time.Second))
		conn.Write([]byte{registerMagic})
		writeFrame(conn, &registerRequest{ClusterID: tlsClusterID, Info: forged})
		var r registerReply
		if err := readFrame(conn, &r); err == nil {
			t.Fatalf("x's registration answered %+v", r)
		}
		conn.Close()
	}
	// A wrong cluster, from s itself: refused, the ID not revealed.
	reply = register("s", registerRequest{ClusterID: "guess", Info: sBefore})
	if !strings.Contains(reply.Err, "wrong cluster") || strings.Contains(reply.Err, tlsClusterID) {
		t.Fatalf("wrong-cluster reply %q", reply.Err)
	}
	time.Sleep(300 * time.Millisecond)
	for _, id := range []string{"p", "s", "w"} {
		if m, _ := c.node(id).State().Member("s"); m != sBefore {
			t.Fatalf("%s: member s is %+v, was %+v", id, m, sBefore)
		}
	}
}

func TestRaftPortPlaintextOffLoopbackRefused(t *testing.T) {
	peers := map[string]string{"a": "192.0.2.1:7301", "b": "192.0.2.2:7302", "c": "192.0.2.3:7303"}
	cfg := Config{ID: "a", Role: RolePrimary, Peers: peers, DataDir: t.TempDir()}
	if _, err := Open(cfg); !errors.Is(err, trust.ErrPlaintext) {
		t.Fatalf("plaintext raft on 192.0.2.1: %v, want trust.ErrPlaintext", err)
	}
	// With a certificate, or Insecure, the address passes the check.
	dir := testCA(t, "a", "b")
	cfg.TLS = loadIdentity(t, dir, "a")
	if _, err := cfg.withDefaults(); err != nil {
		t.Fatalf("TLS: %v", err)
	}
	// A certificate naming another member is refused.
	cfg.TLS = loadIdentity(t, dir, "b")
	if _, err := cfg.withDefaults(); !errors.Is(err, ErrConfig) {
		t.Fatalf("b's certificate on node a: %v, want ErrConfig", err)
	}
	cfg.TLS, cfg.Insecure = nil, true
	if _, err := cfg.withDefaults(); err != nil {
		t.Fatalf("insecure: %v", err)
	}
}
