package failover

import (
	"fmt"
	"time"
)

// Tuning holds the intervals the decision core works with.
type Tuning struct {
	// DataTimeout: an active primary whose last data-channel heartbeat from
	// the secondary is older than this marks the trio unprotected. Zero
	// disables the automatic mark (the driver then calls SetProtected).
	DataTimeout time.Duration
	// EpochInterval is the least time between two epoch reports applied to
	// raft; epochs arrive every ~25 ms and only the latest matters.
	EpochInterval time.Duration
	// RetryInterval is the least time between two attempts of a leadership
	// transfer or a registration.
	RetryInterval time.Duration
}

// Activation is the generation a node runs the guest under, and the raft term
// in which it won it. The zero value means "not active".
type Activation struct {
	Generation uint64
	Term       uint64
}

// Pending says which asynchronous operations are in flight; Decide does not
// start a second one of the same kind.
type Pending struct {
	Claim, Transfer, Protect, Epoch, Register bool
}

// View is everything Decide looks at. The Node builds one per tick from raft,
// the FSM and what its driver reported; tests build them by hand.
type View struct {
	// Self is this node's info as it should be registered in the FSM.
	Self NodeInfo
	// Leader: raft says this node is the leader, in term Term.
	Leader bool
	Term   uint64
	// LeaseDeadline: while Leader, the time until which no other node can
	// have been elected (start of the last round in which a majority
	// answered, plus LeaderLeaseTimeout). Zero when not leader.
	LeaseDeadline time.Time
	// Transferring: a switchover handed leadership away; this node must not
	// release even though raft may still call it leader.
	Transferring bool
	// State is the FSM state as applied on this node.
	State FSMState
	// Runnable: this node holds a guest image of this cluster it could run,
	// as of RunnableEpoch, built by the primary of generation RunnableGen
	// (for the node's own guest, the generation it ran under; 0 for a
	// fresh cluster's booted guest). RunnableLive: the image is the node's
	// own guest, kept in memory, not a replica. The driver reports them
	// (Node.SetImage); the Node raises RunnableGen past its own claims.
	Runnable      bool
	RunnableEpoch uint64
	RunnableGen   uint64
	RunnableLive  bool
	// Active is the generation this node has activated; zero if none.
	Active Activation
	// Claimed is the generation this node's own promotion created, in term
	// ClaimedTerm. A claim from an earlier term does not count.
	Claimed     uint64
	ClaimedTerm uint64
	Pending     Pending
	// When the last transfer, registration and epoch apply were started, and
	// how many transfers have been tried this term (rotates the target).
	LastTransfer     time.Time
	TransferAttempts int
	LastRegister     time.Time
	LastEpochApply   time.Time
	// ReportedEpoch is the newest epoch the driver reported.
	ReportedEpoch uint64
	// PeerHeartbeat is the last data-channel heartbeat from the secondary.
	PeerHeartbeat time.Time
	// AnnouncedPeer is the secondary last announced with a PeerChanged event.
	AnnouncedPeer NodeInfo
	// Voters are the raft voters (ID and RaftAddr only), registered or not.
	Voters []NodeInfo
	// Unreachable names the voters a leader currently fails to heartbeat.
	Unreachable map[string]bool
	Tuning
}

// ActionKind names what the Node must do.
type ActionKind int

const (
	// ActFence: stop releasing output now and pause the guest. Generation is
	// the one being given up.
	ActFence ActionKind = iota + 1
	// ActActivate: run the guest and release its output under Generation.
	ActActivate
	// ActClaim (bump generation): apply a promotion of Self to Generation.
	ActClaim
	// ActTransfer: hand raft leadership to Target.
	ActTransfer
	// ActMarkUnprotected: apply Protected=false at Generation.
	ActMarkUnprotected
	// ActApplyEpoch: apply Epoch at Generation.
	ActApplyEpoch
	// ActRegister: get Target (this node's info) into the FSM.
	ActRegister
	// ActAnnouncePeer: the secondary is now Target.
	ActAnnouncePeer
)

func (k ActionKind) String() string {
	switch k {
	case ActFence:
		return "fence"
	case ActActivate:
		return "activate"
	case ActClaim:
		return "claim"
	case ActTransfer:
		return "transfer"
	case ActMarkUnprotected:
		return "mark-unprotected"
	case ActApplyEpoch:
		return "apply-epoch"
	case ActRegister:
		return "register"
	case ActAnnouncePeer:
		return "announce-peer"
	}
	return fmt.Sprintf("action(%d)", int(k))
}

