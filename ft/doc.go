// Package ft is Tandem's fault-tolerance driver and guest node: the
// process-level part of a node that runs or receives a guest, below the
// command line.
//
// It owns:
//   - Node: one guest's lifecycle on this process (attach, detach,
//     close), GET /status, the migration handlers (POST /migrate, its
//     cancel, commit and abort), the metrics, the console bridge (the
//     output-commit sink every released byte goes through) and the API
//     server they are served on;
//   - the receiving side of a migration (ReceiveMigrations, RestoreFile);
//   - the members of a raft trio (RunRaftMember) and of a pair without
//     raft (RunPairPrimary, RunPairSecondary);
//   - the guest backend registry (BootGuest, EmptyGuest).
//
// It must never parse flags, print to stdout, read environment variables
// or install signal handlers: cmd/tandem does that and hands it
// configurations and a context. Nothing below it (failover, replica,
// precopy, guest, api, internal) may import it.
package ft
