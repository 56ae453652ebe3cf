package failover

import (
	"bytes"
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"
)

// FuzzReadFrame: registration frames come from the network; no input may
// panic or allocate beyond the frame limit.
func FuzzReadFrame(f *testing.F) {
	var good bytes.Buffer
	writeFrame(&good, &registerRequest{ClusterID: "c", Info: infoS})
	f.Add(good.Bytes())
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 2, 0x81, 0xa1})
	f.Fuzz(func(t *testing.T, data []byte) {
		var req registerRequest
		readFrame(bytes.NewReader(data), &req)
	})
}

func TestMuxRoutesRegistrationAndIsolates(t *testing.T) {
	addrs := freeAddrs(t, 2)
	members := map[string]string{"s": addrs[0], "p": addrs[1]}
	got := make(chan registerRequest, 1)
	m, err := listenMux(muxConfig{Addr: addrs[0], Members: members, Handle: func(r registerRequest) registerReply {
		got <- r
		return registerReply{Err: "no thanks", LeaderAddr: "x:1"}
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	client, err := listenMux(muxConfig{Addr: addrs[1], Members: members})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	reply, err := client.registerRemote(m.Addr().String(), registerRequest{ClusterID: "c", Info: infoS}, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if reply.Err != "no thanks" || reply.LeaderAddr != "x:1" || (<-got).Info != infoS {
		t.Fatalf("reply %+v", reply)
	}

	// A raft connection (first byte 0..4) is served by the layer: a
	// request naming a sender that is no member is refused with an
	// answer, and the connection closed.
	c, err := net.Dial("tcp", m.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if err := sendRPC(c, rpcTimeoutNow, &raft.TimeoutNowRequest{RPCHeader: raft.RPCHeader{ID: []byte("x"), Addr: []byte("127.0.0.1:1")}}); err != nil {
		t.Fatal(err)
	}
	if msg, err := readRPCReply(c, &raft.TimeoutNowResponse{}); err != nil || !strings.Contains(msg, "not a member") {
		t.Fatalf("reply to a stranger's TimeoutNow: %q, %v", msg, err)
	}
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection open after a refused RPC")
	}
	// No member dialled it: nothing reached raft.
	select {
	case rpc := <-m.rpcs:
		t.Fatalf("a refused RPC reached raft: %T", rpc.Command)
	default:
	}

	// Only members' addresses are dialled.
	if _, err := client.Dial("127.0.0.1:9", time.Second); err == nil || !strings.Contains(err.Error(), "not the raft address of a member") {
		t.Fatalf("dial of a non-member address: %v", err)
	}

	// Isolation breaks live connections and refuses dials.
	live, err := client.Dial(raft.ServerAddress(m.Addr().String()), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	live.Write([]byte{rpcAppendEntries})
	waitFor(t, 2*time.Second, "the connection tracked on m", func() bool {
		m.connsMu.Lock()
		defer m.connsMu.Unlock()
		return len(m.conns) > 0
	})
	m.setIsolated(true)
	live.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := live.Read(make([]byte, 1)); err == nil {
		t.Fatal("read on an isolated node's connection succeeded")
	}
	if _, err := m.Dial(raft.ServerAddress(client.Addr().String()), time.Second); err == nil {
		t.Fatal("isolated node could dial")
	}
	if _, err := client.registerRemote(m.Addr().String(), registerRequest{}, 500*time.Millisecond); err == nil {
		t.Fatal("isolated node answered a registration")
	}
}

// sendRPC writes one raw raft request: the type byte, then msgpack.
func sendRPC(c net.Conn, typ byte, req any) error {
	var buf bytes.Buffer
	buf.WriteByte(typ)
	if err := codec.NewEncoder(&buf, &codec.MsgpackHandle{}).Encode(req); err != nil {
		return err
	}
	_, err := c.Write(buf.Bytes())
	return err
}

// readRPCReply reads raft's answer: an error string, then the response.
func readRPCReply(c net.Conn, resp any) (string, error) {
	dec := codec.NewDecoder(c, &codec.MsgpackHandle{})
	var msg string
	if err := dec.Decode(&msg); err != nil {
		return "", err
	}
	return msg, dec.Decode(resp)
}

// TestRaftRPCReadIsBounded: a peer that starts a raft RPC and trickles it
// is dropped once the RPC has taken rpcReadTimeout; a connection idle
// between RPCs is not, and real RPCs on it go on working.
func TestRaftRPCReadIsBounded(t *testing.T) {
	old := rpcReadTimeout
	rpcReadTimeout = time.Second
	t.Cleanup(func() { rpcReadTimeout = old })

	addrs := freeAddrs(t, 2)
	members := map[string]string{"s": addrs[0], "p": addrs[1]}
	m, err := listenMux(muxConfig{Addr: addrs[0], Members: members})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	go func() {
		for {
			select {
			case rpc := <-m.rpcs:
				rpc.Respond(&raft.AppendEntriesResponse{Term: 1, Success: true}, nil)
			case <-m.closed:
				return
			}
		}
	}()
	header := raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("p"), Addr: []byte(addrs[1])}

	// The attacker: an AppendEntries type byte, then one byte of a valid
	// request every 100 ms.
	var req bytes.Buffer
	codec.NewEncoder(&req, &codec.MsgpackHandle{}).Encode(&raft.AppendEntriesRequest{RPCHeader: header, Term: 1, Leader: []byte(addrs[1])})
	c, err := net.Dial("tcp", m.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t0 := time.Now()
	c.Write([]byte{rpcAppendEntries})
	dropped := make(chan time.Duration, 1)
	go func() {
		var b [1]byte
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		c.Read(b[:]) // returns when the node closes the connection
		dropped <- time.Since(t0)
	}()
	sent := 0
	var took time.Duration
trickle:
	for _, b := range req.Bytes() {
		select {
		case took = <-dropped:
			break trickle
		case <-time.After(100 * time.Millisecond):
		}
		if _, err := c.Write([]byte{b}); err != nil {
			break
		}
		sent++
	}
	if took == 0 {
		select {
		case took = <-dropped:
		case <-time.After(5 * time.Second):
			t.Fatalf("trickling RPC still open after %v (%d of %d bytes sent)", time.Since(t0), sent, req.Len())
		}
	}
	if sent >= req.Len() || took > 3*time.Second {
		t.Fatalf("trickling RPC dropped after %v with %d of %d bytes sent, want about %v and incomplete", took, sent, req.Len(), rpcReadTimeout)
	}
	t.Logf("trickling RPC dropped after %v, %d of %d bytes sent", took, sent, req.Len())

	// A real peer's pooled connection survives idling past the timeout.
	client, err := listenMux(muxConfig{Addr: addrs[1], Members: members})
	if err != nil {
		t.Fatal(err)
	}
	ct := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{Stream: client, MaxPool: 1, Timeout: time.Second})
	defer ct.Close()
	for i := range 2 {
		var resp raft.AppendEntriesResponse
		err := ct.AppendEntries("s", raft.ServerAddress(m.Addr().String()), &raft.AppendEntriesRequest{RPCHeader: header, Term: 1}, &resp)
		if err != nil || !resp.Success {
			t.Fatalf("RPC %d: %v %+v", i, err, resp)
		}
		time.Sleep(rpcReadTimeout * 3 / 2)
	}
}

// TestRaftConnectionsAreCapped: connections that start a raft RPC and
// stall are served at most maxRaftConns at a time; the rest are closed.
func TestRaftConnectionsAreCapped(t *testing.T) {
	addrs := freeAddrs(t, 2)
	m, err := listenMux(muxConfig{Addr: addrs[0], Members: map[string]string{"s": addrs[0], "p": addrs[1]}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range maxRaftConns + 8 {
		c, err := net.Dial("tcp", m.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		c.Write([]byte{rpcAppendEntries, 0x81}) // a request begun (a map of one entry), never finished
	}
	closed := 0
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			closed++
		}
	}
	if closed < 8 {
		t.Fatalf("%d of %d stalled raft connections closed, want at least 8 (cap %d)", closed, len(conns), maxRaftConns)
	}
}