// Action is one step Decide asks for.
type Action struct {
	Kind       ActionKind
	Generation uint64
	Epoch      uint64
	Target     NodeInfo
	Reason     string
}

func (a Action) String() string {
	s := a.Kind.String()
	if a.Generation != 0 {
		s += fmt.Sprintf(" gen=%d", a.Generation)
	}
	if a.Epoch != 0 {
		s += fmt.Sprintf(" epoch=%d", a.Epoch)
	}
	if a.Target.ID != "" {
		s += " to=" + a.Target.ID
	}
	if a.Reason != "" {
		s += " (" + a.Reason + ")"
	}
	return s
}

// MayRelease reports whether a node in view v may, at now, release output
// produced under generation gen. CanRelease and Decide's fencing rule both
// use it, so the gate and the fence can never disagree.
func MayRelease(v View, now time.Time, gen uint64) bool {
	return gen != 0 && v.Active.Generation == gen && fenceReason(v, now) == ""
}

// fenceReason says why an active node must fence, or "" if it may go on.
func fenceReason(v View, now time.Time) string {
	switch {
	case v.Active.Generation == 0:
		return "not active"
	case v.Self.Role == RoleWitness:
		return "witness never runs the guest"
	case !v.Leader:
		return "lost raft leadership"
	case v.Active.Term != v.Term:
		return "leadership was lost and regained in a new term"
	case v.Transferring:
		return "switchover in progress"
	case !now.Before(v.LeaseDeadline):
		return "leader lease expired: no majority contact"
	case v.State.Primary != v.Self.ID || v.State.Generation != v.Active.Generation:
		return fmt.Sprintf("superseded: generation %d belongs to %q", v.State.Generation, v.State.Primary)
	}
	return ""
}

// Eligible reports whether this node may claim the primary role when it is
// the raft leader: it must be able to run the guest, and its image must
// include everything the cluster may already have released.
func Eligible(v View) bool { return IneligibleReason(v) == "" }

// IneligibleReason says why this node may not claim the primary role, or
// "" if it may. The rule: a node resumes only from an image at or after
// what raft committed, never from its own disk's idea of it. The image
// must belong to the committed generation (an image of an older
// generation lacks whatever that generation's primary released; of a
// newer one, this node's view of raft is behind) and hold the committed
// epoch. Then the generation's own primary may resume it (its kept guest,
// or the image it claimed the generation with: nothing was released
// since), and another node only while the cluster is protected (every
// released byte came from an epoch the secondary acknowledged); an
// unprotected cluster can only be resumed by its primary.
func IneligibleReason(v View) string {
	s := v.State
	switch {
	case v.Self.Role == RoleWitness:
		return "a witness never runs the guest"
	case !v.Runnable:
		return "it holds no image of the guest"
	case s.Generation == 0:
		// First start: only the node configured as primary boots a guest.
		if v.Self.Role != RolePrimary {
			return "the cluster has never run the guest: only the configured primary boots it"
		}
		return ""
	case v.RunnableGen != s.Generation:
		return fmt.Sprintf("its %s is of generation %d (epoch %d), the cluster is at generation %d (committed epoch %d)",
			imageKind(v), v.RunnableGen, v.RunnableEpoch, s.Generation, s.Epoch)
	case v.RunnableEpoch < s.Epoch:
		return fmt.Sprintf("its %s is at epoch %d, behind the committed epoch %d (generation %d)",
			imageKind(v), v.RunnableEpoch, s.Epoch, s.Generation)
	case s.Primary == v.Self.ID:
		return ""
	case !s.Protected:
		return fmt.Sprintf("the cluster is unprotected at generation %d: only its primary %s holds every released output", s.Generation, s.Primary)
	}
	return ""
}

func imageKind(v View) string {
	if v.RunnableLive {
		return "own guest"
	}
	return "replica image"
}

// Needed names the node and image the cluster in state s needs to resume
// the guest (for a status that says why nobody serves).
func Needed(s FSMState) string {
	switch {
	case s.Generation == 0:
		return "the configured primary, with its booted guest"
	case !s.Protected:
		return fmt.Sprintf("primary %s with its own guest of generation %d (unprotected: only it holds every released output)", s.Primary, s.Generation)
	}
	need := fmt.Sprintf("primary %s with its own guest of generation %d", s.Primary, s.Generation)
	if sec, ok := s.Secondary(); ok {
		need += fmt.Sprintf(", or secondary %s with its image of generation %d at epoch >= %d", sec.ID, s.Generation, s.Epoch)
	}
	return need
}

