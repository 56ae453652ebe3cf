package failover

import (
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"

	"github.com/tandemvm/tandem/internal/vfs"
)

func (n *Node) open() error {
	cfg := n.cfg
	var err error
	if n.dir, err = openDataDirFS(vfs.OrDefault(cfg.FS), cfg.DataDir, cfg.ClusterID, cfg.ID); err != nil {
		return err
	}
	n.store, err = raftboltdb.New(raftboltdb.Options{
		Path:        filepath.Join(cfg.DataDir, raftDBFile),
		BoltOptions: &bbolt.Options{Timeout: time.Second},
	})
	if err != nil {
		return fmt.Errorf("failover: open raft log %s: %w", filepath.Join(cfg.DataDir, raftDBFile), err)
	}
	hl := newRaftLog(n.log, n.clock).hclog()
	snaps, err := raft.NewFileSnapshotStoreWithLogger(filepath.Join(cfg.DataDir, snapshotDir), 2, hl)
	if err != nil {
		return fmt.Errorf("failover: open snapshots: %w", err)
	}
	existing, err := raft.HasExistingState(n.store, n.store, snaps)
	if err != nil {
		return fmt.Errorf("failover: read raft state: %w", err)
	}
	want := n.membership()
	if existing {
		stored, ok, err := storedConfiguration(n.store, snaps)
		if err != nil {
			return err
		}
		if ok {
			if err := sameMembership(stored, want); err != nil {
				return err
			}
		}
	}

	n.stream, err = listenMux(muxConfig{
		Addr: cfg.RaftAddr, TLS: cfg.TLS, Insecure: cfg.Insecure, Members: cfg.Peers,
		Handle: n.handleRegister, Policy: n, Log: n.log,
	})
	if err != nil {
		return err
	}
	n.trans = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  n.stream,
		MaxPool: 3,
		Timeout: 500 * time.Millisecond,
		Logger:  hl,
	})
	n.fsm = newFSM(n.poke)

	rc, err := raftConfig(cfg, hl)
	if err != nil {
		return err
	}
	n.raft, err = raft.NewRaft(rc, n.fsm, n.store, n.store, snaps, transport{n.trans, n.stream})
	if err != nil {
		return fmt.Errorf("failover: start raft: %w", err)
	}
	if !existing {
		if err := n.raft.BootstrapCluster(want).Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			return fmt.Errorf("failover: bootstrap: %w", err)
		}
	}
	return nil
}

// storedConfiguration finds the newest membership in the log, else in the
// newest snapshot.
func storedConfiguration(logs raft.LogStore, snaps raft.SnapshotStore) (c raft.Configuration, ok bool, err error) {
	first, err := logs.FirstIndex()
	if err != nil {
		return c, false, fmt.Errorf("failover: read raft log: %w", err)
	}
	last, err := logs.LastIndex()
	if err != nil {
		return c, false, fmt.Errorf("failover: read raft log: %w", err)
	}
	for i := last; i >= first && i > 0; i-- {
		var l raft.Log
		if err := logs.GetLog(i, &l); err != nil {
			if errors.Is(err, raft.ErrLogNotFound) {
				continue
			}
			return c, false, fmt.Errorf("failover: read raft log entry %d: %w", i, err)
		}
		if l.Type == raft.LogConfiguration {
			return decodeConfiguration(l.Data)
		}
	}
	metas, err := snaps.List()
	if err != nil {
		return c, false, fmt.Errorf("failover: list snapshots: %w", err)
	}
	if len(metas) > 0 {
		return metas[0].Configuration, true, nil
	}
	return c, false, nil
}

// decodeConfiguration wraps raft.DecodeConfiguration, which panics on bad
// input, so a damaged log is an error, not a crash.
func decodeConfiguration(b []byte) (c raft.Configuration, ok bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: stored raft configuration: %v", ErrCorrupt, r)
		}
	}()
	return raft.DecodeConfiguration(b), true, nil
}

// sameMembership refuses a start whose peers differ from the stored voters.
func sameMembership(stored, want raft.Configuration) error {
	str := func(c raft.Configuration) string {
		var parts []string
		for _, s := range c.Servers {
			p := fmt.Sprintf("%s=%s", s.ID, s.Address)
			if s.Suffrage != raft.Voter {
				p += "(" + s.Suffrage.String() + ")"
			}
			parts = append(parts, p)
		}
		sort.Strings(parts)
		return strings.Join(parts, ",")
	}
	if a, b := str(stored), str(want); a != b {
		return fmt.Errorf("%w: data dir holds voters %s, configured peers are %s", ErrMembership, a, b)
	}
	return nil
}

// release closes whatever open() managed to open, in reverse order.
func (n *Node) release() {
	if n.raft != nil {
		n.raft.Shutdown().Error()
	}
	if n.trans != nil {
		n.trans.Close() // closes the stream too
	} else if n.stream != nil {
		n.stream.Close()
	}
	if n.store != nil {
		n.store.Close()
	}
	if n.dir != nil {
		n.dir.close()
	}
}

// membership is the configured trio as a raft configuration, in ID order;
// it also fills n.voters.
func (n *Node) membership() raft.Configuration {
	want := raft.Configuration{}
	ids := make([]string, 0, len(n.cfg.Peers))
	for id := range n.cfg.Peers {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		addr := n.cfg.Peers[id]
		n.voters = append(n.voters, NodeInfo{ID: id, RaftAddr: addr})
		want.Servers = append(want.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(id), Address: raft.ServerAddress(addr)})
	}
	return want
}

// raftConfig is raft's configuration for this member. The witness gets
// half the heartbeat timeout and twice the election timeout: it drops a
// dead leader first and retries late, so the secondary normally wins (the
// package doc explains why).
func raftConfig(cfg Config, hl hclog.Logger) (*raft.Config, error) {
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	if cfg.Role == RoleWitness {
		rc.HeartbeatTimeout /= 2
		rc.ElectionTimeout *= 2
	}
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.CommitTimeout = 5 * time.Millisecond
	rc.SnapshotThreshold = 1024
	rc.TrailingLogs = 1024
	rc.Logger = hl
	if err := raft.ValidateConfig(rc); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	return rc, nil
}
