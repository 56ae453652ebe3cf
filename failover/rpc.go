package failover

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"
)

// raft's RPC type bytes (hashicorp/raft v1.7.3, net_transport.go): the
// first byte of every request on a raft connection, followed by the
// msgpack request; the reply is msgpack(error string), msgpack(response).
const (
	rpcAppendEntries   byte = 0
	rpcRequestVote     byte = 1
	rpcInstallSnapshot byte = 2
	rpcTimeoutNow      byte = 3
	rpcRequestPreVote  byte = 4
	rpcTypeMax              = rpcRequestPreVote
)

// rpcReceiveBuffer is the read buffer of a served raft connection (as in
// raft's NetworkTransport).
const rpcReceiveBuffer = 256 << 10

// raftPolicy is what the RPC checks need to know of the node's raft.
type raftPolicy interface {
	// leaderID is the raft leader this node recognises ("" for none).
	leaderID() string
	// transferVote reports whether this node itself started a leadership
	// transfer to candidate recently: only then may candidate's vote
	// request bypass the vote check (raft's LeadershipTransfer flag).
	transferVote(candidate string) bool
	// leading says whether this node is raft's leader now.
	leading() bool
}

// transport is raft's NetworkTransport for outgoing RPCs, with the server
// side replaced by muxStream's checked one (Consumer, heartbeats) and
// pipelining off: with three nodes it buys nothing, and raft v1.7.3's
// pipeline can deadlock Shutdown (the replication goroutine blocks handing
// a future to a decoder that stopped).
type transport struct {
	*raft.NetworkTransport
	m *muxStream
}

func (t transport) Consumer() <-chan raft.RPC { return t.m.rpcs }

func (t transport) SetHeartbeatHandler(fn func(raft.RPC)) {
	t.m.heartbeatMu.Lock()
	t.m.heartbeatFn = fn
	t.m.heartbeatMu.Unlock()
}

func (transport) AppendEntriesPipeline(raft.ServerID, raft.ServerAddress) (raft.AppendPipeline, error) {
	return nil, raft.ErrPipelineReplicationNotSupported
}

// AppendEntries sends an AppendEntries RPC. One that carries the log (not
// a heartbeat) to a follower whose last RPC failed first waits until the
// follower is heard again (see waitReachable), instead of failing at
// once: raft counts each failure and sleeps before the next attempt, up
// to 10 s after a few seconds of failures (failureWait doubling to
// maxFailureScale, uncapped unlike heartbeats), so a node restarted after
// that waited up to 10 s for the log, its commit index and thus its part
// (issue 20: "waiting for the cluster ... context deadline exceeded" with
// a majority up). Heartbeats still fail fast: raft reports those failures
// (FailedHeartbeatObservation), which Reachability is built from.
func (t transport) AppendEntries(id raft.ServerID, target raft.ServerAddress, args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) error {
	if !isHeartbeat(args) {
		t.m.waitReachable(string(id))
	}
	return t.m.noteResult(string(id), t.NetworkTransport.AppendEntries(id, target, args, resp))
}

// InstallSnapshot waits as AppendEntries does.
func (t transport) InstallSnapshot(id raft.ServerID, target raft.ServerAddress, args *raft.InstallSnapshotRequest, resp *raft.InstallSnapshotResponse, data io.Reader) error {
	t.m.waitReachable(string(id))
	return t.m.noteResult(string(id), t.NetworkTransport.InstallSnapshot(id, target, args, resp, data))
}

// isHeartbeat says whether an AppendEntries request is raft's heartbeat
// (as decodeRPC tells one on the receiving side).
func isHeartbeat(req *raft.AppendEntriesRequest) bool {
	return req.PrevLogEntry == 0 && req.PrevLogTerm == 0 && len(req.Entries) == 0 && req.LeaderCommitIndex == 0
}

// errRefused ends a connection whose RPC was refused.
var errRefused = errors.New("failover: raft RPC refused")

