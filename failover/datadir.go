package failover

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Files in a node's data directory.
const (
	lockFile      = "LOCK"
	clusterIDFile = "cluster-id"
	nodeIDFile    = "node-id"
	raftDBFile    = "raft.db"
	snapshotDir   = "snapshots"
)

// dataDir is an opened, locked data directory. The lock is an flock held for
// the Node's life so a second process with the same directory (the same node
// started twice) is refused instead of corrupting the log.
type dataDir struct {
	path string
	lock *os.File
}

// openDataDir creates dir if needed, locks it, and checks (or, for an empty
// directory, writes) the cluster and node identity files. It never overwrites
// an identity file that disagrees.
func openDataDir(dir, clusterID, nodeID string) (*dataDir, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("failover: data dir: %w", err)
	}
	lf, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_CREATE|os.O_RDWR, 0o640)
	if err != nil {
		return nil, fmt.Errorf("failover: data dir lock: %w", err)
	}
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lf.Close()
		return nil, fmt.Errorf("%w: data dir %s is locked by another process (node %s already running?)", ErrInUse, dir, nodeID)
	}
	d := &dataDir{path: dir, lock: lf}
	if err := d.checkIdentity(clusterIDFile, clusterID, ErrWrongCluster, "cluster"); err != nil {
		d.close()
		return nil, err
	}
	if err := d.checkIdentity(nodeIDFile, nodeID, ErrWrongNode, "node"); err != nil {
		d.close()
		return nil, err
	}
	return d, nil
}

func (d *dataDir) checkIdentity(name, want string, mismatch error, what string) error {
	p := filepath.Join(d.path, name)
	b, err := os.ReadFile(p)
	switch {
	case err == nil:
		got := strings.TrimSpace(string(b))
		if got != want {
			return fmt.Errorf("%w: %s belongs to %s %q, configured %q; refusing to touch it", mismatch, d.path, what, got, want)
		}
		return nil
	case errors.Is(err, fs.ErrNotExist):
		if d.hasRaftState() {
			return fmt.Errorf("%w: %s holds raft state but no %s file; refusing to adopt it", mismatch, d.path, name)
		}
		return writeFileAtomic(p, []byte(want+"\n"))
	default:
		return fmt.Errorf("failover: read %s: %w", p, err)
	}
}

func (d *dataDir) hasRaftState() bool {
	_, err := os.Stat(filepath.Join(d.path, raftDBFile))
	return err == nil
}

func (d *dataDir) close() {
	// Closing the descriptor drops the flock.
	d.lock.Close()
}

// writeFileAtomic publishes data at path: temp file, fsync, rename, fsync
// the directory, so a crash leaves either the old file or the whole new one.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("failover: write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("failover: write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("failover: fsync %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("failover: write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("failover: publish %s: %w", path, err)
	}
	df, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("failover: fsync dir %s: %w", dir, err)
	}
	defer df.Close()
	if err := df.Sync(); err != nil {
		return fmt.Errorf("failover: fsync dir %s: %w", dir, err)
	}
	return nil
}
