package failover

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/internal/vfs"
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
// started twice) is refused instead of corrupting the log. The identity
// files are read and published through fs (internal/vfs); raft.db is
// raft-boltdb's, which fsyncs its own commits.
type dataDir struct {
	fs   vfs.FS
	path string
	lock *os.File
}

// writeProbe is the file openDataDir writes and removes to refuse a data
// directory it cannot write to at start, not at the first raft commit.
const writeProbe = ".write-probe"

// openDataDir creates dir if needed, locks it, and checks (or, for an empty
// directory, writes) the cluster and node identity files. It never overwrites
// an identity file that disagrees.
func openDataDir(dir, clusterID, nodeID string) (*dataDir, error) {
	return openDataDirFS(vfs.Default, dir, clusterID, nodeID)
}

func openDataDirFS(fsys vfs.FS, dir, clusterID, nodeID string) (*dataDir, error) {
	if err := vfs.MkdirAllSync(fsys, dir, 0o750); err != nil {
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
	d := &dataDir{fs: fsys, path: dir, lock: lf}
	if err := d.probe(); err != nil {
		d.close()
		return nil, err
	}
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

// probe writes, fsyncs and removes a small file: a data directory that
// cannot take it is refused now.
func (d *dataDir) probe() error {
	p := filepath.Join(d.path, writeProbe)
	f, err := d.fs.Create(p, 0o640)
	if err == nil {
		_, err = f.Write([]byte("probe\n"))
		if err == nil {
			err = f.Sync()
		}
		err = errors.Join(err, f.Close(), d.fs.Remove(p))
	}
	if err != nil {
		return fmt.Errorf("failover: data dir %s is not writable: %w", d.path, err)
	}
	return nil
}

// validID is what an identity file may hold: non-empty UTF-8 text without
// control characters (a torn file reads empty or as zeros).
func validID(s string) bool {
	if s == "" || !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

func (d *dataDir) checkIdentity(name, want string, mismatch error, what string) error {
	p := filepath.Join(d.path, name)
	b, err := vfs.ReadFile(d.fs, p)
	switch {
	case err == nil:
		got := strings.TrimSpace(string(b))
		if !validID(got) {
			return fmt.Errorf("%w: %s is torn or corrupt (%d bytes, not a %s ID); refusing to touch the data dir (remove the file only if this dir is %s %q's)",
				ErrCorruptDataDir, p, len(b), what, what, want)
		}
		if got != want {
			return fmt.Errorf("%w: %s belongs to %s %q, configured %q; refusing to touch it", mismatch, d.path, what, got, want)
		}
		return nil
	case errors.Is(err, fs.ErrNotExist):
		if d.hasRaftState() {
			return fmt.Errorf("%w: %s holds raft state but no %s file; refusing to adopt it", mismatch, d.path, name)
		}
		if err := vfs.WriteFile(d.fs, p, []byte(want+"\n"), 0o640); err != nil {
			return fmt.Errorf("failover: %w", err)
		}
		return nil
	default:
		return fmt.Errorf("failover: read %s: %w", p, err)
	}
}

// hasRaftState says whether raft.db exists. It is raft-boltdb's, always
// on the real file system (whatever fs holds the identity files).
func (d *dataDir) hasRaftState() bool {
	_, err := os.Stat(filepath.Join(d.path, raftDBFile))
	return err == nil
}

func (d *dataDir) close() {
	// Closing the descriptor drops the flock.
	d.lock.Close()
}