// serveRaft serves raft RPCs on an accepted connection whose first byte
// (first) was already read, until it breaks or an RPC is refused. peer is
// the member its certificate names ("" without TLS).
func (m *muxStream) serveRaft(c net.Conn, first byte, peer string) {
	defer c.Close()
	r := bufio.NewReaderSize(c, rpcReceiveBuffer)
	w := bufio.NewWriter(c)
	dec := codec.NewDecoder(r, &codec.MsgpackHandle{})
	// As raft's NetworkTransport with MsgpackUseNewTimeFormat false.
	enc := codec.NewEncoder(w, &codec.MsgpackHandle{BasicHandle: codec.BasicHandle{TimeNotBuiltin: true}})
	typ := first
	for {
		if err := m.serveRPC(c, typ, r, dec, enc, peer); err != nil {
			w.Flush()
			return
		}
		if err := w.Flush(); err != nil {
			return
		}
		var err error
		if typ, err = r.ReadByte(); err != nil {
			return
		}
	}
}

// serveRPC decodes one request, checks it (admit), hands it to raft and
// writes raft's answer, as NetworkTransport.handleCommand does.
func (m *muxStream) serveRPC(c net.Conn, typ byte, r *bufio.Reader, dec *codec.Decoder, enc *codec.Encoder, peer string) error {
	respCh := make(chan raft.RPCResponse, 1)
	rpc := raft.RPC{RespChan: respCh}
	cmd, empty, heartbeat, err := decodeRPC(typ, r, dec, &rpc)
	if err != nil {
		if errors.Is(err, errRefused) {
			m.log.Warn("raft port: RPC refused", "remote", c.RemoteAddr().String(), "peer", peer, "why", fmt.Sprintf("unknown RPC type %d", typ))
		}
		return err
	}
	rpc.Command = cmd

	if err := m.admit(typ, rpc.Command, peer); err != nil {
		m.log.Warn("raft port: RPC refused", "rpc", rpcName(typ), "remote", c.RemoteAddr().String(), "peer", peer, "why", err.Error())
		// Answer, so an honest sender fails at once instead of timing out;
		// then close the connection.
		if enc.Encode(err.Error()) == nil {
			enc.Encode(empty)
		}
		return errRefused
	}
	m.noteHeard(string(rpc.Command.(raft.WithRPCHeader).GetRPCHeader().ID))
	if ae, ok := rpc.Command.(*raft.AppendEntriesRequest); ok && !heartbeat {
		for {
			cur := m.leaderCommit.Load()
			if ae.LeaderCommitIndex <= cur || m.leaderCommit.CompareAndSwap(cur, ae.LeaderCommitIndex) {
				break
			}
		}
	}

	if heartbeat {
		m.heartbeatMu.Lock()
		fn := m.heartbeatFn
		m.heartbeatMu.Unlock()
		if fn != nil {
			fn(rpc)
			goto respond
		}
	}
	select {
	case m.rpcs <- rpc:
	case <-m.closed:
		return net.ErrClosed
	}
respond:
	select {
	case resp := <-respCh:
		respErr := ""
		if resp.Error != nil {
			respErr = resp.Error.Error()
		}
		if err := enc.Encode(respErr); err != nil {
			return err
		}
		return enc.Encode(resp.Response)
	case <-m.closed:
		return net.ErrClosed
	}
}

