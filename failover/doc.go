// Package failover is Tandem's coordination core: the raft group of the
// primary, the secondary and the witness, the fencing state machine that
// decides which node may run the guest and release its output, and the
// replicated membership through which a primary finds its secondary.
//
// It owns: raft (hashicorp/raft, log and stable store in bbolt, file
// snapshots, one TCP port per node), the replicated FSM, the generation
// (fencing token), the leader lease behind CanRelease, leadership transfer,
// and the events that tell a driver (cmd/tandem) to run or pause its guest.
//
// The coordination core (Node, Decide, the FSM) must never: ship epochs,
// touch a guest, release output itself, parse flags, print, or block a
// caller without a deadline. Shipping epochs and output commit live beside
// it (the EpochLoop, epochs.go and epoch_*.go, around the Protection state
// machine, protection.go; the OutputGate, outputgate.go); they ask the core
// through CanRelease and report through ReportEpoch, never the other way
// round. Decisions never depend on an event having been consumed:
// CanRelease is computed from raft and the FSM at the moment of the call.
//
// # Replicated state
//
// FSMState holds the cluster ID, the generation, the primary's ID, whether
// the trio is protected, the last acknowledged epoch, and every member's
// NodeInfo. Log entries are a version byte, a command type byte and a
// msgpack body: register (upsert a member), promote (compare-and-set: the
// generation must be exactly current+1), set-protected and epoch (both
// refused unless they carry the current generation, so a deposed primary's
// late commands change nothing).
//
// # The state machine
//
// Raft leadership is the right to run the guest. Decide(View, now) turns
// what a node sees into actions; it is pure and tested with a fake clock.
// Per node, the states are:
//
//	follower ──(wins election)──▶ leader
//	leader, witness or not Eligible ──▶ Transfer leadership (retried every
//	    RetryInterval, target rotating over the candidates)
//	leader, Eligible, lease valid ──▶ Claim: apply promote(gen+1)
//	claimed in this term, FSM says primary=self, gen=claimed ──▶ Activate(gen)
//	    (with the image the claim was made with; no transfer while a claim
//	    is pending)
//	    (event BecamePrimary: run the guest, release under gen)
//	active ──(not leader | new term | lease expired | switchover |
//	    FSM primary/gen changed)──▶ Fence (event Fenced: stop releasing,
//	    pause the guest)
//	active, protected, no data heartbeat for DataTimeout ──▶ MarkUnprotected
//	active, newer epoch reported, EpochInterval passed ──▶ ApplyEpoch
//
// Eligible: a node resumes only from an image at or after what raft
// committed, never from its own disk's idea of it. The driver reports its
// image (SetImage): the generation of the primary whose guest it is (its
// own guest: the generation it ran under; a replica: its stream's
// handshake generation, kept in a stored image too), its last epoch, and
// whether it is the node's own live guest. Eligible then means: not a
// witness, holding an image, and: at generation 0 only the node configured
// as primary (its booted guest); otherwise the image must be of the FSM's
// generation and at or past its epoch, and then the generation's primary
// may resume it (its guest kept paused since a fence, or the image its own
// claim of the generation was made with: nothing is released under a
// generation before its activation, so a claimant that lost leadership
// before activating stays eligible), and another node only while
// protected. An image of an older generation (a stale stored image, a
// replica of an earlier primary) may lack released output, so a node
// holding only that waits. An unprotected trio can only be resumed by its
// primary: the secondary's image would lack output already released.
// IneligibleReason says which rule failed; Node.Waiting turns it, with
// Needed (the node and image the cluster needs), into the status's
// reason for nobody serving.
//
// The EpochLoop fences itself too when its secondary says it was
// activated (an acknowledgement or a refusal with Activated set): its gate
// refuses every release from then on and it pauses the guest. In a trio
// raft's fence follows; in a pair it is the only fence there is. A loop
// also drops a link whose acknowledgements stop moving for AckTimeout,
// and SetSecondary with another address moves a protected loop at once.
//
// A fenced primary keeps its guest paused (the driver's part) until
// another node is primary in a newer generation: after a double failure
// (witness and secondary gone, the primary's lease lost) it holds the only
// complete copy, and resumes it when raft makes it primary again.
//
// The witness is a voter and may win an election (raft has no
// non-candidate voters). It then transfers leadership at once, to a
// reachable guest-capable node (heartbeat failures observed from raft steer
// the choice; a transfer to a dead node would block the leader's applies for
// an election timeout); during that window nobody runs the guest. Raft
// followers refuse votes while they still back a live-looking leader, so
// the node that stops backing the dead leader first tends to lose the
// election to the second. The witness therefore runs with half the
// heartbeat timeout and twice the election timeout: it drops the dead
// leader first, and its own retry comes late, so the secondary normally
// wins outright.
//
// # Fencing and the lease
//
// While leader, the node calls raft's VerifyLeader every LeaderLeaseTimeout/4;
// the lease deadline is the start of the last round a majority answered plus
// LeaderLeaseTimeout. LeaderLeaseTimeout <= HeartbeatTimeout/2 (the
// witness's heartbeat timeout), and a raft follower refuses to vote while it
// has heard from its leader within its heartbeat timeout, so no other node
// can be elected before the lease ends (clock rate drift over 100 ms is
// negligible; clock steps do not matter, the lease uses the monotonic
// clock).
// CanRelease(gen) is MayRelease over the live view: leader in the term the
// generation was activated, lease not expired, no switchover in progress,
// FSM primary = self and FSM generation = gen. A ticker (every
// LeaderLeaseTimeout/5) re-runs Decide so the Fenced event follows within a
// tick, but CanRelease turns false at the instant the lease ends.
//
// Only a leader initiates a leadership transfer (which bypasses the vote
// check), and Switchover fences before it transfers.
//
// # Membership and the data directory
//
// The data directory holds LOCK (flock: the same node cannot run twice),
// cluster-id and node-id (a directory of another cluster or node is refused,
// nothing overwritten), raft.db and snapshots/. On first start every node
// bootstraps the same three-voter configuration from Config.Peers; on later
// starts the stored configuration must equal Peers. Each node puts its own
// NodeInfo into the FSM: directly when leader, otherwise by a small
// registration RPC to the leader on the raft port (first byte 0xA7; raft's
// own RPCs start with 0..4; see The raft port's trust).
//
// # The raft port's trust
//
// With Config.TLS the raft port is mutual TLS against the cluster CA
// (internal/trust): an accepted connection must finish its handshake
// within 3 s, before a byte of it is read, with a certificate naming
// exactly one member (an ID of Config.Peers); anything else is closed
// with one log line naming the certificate and why. Dials go only to a
// member's raft address and require the certificate of that member.
// Without TLS, Open refuses a non-loopback RaftAddr (trust.ErrPlaintext)
// unless Insecure, and warns when Insecure is used.
//
// The server side of raft's RPCs is Tandem's (rpc.go, raft's wire
// format): every request is checked before raft sees it. Its header must
// name a member at that member's raft address and, with TLS, the member
// the certificate names. TimeoutNow, which makes raft start an election
// at once, is honoured only from the leader this node follows: Tandem
// transfers leadership only from the leader (Switchover, the witness's
// hand-over). A vote request's LeadershipTransfer flag, which bypasses
// "I still follow a live leader", counts only on the node that started a
// transfer to that candidate (for 4 election timeouts, at least 2 s);
// elsewhere it is cleared, so a transfer is won with the old leader's
// vote. A refused RPC is answered with an error and its connection closed.
//
// A registration changes only the registrant's own entry: with TLS its
// ID must be the member its certificate names; without, it must come from
// loopback (or Insecure). Its frame is at most 4 KiB, read within 2 s;
// a wrong cluster ID is answered "wrong cluster" without either ID (the
// leader logs them).
//
// A member's certificate is trusted to run raft: it can still vote, and
// send AppendEntries under a higher term. What it cannot do is start an
// election elsewhere, win votes past a live leader, or speak for another
// member.
//
// # Concurrency
//
// A Node owns these goroutines, all stopped by Close: the decision loop
// (ticker, raft leader and heartbeat observations, wake-ups), the lease
// verifier, the TCP accept loop, one per accepted connection (its
// handshake, a registration, or its raft RPCs), and short-lived workers
// for raft applies, transfers and registrations, each bounded by a
// timeout. Lock order: Node.mu, then muxStream.connsMu. The FSM never
// takes Node.mu. OutputGate: relMu (orders sink calls), then mu (its
// state); the sink runs under relMu only, never under mu, so a pause's
// Seal never waits for the outside world. EpochLoop.mu guards its
// Protection and figures only: actions are performed after it is
// released, so it is never held across the gate, a callback or I/O, and
// it is never taken under the gate's locks.
//
// # Protection: the EpochLoop and its state machine
//
// A primary's protection is two parts. Protection (protection.go) is
// pure: events in, actions out, no I/O, no clock reads (every event
// carries its time), no goroutines; its scripts in testdata/protection
// replay it event by event. The EpochLoop is the I/O shell: it turns
// what happens (a join, an epoch sent, a pause, an acknowledgement, a
// verification mismatch, a deadline, the cluster's relink, a switchover's
// request, an activated secondary) into events, steps them under its
// mutex, and performs the actions after releasing it (hold output,
// release output up to a gate epoch, record the loss of protection and
// let held output out, tell the cluster, relink, drop a silent link, back
// off, fence, resume a guest a final capture left paused).
//
// States: unprotected (no secondary, or between links; output passes
// once the loss of protection is recorded), joining (a link's catch-up
// and first epochs, until an acknowledged and, with Verify, verified
// epoch), protected, and fenced (absorbing). A link that fails returns
// to unprotected and backs off (200 ms doubling to 5 s, from the minimum
// again after a link that got as far as protected); the cluster's relink
// drops only a protected link; a verification mismatch makes the link
// unprotected at once, ignores what it acknowledges from then on and
// relinks (the rejoin re-syncs the secondary from scratch).
//
// Goroutines per link, each owned and joined by protect: the capture
// loop (Run's goroutine: captures every Interval, or when NextPause
// says: see Output-triggered epochs), the shipper (encodes
// and sends captured epochs in order) and the ack goroutine.
// Acknowledgements arrive on a channel from the link's reader; the ack
// goroutine steps them, hears of every epoch sent (each epoch's end
// flushes the link) and sleeps until the machine's acknowledgement
// deadline: AckTimeout after the later of the last progress and the
// moment something became outstanding. Nothing polls. The capture side
// waits on channels too: for room in the in-flight window (back-pressure:
// at most MaxInFlight epochs unacknowledged and one queued for shipping,
// so a slow secondary lengthens epochs, never memory), woken by
// acknowledgements and returned buffers; and for a final epoch's
// acknowledgement, until the machine's 10 s deadline. Every wait is
// bounded by the link: a silent link is dropped at the ack deadline,
// which ends its reader and closes replica.Link.Done.
//
// # Output-triggered epochs (EpochConfig.Trigger)
//
// Output commit makes a reply wait for the end of its epoch and the
// acknowledgement; with epochs on a fixed clock a client that waits for
// each reply gets one request per epoch. With Trigger output an epoch
// ends early when the guest has written output that is held. NextPause
// (epoch_trigger.go) decides, pure, from the time since the last pause,
// the open epoch's held bytes and their age, whether output was written
// while earlier output still waited within the last PipelinedHold (1 s:
// a pipelined load), the epochs in
// flight and the window, and the pause-cost line the loop learns from
// every capture (a fixed part, a copy time per page, the dirty rate).
// Held output with nothing earlier waiting (a synchronous client) ends
// the epoch at once, but never sooner than DefaultMinInterval after the
// last pause and never so soon that pauses take more than
// MaxPauseFraction of the time; pipelined output, and no output at all,
// keep the interval. MaxOutputDelay is the objective; the status names
// the bound that set the last decision (epoch_bound) and counts epochs
// by output and by the clock. Its scripts are in testdata/trigger.
//
// Nothing polls between the guest's write and the release: the gate's
// Arrivals channel wakes the capture loop on the open epoch's first held
// byte, acknowledgements wake it through progress, and one timer covers
// the bounds (a wait under 2 ms is slept in nanosleep: an idle Go
// process wakes for its runtime timers only to the millisecond, which
// cost a synchronous request a millisecond of its 2: epoch_timer.go). Each hop is a named histogram (epoch_output_wait,
// epoch_capture, epoch_queue, epoch_encode, epoch_send, epoch_apply,
// epoch_ack, epoch_release: see the Phase constants). The gate's rule
// does not change: output leaves only when its epoch is acknowledged,
// however the epoch was ended.
//
// # Proving the replica (EpochLoop, Verify)
//
// Verification is on by default at the command line (--verify-epochs).
// The primary keeps a digest of what the secondary will hold: a MemHash
// built from every page as it was sent (the catch-up's stable copies,
// then every epoch's captured copies) plus the captured machine state.
// The secondary acknowledges each epoch with the digest of its committed
// image; the two must be equal. That proves the secondary applied exactly
// what was shipped. To prove that what was shipped is what the guest
// holds, every pause also re-reads a rotating slice of memory
// (VerifySlicePages, 2 MiB by default, after an epoch of Interval; a
// shorter, output-triggered epoch re-reads its share, so coverage per
// second stays the same) and compares each page with its shipped hash: a
// write the dirty log missed shows there within one rotation (guest
// pages / slice intervals). Only the slice is read at the
// pause; the captured pages are hashed from their copies after the
// resume, so the pause grows by the slice's hashing, not by a scan.
//
// A mismatch of either kind is an incident, decided by Protection: at once
// the secondary stops counting as a replica (state unprotected,
// OnProtected(false); nothing it acknowledges on that link releases
// output or reaches OnCommitted, so raft never records an epoch that
// failed), the link is dropped, held output follows the unprotected rules
// (it leaves once Unprotect has recorded the loss of protection), and
// the rejoin re-syncs the secondary from scratch into a fresh image (the
// Secondary adopts it only once it is consistent). Protection returns
// only with an acknowledged epoch whose digest matches. Status keeps the
// last mismatch: its epoch, when, and how it was resolved.
package failover
