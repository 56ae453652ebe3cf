package failover

import (
	"bytes"
	"net"
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
	got := make(chan registerRequest, 1)
	m, err := listenMux("127.0.0.1:0", func(r registerRequest) registerReply {
		got <- r
		return registerReply{Err: "no thanks", LeaderAddr: "x:1"}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	client, err := listenMux("127.0.0.1:0", nil)
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

	// A raft connection (first byte 0..4) comes out of Accept with its
	// first byte intact.
	c, err := net.Dial("tcp", m.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte{1, 2, 3})
	rc, err := m.Accept()
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 3)
	rc.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := rc.Read(buf[:1]); err != nil || buf[0] != 1 {
		t.Fatalf("first byte %v %v", buf[0], err)
	}

	// Isolation breaks the live connection and refuses dials.
	m.setIsolated(true)
	if _, err := rc.Read(buf); err == nil {
		t.Fatal("read on an isolated node's connection succeeded")
	}
	if _, err := m.Dial(raft.ServerAddress(client.Addr().String()), time.Second); err == nil {
		t.Fatal("isolated node could dial")
	}
	if _, err := client.registerRemote(m.Addr().String(), registerRequest{}, 500*time.Millisecond); err == nil {
		t.Fatal("isolated node answered a registration")
	}
}

// A peer that starts a raft RPC and trickles it is dropped once the RPC
// has taken rpcReadTimeout; a connection idle between RPCs is not, and
// real RPCs on it go on working.
func TestRaftRPCReadIsBounded(t *testing.T) {
	old := rpcReadTimeout
	rpcReadTimeout = time.Second
	t.Cleanup(func() { rpcReadTimeout = old })

	m, err := listenMux("127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	trans := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{Stream: m, MaxPool: 2, Timeout: time.Second})
	defer trans.Close()
	go func() {
		for rpc := range trans.Consumer() {
			rpc.Respond(&raft.AppendEntriesResponse{Term: 1, Success: true}, nil)
		}
	}()

	// The attacker: an AppendEntries type byte, then one byte of a valid
	// request every 100 ms.
	var req bytes.Buffer
	codec.NewEncoder(&req, &codec.MsgpackHandle{}).Encode(&raft.AppendEntriesRequest{
		RPCHeader: raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, Addr: []byte("x:1")}, Term: 1, Leader: []byte("x:1")})
	c, err := net.Dial("tcp", m.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t0 := time.Now()
	c.Write([]byte{0}) // rpcAppendEntries
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
	if took > 3*time.Second {
		t.Fatalf("trickling RPC dropped after %v, want about %v", took, rpcReadTimeout)
	}
	t.Logf("trickling RPC dropped after %v, %d of %d bytes sent", took, sent, req.Len())

	// A real peer's pooled connection survives idling past the timeout.
	client, err := listenMux("127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	ct := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{Stream: client, MaxPool: 1, Timeout: time.Second})
	defer ct.Close()
	for i := range 2 {
		var resp raft.AppendEntriesResponse
		err := ct.AppendEntries("m", raft.ServerAddress(m.Addr().String()), &raft.AppendEntriesRequest{
			RPCHeader: raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax}, Term: 1}, &resp)
		if err != nil || !resp.Success {
			t.Fatalf("RPC %d: %v %+v", i, err, resp)
		}
		time.Sleep(rpcReadTimeout * 3 / 2)
	}
}