// admit checks one raft request before raft sees it:
//   - the sender it names (RPC header ID) is a member, at the raft address
//     the members list gives it (raft learns the leader's address from
//     this header);
//   - with TLS, the connection's certificate names that sender;
//   - TimeoutNow (which makes raft start an election at once) only from
//     the leader this node recognises: Tandem transfers leadership only
//     from the leader (Switchover, the witness's hand-over);
//   - a vote request's LeadershipTransfer flag (which bypasses the vote
//     check "I still follow a live leader") counts only on the node that
//     started a transfer to that candidate; elsewhere it is cleared, so
//     the vote follows raft's normal rules.
func (m *muxStream) admit(typ byte, cmd any, peer string) error {
	wh, ok := cmd.(raft.WithRPCHeader)
	if !ok {
		return fmt.Errorf("%s without an RPC header", rpcName(typ))
	}
	h := wh.GetRPCHeader()
	id, addr := string(h.ID), string(h.Addr)
	want, member := m.members[id]
	switch {
	case !member:
		return fmt.Errorf("sender %q is not a member (%s)", id, m.memberList())
	case addr != want:
		return fmt.Errorf("sender %s claims raft address %q, the members list has %s", id, addr, want)
	case m.id != nil && id != peer:
		return fmt.Errorf("sender claims to be %s, the connection's certificate names %s", id, peer)
	}
	switch typ {
	case rpcInstallSnapshot:
		// The FSM's snapshot is the cluster's small record; Restore reads
		// at most maxSnapshotBytes, so a larger body is refused before
		// raft stores it.
		if size := cmd.(*raft.InstallSnapshotRequest).Size; size < 0 || size > maxSnapshotBytes {
			return fmt.Errorf("InstallSnapshot of %d bytes (this cluster's snapshots are at most %d)", size, maxSnapshotBytes)
		}
	case rpcTimeoutNow:
		leader := ""
		if m.policy != nil {
			leader = m.policy.leaderID()
		}
		if leader == "" || leader != id {
			if leader == "" {
				leader = "none"
			}
			return fmt.Errorf("TimeoutNow from %s, but the raft leader this node follows is %s: only the leader's own transfer may start an election", id, leader)
		}
	case rpcRequestVote:
		req := cmd.(*raft.RequestVoteRequest)
		if req.LeadershipTransfer && (m.policy == nil || !m.policy.transferVote(id)) {
			req.LeadershipTransfer = false
			m.log.Info("raft port: leadership-transfer flag of a vote request ignored", "candidate", id, "term", req.Term,
				"why", "this node did not hand leadership to it; the vote follows the normal rules")
		}
	}
	return nil
}

func rpcName(typ byte) string {
	switch typ {
	case rpcAppendEntries:
		return "AppendEntries"
	case rpcRequestVote:
		return "RequestVote"
	case rpcInstallSnapshot:
		return "InstallSnapshot"
	case rpcTimeoutNow:
		return "TimeoutNow"
	case rpcRequestPreVote:
		return "RequestPreVote"
	}
	return fmt.Sprintf("rpc(%d)", typ)
}

// decodeRPC reads the request of an RPC of type typ. It returns the
// request, the empty response a refusal carries, and whether the request
// is a heartbeat; an InstallSnapshot's data reader is set on rpc. An
// unknown type is errRefused.
func decodeRPC(typ byte, r *bufio.Reader, dec *codec.Decoder, rpc *raft.RPC) (cmd, empty any, heartbeat bool, err error) {
	switch typ {
	case rpcAppendEntries:
		var req raft.AppendEntriesRequest
		err = dec.Decode(&req)
		cmd, empty = &req, &raft.AppendEntriesResponse{}
		heartbeat = req.Term != 0 && len(req.RPCHeader.Addr) > 0 &&
			req.PrevLogEntry == 0 && req.PrevLogTerm == 0 &&
			len(req.Entries) == 0 && req.LeaderCommitIndex == 0
	case rpcRequestVote:
		var req raft.RequestVoteRequest
		err = dec.Decode(&req)
		cmd, empty = &req, &raft.RequestVoteResponse{}
	case rpcRequestPreVote:
		var req raft.RequestPreVoteRequest
		err = dec.Decode(&req)
		cmd, empty = &req, &raft.RequestPreVoteResponse{}
	case rpcInstallSnapshot:
		var req raft.InstallSnapshotRequest
		err = dec.Decode(&req)
		cmd, empty = &req, &raft.InstallSnapshotResponse{}
		rpc.Reader = io.LimitReader(r, req.Size)
	case rpcTimeoutNow:
		var req raft.TimeoutNowRequest
		err = dec.Decode(&req)
		cmd, empty = &req, &raft.TimeoutNowResponse{}
	default:
		return nil, nil, false, errRefused
	}
	if err != nil {
		return nil, nil, false, err
	}
	return cmd, empty, heartbeat, nil
}
