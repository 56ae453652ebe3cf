// Package ft is Tandem's fault-tolerance driver and guest node: the part
// of a node process that decides what happens to its guest, below the
// command line.
//
// It owns:
//   - Member, the driver: boot, secondary, primary, fenced, switchover,
//     against a Coordinator. RaftCoordinator (a failover.Node) and
//     PairCoordinator (a pair without raft) are its two coordinators;
//     RunRaftMember, RunPairPrimary and RunPairSecondary set each up, and
//     RunWitness runs the third raft voter;
//   - Node: one guest's lifecycle on this process (attach, detach,
//     close), GET /status, the migration handlers (POST /migrate, its
//     cancel, commit and abort), the metrics, the console bridge (the
//     output-commit sink every released byte goes through) and the API
//     server they are served on;
//   - the receiving side of a migration (ReceiveMigrations, RestoreFile),
//     and the nodes without protection (RunGuest, RunReceive);
//   - the guest backend registry (BootGuest, EmptyGuest).
//
// It must never parse flags, print to stdout, read the environment,
// install signal handlers or exit: cmd/tandem does that and hands it
// configurations and a context. Nothing below it (failover, replica,
// precopy, guest, api, internal) may import it.
//
// Every goroutine has an owner that stops and joins it, each join
// bounded (past its bound it logs and goes on): the Member its data
// port's server, event loop, start, watchBoot and claimProtection
// goroutines (spawn, joined by Stop) and its epoch loop (loopCancel,
// waitLoop); serveSecondary a goroutine per data connection; the Node its
// migration (users, joined by Close); the console bridge its accept loop
// and each client's handshake, reader and writer; the API server its
// Serve goroutine; ReceiveMigrations its accept loop and a goroutine per
// connection.
//
// Locks: Member.mu and Node.mu are never held together (each is released
// before the other is taken); Member.protSem is taken before either and
// held across the coordinator's record of protection, on purpose (see
// claimProtection). No mutex is held across a guest pause, a memory scan,
// an activation or network I/O.
package ft
