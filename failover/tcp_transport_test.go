package failover

import (
	"bytes"
	"net"
	"testing"
	"time"

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