// transferCandidates lists, best first, the nodes a leader that will not run
// the guest should hand leadership to.
func transferCandidates(v View) []NodeInfo {
	s := v.State
	var out []NodeInfo
	add := func(pred func(NodeInfo) bool) {
		for _, m := range s.Members {
			if m.ID != v.Self.ID && m.Role != RoleWitness && m.RaftAddr != "" && pred(m) {
				out = append(out, m)
			}
		}
	}
	switch {
	case s.Generation == 0:
		add(func(m NodeInfo) bool { return m.Role == RolePrimary })
	case s.Protected:
		// A leader that is not the primary usually means the primary is
		// gone: try the secondary first, then the primary.
		add(func(m NodeInfo) bool { return m.ID != s.Primary })
		add(func(m NodeInfo) bool { return m.ID == s.Primary })
	default:
		add(func(m NodeInfo) bool { return m.ID == s.Primary })
	}
	if s.Generation == 0 || s.Protected {
		// Voters that have not registered yet may be guest-capable; their
		// role is unknown, so they come last.
		for _, p := range v.Voters {
			if _, ok := s.Member(p.ID); !ok && p.ID != v.Self.ID {
				out = append(out, p)
			}
		}
	}
	// A transfer to a dead node blocks the leader's applies for an election
	// timeout: prefer the nodes it can reach.
	var reachable []NodeInfo
	for _, m := range out {
		if !v.Unreachable[m.ID] {
			reachable = append(reachable, m)
		}
	}
	if len(reachable) > 0 {
		return reachable
	}
	return out
}

// Decide is the failover state machine: a pure function of what a node
// observes and the time. It does no I/O; the Node carries the actions out.
// Fence always comes first when present.
func Decide(v View, now time.Time) []Action {
	var acts []Action
	active := v.Active.Generation != 0
	if active {
		if r := fenceReason(v, now); r != "" {
			acts = append(acts, Action{Kind: ActFence, Generation: v.Active.Generation, Reason: r})
			active = false
		}
	}

	if m, ok := v.State.Member(v.Self.ID); (!ok || m != v.Self) && !v.Pending.Register && now.Sub(v.LastRegister) >= v.RetryInterval {
		acts = append(acts, Action{Kind: ActRegister, Target: v.Self})
	}
	if peer, ok := v.State.Secondary(); ok && peer != v.AnnouncedPeer {
		acts = append(acts, Action{Kind: ActAnnouncePeer, Target: peer})
	}

	if !v.Leader || v.Transferring {
		return acts
	}
	// Our own claim, committed in this term: activate with the image it
	// was made with (the claim raised the generation past the image's).
	// While a claim is pending, wait for it.
	claimed := v.Claimed != 0 && v.ClaimedTerm == v.Term
	ownClaim := claimed && v.State.Primary == v.Self.ID && v.State.Generation == v.Claimed && v.Runnable
	if !active && !ownClaim && !v.Pending.Claim && !Eligible(v) {
		if c := transferCandidates(v); len(c) > 0 && !v.Pending.Transfer && now.Sub(v.LastTransfer) >= v.RetryInterval {
			acts = append(acts, Action{Kind: ActTransfer, Target: c[v.TransferAttempts%len(c)], Reason: "leader cannot run the guest"})
		}
		return acts
	}
	if !now.Before(v.LeaseDeadline) {
		// No claim or activation without a fresh majority contact.
		return acts
	}
	if active {
		s := v.State
		if s.Protected && v.DataTimeout > 0 && now.Sub(v.PeerHeartbeat) > v.DataTimeout && !v.Pending.Protect {
			acts = append(acts, Action{Kind: ActMarkUnprotected, Generation: s.Generation, Reason: "no data-channel heartbeat from the secondary"})
		}
		if v.ReportedEpoch > s.Epoch && !v.Pending.Epoch && now.Sub(v.LastEpochApply) >= v.EpochInterval {
			acts = append(acts, Action{Kind: ActApplyEpoch, Generation: s.Generation, Epoch: v.ReportedEpoch})
		}
		return acts
	}
	switch {
	case ownClaim:
		acts = append(acts, Action{Kind: ActActivate, Generation: v.Claimed, Epoch: v.State.Epoch})
	case !claimed && !v.Pending.Claim && Eligible(v):
		acts = append(acts, Action{Kind: ActClaim, Generation: v.State.Generation + 1})
	}
	return acts
}
