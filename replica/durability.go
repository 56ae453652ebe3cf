package replica

import (
	"fmt"

	"github.com/tandemvm/tandem/internal/failpoint"
)

// SyncPolicy says what a secondary's acknowledgement of an epoch promises
// about its stored image (docs/DURABILITY.md).
type SyncPolicy int

const (
	// SyncMemory acknowledges an epoch once it is committed in the
	// secondary's memory and written to its store (the OS has it); the
	// store is fsynced right after the acknowledgement is sent. This is
	// Remus's contract: an acknowledged epoch survives the loss of either
	// host, not of both at once.
	SyncMemory SyncPolicy = iota
	// SyncDisk fsyncs the stored epoch before acknowledging it: an
	// acknowledged epoch survives the loss of power of every host.
	SyncDisk
)

// String is the policy's flag spelling.
func (p SyncPolicy) String() string {
	switch p {
	case SyncMemory:
		return "memory"
	case SyncDisk:
		return "disk"
	}
	return fmt.Sprintf("SyncPolicy(%d)", int(p))
}

// ParseSyncPolicy reads a --sync value: "memory" or "disk".
func ParseSyncPolicy(s string) (SyncPolicy, error) {
	switch s {
	case "memory", "":
		return SyncMemory, nil
	case "disk":
		return SyncDisk, nil
	}
	return 0, fmt.Errorf("replica: --sync %q: want memory or disk", s)
}

// The failpoints on a secondary's path from an epoch's arrival to its
// acknowledgement and the store's durability (tests arm them; see
// internal/failpoint). Their names are what the crash sweep reports.
var (
	// Image.EndEpoch: the epoch's disk writes are applied, its memory
	// not yet committed.
	FPBetweenDiskAndMemory = failpoint.New("replica.image.between-disk-and-memory")
	// Store.Append: the epoch is written to the OS, not yet fsynced.
	FPAppendBeforeSync = failpoint.New("replica.store.append.before-sync")
	FPAppendAfterSync  = failpoint.New("replica.store.append.after-sync")
	// Store.rewrite (Begin, compaction): the new image file is written.
	FPRewriteBeforeSync    = failpoint.New("replica.store.rewrite.before-sync")
	FPRewriteBeforeRename  = failpoint.New("replica.store.rewrite.before-rename")
	FPRewriteBeforeSyncDir = failpoint.New("replica.store.rewrite.before-syncdir")
	FPRewriteAfterSyncDir  = failpoint.New("replica.store.rewrite.after-syncdir")
	// Secondary.Serve: the epoch is committed (and stored per the
	// policy), the acknowledgement not yet written.
	FPBeforeAck = failpoint.New("replica.secondary.before-ack")
	// Secondary.Serve with SyncMemory: acknowledged, not yet fsynced.
	FPAfterAckBeforeSync = failpoint.New("replica.secondary.after-ack-before-sync")
)
