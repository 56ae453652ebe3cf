package failover

import "errors"

// Errors returned by this package. Callers check them with errors.Is; the
// returned errors wrap them with the detail (paths, IDs, addresses).
var (
	// ErrConfig: the Config is invalid.
	ErrConfig = errors.New("failover: bad config")
	// ErrWrongCluster: the data directory belongs to another cluster.
	ErrWrongCluster = errors.New("failover: data dir belongs to another cluster")
	// ErrCorruptDataDir: a file of the data directory is torn or corrupt.
	ErrCorruptDataDir = errors.New("failover: data dir file corrupt")
	// ErrWrongNode: the data directory belongs to another node ID.
	ErrWrongNode = errors.New("failover: data dir belongs to another node")
	// ErrInUse: the data directory or the node ID is already in use.
	ErrInUse = errors.New("failover: already in use")
	// ErrMembership: the configured peers differ from the membership stored
	// in the data directory.
	ErrMembership = errors.New("failover: membership mismatch")
	// ErrNotLeader: the call needs raft leadership and this node lacks it.
	ErrNotLeader = errors.New("failover: not the leader")
	// ErrStaleGeneration: a command carried a generation that is no longer
	// current; it was not applied.
	ErrStaleGeneration = errors.New("failover: stale generation")
	// ErrClosed: the Node is closed.
	ErrClosed = errors.New("failover: closed")
	// ErrCorrupt: a replicated command or snapshot could not be decoded.
	// Corruption is its own class: it is never retried.
	ErrCorrupt = errors.New("failover: corrupt command or snapshot")
)
