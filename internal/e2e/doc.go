// Package e2e is Tandem's end-to-end harness: it runs the tandem binary as
// real processes on loopback and talks to them the way an operator and a
// kv client would. `tandem drill`, `tandem demo` and the process tests in
// test/ all use it, so a fix here (a port race, a missing deadline) is
// made once.
//
// What it owns:
//
//   - Ports: FreeAddr hands out loopback addresses no earlier call of this
//     process returned (the kernel may give a just-closed port out again),
//     and PortClash recognises the race a caller retries on.
//   - Processes: Proc is one tandem process in its own process group with
//     its output in a log file: kill -9, a signal, a bounded stop, the
//     log's tail. StartFresh starts a single node (a run source, a
//     receiver, a pair's primary) on fresh ports, again when it lost a port
//     race, and waits until it answers.
//   - Certificates: MakeCerts and LoadCert make and load a CA and a
//     certificate per node and for the operator (the secure default).
//   - Trios: Trio is a primary, a secondary and a witness on fixed
//     addresses (a restart is the same command), with status through the
//     typed api.Client and the waits a drill or a test needs (protected,
//     serving, the current primary).
//   - kv clients: KVClient speaks the console's line protocol, resends a
//     request under the same id until it is answered (the guest applies a
//     seq once), follows the primary, and records every operation in a
//     History.
//   - Linearizability: History is every kv operation's invocation and
//     response; Check runs it through porcupine against a model of the kv
//     store. A retried request is one operation whose response is the
//     last; one never answered stays pending (porcupine may place it
//     anywhere after its call, or never).
//   - Load and checks: Load drives a client of one run, CheckState compares
//     what clients were told with the state read back afterwards.
//
// What it must never do: wait without a deadline (every wait here takes a
// context or a timeout and says which bound ran out); leave a process
// behind (every Proc is killed by its owner's cleanup: Trio.KillAll, a
// test's Cleanup); or know the node's internals: it sees only the
// command line, the API and the console, like an operator.
package e2e
