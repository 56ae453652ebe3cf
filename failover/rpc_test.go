package failover

import (
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/hashicorp/raft"
)

// TestInstallSnapshotSizeBounded: an InstallSnapshot whose declared body
// is larger than any snapshot of this cluster's record (or negative) is
// refused before raft reads or stores it; one within the bound passes.
func TestInstallSnapshotSizeBounded(t *testing.T) {
	m := &muxStream{members: map[string]string{"p": "10.0.0.1:7000"}, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	h := raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("p"), Addr: []byte("10.0.0.1:7000")}
	for _, size := range []int64{-1, maxSnapshotBytes + 1, 1 << 40} {
		err := m.admit(rpcInstallSnapshot, &raft.InstallSnapshotRequest{RPCHeader: h, Size: size}, "")
		if err == nil || !strings.Contains(err.Error(), "InstallSnapshot of") {
			t.Errorf("size %d: %v, want a refusal", size, err)
		}
	}
	if err := m.admit(rpcInstallSnapshot, &raft.InstallSnapshotRequest{RPCHeader: h, Size: 4096}, ""); err != nil {
		t.Errorf("a 4 KiB snapshot refused: %v", err)
	}
}
