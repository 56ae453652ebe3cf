package main

import (
	"flag"
	"path/filepath"

	"github.com/tandemvm/tandem/replica"
)

// Paths and bounds of what a node takes from the network (see
// docs/SECURITY.md, "Input bounds and paths"): a node never opens a path
// a peer named. A received guest's disk lives where this node's own flags
// say; a snapshot written for POST /migrate lands in this node's
// --snapshot-dir under a plain name.

// receiveFlags are the flags of a node that receives streams (receive,
// secondary, and a raft member, which turns secondary).
type receiveFlags struct {
	disk         string
	maxEpochDisk uint64
	sync         replica.SyncPolicy
	acceptUnsync bool
}

func addReceiveFlags(fs *flag.FlagSet, rf *receiveFlags, withDisk bool) {
	rf.maxEpochDisk = replica.DefaultMaxEpochDisk
	fs.Var(sizeFlag{&rf.maxEpochDisk}, "max-epoch-disk",
		"most disk writes one received epoch may stage before it commits, e.g. 256MiB; with the guest's memory it bounds what a sender can make this node hold")
	// A raft member of any role may become a secondary: every receiver
	// takes it (a plain receive keeps no store and ignores it).
	fs.Func("sync", "when a secondary's stored image (DATA_DIR/image) is fsynced: memory (default; right after an epoch is acknowledged from memory, the Remus contract) or disk (before it is acknowledged: acknowledged epochs survive a power loss of every node); see docs/DURABILITY.md",
		func(s string) (err error) { rf.sync, err = replica.ParseSyncPolicy(s); return err })
	fs.BoolVar(&rf.acceptUnsync, "accept-unsynced-image", false, "offer the stored image (DATA_DIR/image) even when it may lack acknowledged epochs (written under --sync memory, host restarted since): the operator's override after a double failure, when no node holds a newer image; what may be missing is logged")
	if withDisk {
		fs.StringVar(&rf.disk, "disk", "", "where this node keeps its copy of a received guest's disk (default: DATA_DIR/disk.img with --data-dir; without either, a guest with a disk is refused)")
	}
}

// diskPath is where received disks live: --disk, else DATA_DIR/disk.img,
// else nowhere (a guest with a disk is refused).
func (rf receiveFlags) diskPath(dataDir string) string {
	switch {
	case rf.disk != "":
		return rf.disk
	case dataDir != "":
		return filepath.Join(dataDir, "disk.img")
	}
	return ""
}

// apply gives r this node's paths and bounds.
func (rf receiveFlags) apply(r *replica.Receiver, dataDir string) *replica.Receiver {
	r.DiskPath = rf.diskPath(dataDir)
	r.MaxEpochDisk = rf.maxEpochDisk
	r.Sync = rf.sync
	r.AcceptUnsynced = rf.acceptUnsync
	return r
}

func addSnapshotDirFlag(fs *flag.FlagSet, dir *string) {
	fs.StringVar(dir, "snapshot-dir", "", "directory that POST /migrate {\"to\":\"file:NAME\"} (tandem migrate --to file:NAME) writes snapshots into; without it file migrations are off")
}
