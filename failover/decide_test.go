package failover

import (
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

var (
	infoP = NodeInfo{ID: "p", Role: RolePrimary, RaftAddr: "10.0.0.1:7000", DataAddr: "10.0.0.1:7001"}
	infoS = NodeInfo{ID: "s", Role: RoleSecondary, RaftAddr: "10.0.0.2:7000", DataAddr: "10.0.0.2:7001"}
	infoW = NodeInfo{ID: "w", Role: RoleWitness, RaftAddr: "10.0.0.3:7000"}
)

func members() []NodeInfo { return []NodeInfo{infoP, infoS, infoW} }

var tuning = Tuning{DataTimeout: 500 * time.Millisecond, EpochInterval: 100 * time.Millisecond, RetryInterval: 100 * time.Millisecond}

// kinds renders actions compactly for comparisons.
func render(acts []Action) string {
	var s []string
	for _, a := range acts {
		s = append(s, a.String())
	}
	return strings.Join(s, "; ")
}

func TestDecideTable(t *testing.T) {
	protected := FSMState{Generation: 4, Primary: "p", Protected: true, Epoch: 100, Members: members()}
	unprotected := protected
	unprotected.Protected = false
	fresh := FSMState{Members: members()}
	activeP := func(mut func(*View)) View {
		v := View{Self: infoP, Leader: true, Term: 7, LeaseDeadline: t0.Add(50 * time.Millisecond),
			State: protected, Runnable: true, RunnableGen: 4, RunnableEpoch: 100, RunnableLive: true, Active: Activation{Generation: 4, Term: 7},
			Claimed: 4, ClaimedTerm: 7, PeerHeartbeat: t0, AnnouncedPeer: infoS, Tuning: tuning}
		if mut != nil {
			mut(&v)
		}
		return v
	}
	cases := []struct {
		name string
		v    View
		want string
	}{
		{"steady primary does nothing", activeP(nil), ""},
		{"lost leadership fences", activeP(func(v *View) { v.Leader = false }), "fence gen=4 (lost raft leadership)"},
		{"lease expired fences", activeP(func(v *View) { v.LeaseDeadline = t0 }), "fence gen=4 (leader lease expired: no majority contact)"},
		{"new term fences then reclaims", activeP(func(v *View) { v.Term = 8 }),
			"fence gen=4 (leadership was lost and regained in a new term); claim gen=5"},
		{"switchover fences and stops", activeP(func(v *View) { v.Transferring = true }), "fence gen=4 (switchover in progress)"},
		{"superseded fences", activeP(func(v *View) { v.State.Generation = 5; v.State.Primary = "s" }),
			"fence gen=4 (superseded: generation 5 belongs to \"s\"); announce-peer to=p; transfer to=s (leader cannot run the guest)"},
		{"stale data heartbeat marks unprotected", activeP(func(v *View) { v.PeerHeartbeat = t0.Add(-501 * time.Millisecond) }),
			"mark-unprotected gen=4 (no data-channel heartbeat from the secondary)"},
		{"unprotect already pending", activeP(func(v *View) { v.PeerHeartbeat = t0.Add(-time.Second); v.Pending.Protect = true }), ""},
		{"data timeout disabled", activeP(func(v *View) { v.PeerHeartbeat = time.Time{}; v.DataTimeout = 0 }), ""},
		{"epoch applied when interval passed", activeP(func(v *View) { v.ReportedEpoch = 130; v.LastEpochApply = t0.Add(-100 * time.Millisecond) }),
			"apply-epoch gen=4 epoch=130"},
		{"epoch rate limited", activeP(func(v *View) { v.ReportedEpoch = 130; v.LastEpochApply = t0.Add(-99 * time.Millisecond) }), ""},
		{"epoch not behind", activeP(func(v *View) { v.ReportedEpoch = 100 }), ""},
		{"re-registers changed addresses", activeP(func(v *View) { v.Self.APIAddr = "10.0.0.1:8080" }),
			"register to=p"},
		{"announces changed secondary", activeP(func(v *View) { v.AnnouncedPeer = NodeInfo{} }), "announce-peer to=s"},

		{"follower does nothing", View{Self: infoS, Term: 3, State: protected, AnnouncedPeer: infoS, Runnable: true, RunnableEpoch: 100, Tuning: tuning}, ""},
		{"first leader at gen 0 is the primary: claim", View{Self: infoP, Leader: true, Term: 2, LeaseDeadline: t0.Add(time.Millisecond), State: fresh, Runnable: true, AnnouncedPeer: infoS, Tuning: tuning},
			"claim gen=1"},
		{"claim waits for the lease", View{Self: infoP, Leader: true, Term: 2, State: fresh, Runnable: true, AnnouncedPeer: infoS, Tuning: tuning}, ""},
		{"claim pending is not repeated", View{Self: infoP, Leader: true, Term: 2, LeaseDeadline: t0.Add(time.Millisecond), State: fresh, Runnable: true, Pending: Pending{Claim: true}, AnnouncedPeer: infoS, Tuning: tuning}, ""},
		{"secondary leader at gen 0 hands over to the primary", View{Self: infoS, Leader: true, Term: 2, State: fresh, Runnable: true, AnnouncedPeer: infoS, Tuning: tuning},
			"transfer to=p (leader cannot run the guest)"},
		{"witness leader hands over to the secondary first", View{Self: infoW, Leader: true, Term: 9, State: protected, AnnouncedPeer: infoS, Tuning: tuning},
			"transfer to=s (leader cannot run the guest)"},
		{"witness rotates target after a failed try", View{Self: infoW, Leader: true, Term: 9, State: protected, TransferAttempts: 1, LastTransfer: t0.Add(-time.Second), AnnouncedPeer: infoS, Tuning: tuning},
			"transfer to=p (leader cannot run the guest)"},
		{"transfer retry is rate limited", View{Self: infoW, Leader: true, Term: 9, State: protected, LastTransfer: t0.Add(-50 * time.Millisecond), AnnouncedPeer: infoS, Tuning: tuning}, ""},
		{"witness with unprotected trio hands to the primary only", View{Self: infoW, Leader: true, Term: 9, State: unprotected, AnnouncedPeer: infoS, Tuning: tuning},
			"transfer to=p (leader cannot run the guest)"},
		{"protected secondary with the epoch claims", View{Self: infoS, Leader: true, Term: 8, LeaseDeadline: t0.Add(time.Millisecond), State: protected, Runnable: true, RunnableEpoch: 100, RunnableGen: 4, AnnouncedPeer: infoS, Tuning: tuning},
			"claim gen=5"},
		{"secondary behind the reported epoch does not claim", View{Self: infoS, Leader: true, Term: 8, LeaseDeadline: t0.Add(time.Millisecond), State: protected, Runnable: true, RunnableEpoch: 99, RunnableGen: 4, AnnouncedPeer: infoS, Tuning: tuning},
			"transfer to=p (leader cannot run the guest)"},
		{"unprotected secondary does not claim", View{Self: infoS, Leader: true, Term: 8, LeaseDeadline: t0.Add(time.Millisecond), State: unprotected, Runnable: true, RunnableEpoch: 100, RunnableGen: 4, AnnouncedPeer: infoS, Tuning: tuning},
			"transfer to=p (leader cannot run the guest)"},
		{"primary without its guest does not claim", View{Self: infoP, Leader: true, Term: 8, LeaseDeadline: t0.Add(time.Millisecond), State: unprotected, AnnouncedPeer: infoS, Tuning: tuning}, ""},
		{"claimed in this term: activate", View{Self: infoS, Leader: true, Term: 8, LeaseDeadline: t0.Add(time.Millisecond), State: FSMState{Generation: 5, Primary: "s", Epoch: 100, Members: members()}, Runnable: true, RunnableEpoch: 100, Claimed: 5, ClaimedTerm: 8, AnnouncedPeer: infoP, Tuning: tuning},
			"activate gen=5 epoch=100"},
		{"claim from an older term does not activate", View{Self: infoP, Leader: true, Term: 9, LeaseDeadline: t0.Add(time.Millisecond), State: protected, Runnable: true, RunnableGen: 4, RunnableEpoch: 100, RunnableLive: true, Claimed: 4, ClaimedTerm: 7, AnnouncedPeer: infoS, Tuning: tuning},
			"claim gen=5"},
		{"unreachable secondary is skipped", View{Self: infoW, Leader: true, Term: 9, State: protected, Unreachable: map[string]bool{"s": true}, AnnouncedPeer: infoS, Tuning: tuning},
			"transfer to=p (leader cannot run the guest)"},
		{"all unreachable: try anyway", View{Self: infoW, Leader: true, Term: 9, State: protected, Unreachable: map[string]bool{"s": true, "p": true}, AnnouncedPeer: infoS, Tuning: tuning},
			"transfer to=s (leader cannot run the guest)"},
		{"unregistered voter is a last-resort target", View{Self: infoW, Leader: true, Term: 2, State: FSMState{Members: []NodeInfo{infoW}},
			Voters: []NodeInfo{{ID: "p", RaftAddr: infoP.RaftAddr}, {ID: "s", RaftAddr: infoS.RaftAddr}, {ID: "w", RaftAddr: infoW.RaftAddr}}, Tuning: tuning},
			"transfer to=p (leader cannot run the guest)"},
		{"unregistered voter is not a target when unprotected", View{Self: infoS, Leader: true, Term: 9, State: FSMState{Generation: 3, Primary: "p", Members: []NodeInfo{infoP, infoS}},
			Voters: []NodeInfo{{ID: "x", RaftAddr: "10.0.0.9:7000"}}, AnnouncedPeer: infoS, Runnable: true, Tuning: tuning},
			"transfer to=p (leader cannot run the guest)"},

		// The double failure (issue 19): the witness and the secondary went
		// away; the primary p fenced. Raft committed generation 7, epoch
		// 27353; what p may resume from decides whether it claims.
		{"primary with a stale stored image does not claim", leaderAfterDouble(infoP, func(v *View) { v.RunnableGen, v.RunnableEpoch, v.RunnableLive = 2, 833, false }),
			"transfer to=s (leader cannot run the guest)"},
		{"primary with its kept guest claims", leaderAfterDouble(infoP, nil), "claim gen=8"},
		{"primary with its kept guest, cluster unprotected, claims", leaderAfterDouble(infoP, func(v *View) { v.State.Protected = false }), "claim gen=8"},
		{"primary without an image waits for the secondary", leaderAfterDouble(infoP, func(v *View) { v.Runnable = false }),
			"transfer to=s (leader cannot run the guest)"},
		{"secondary with an image of an older generation does not claim", leaderAfterDouble(infoS, func(v *View) { v.RunnableGen, v.RunnableEpoch, v.RunnableLive = 6, 27400, false }),
			"transfer to=p (leader cannot run the guest)"},
		{"secondary with the committed generation's image claims", leaderAfterDouble(infoS, func(v *View) { v.RunnableGen, v.RunnableEpoch, v.RunnableLive = 7, 27353, false }),
			"claim gen=8"},
		{"secondary of an unprotected cluster waits for the primary", leaderAfterDouble(infoS, func(v *View) {
			v.RunnableGen, v.RunnableEpoch, v.RunnableLive = 7, 27353, false
			v.State.Protected = false
		}), "transfer to=p (leader cannot run the guest)"},
		{"an image of a newer generation than raft shows does not claim", leaderAfterDouble(infoS, func(v *View) { v.RunnableGen, v.RunnableEpoch, v.RunnableLive = 8, 27400, false }),
			"transfer to=p (leader cannot run the guest)"},
		{"a claimant that lost leadership before activating claims again", leaderAfterDouble(infoS, func(v *View) {
			// s claimed generation 7 with its replica of generation 6; the
			// Node raised the image's generation to its claim.
			v.RunnableGen, v.RunnableEpoch, v.RunnableLive = 7, 27353, false
			v.State.Primary, v.State.Protected = "s", false
		}), "claim gen=8"},
		{"own claim committed: activate although the image is of the generation before", leaderAfterDouble(infoS, func(v *View) {
			v.RunnableGen, v.RunnableEpoch, v.RunnableLive = 6, 27353, false
			v.State.Primary, v.State.Protected = "s", false
			v.Claimed, v.ClaimedTerm = 7, 12
		}), "activate gen=7 epoch=27353"},
		{"claim pending: no hand-over while raft applies it", leaderAfterDouble(infoS, func(v *View) {
			v.RunnableGen, v.RunnableEpoch, v.RunnableLive = 6, 27353, false
			v.State.Primary, v.State.Protected = "s", false
			v.Pending.Claim = true
		}), ""},
		{"unregistered node registers", View{Self: infoS, Term: 1, State: FSMState{}, Tuning: tuning}, "register to=s"},
		{"registration rate limited", View{Self: infoS, Term: 1, State: FSMState{}, LastRegister: t0.Add(-10 * time.Millisecond), Tuning: tuning}, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := render(Decide(c.v, t0)); got != c.want {
				t.Errorf("Decide:\n got  %q\n want %q", got, c.want)
			}
		})
	}
}

func TestMayRelease(t *testing.T) {
	st := FSMState{Generation: 4, Primary: "p", Members: members()}
	base := View{Self: infoP, Leader: true, Term: 7, LeaseDeadline: t0.Add(10 * time.Millisecond), State: st, Active: Activation{4, 7}}
	if !MayRelease(base, t0, 4) {
		t.Fatal("active leader within its lease must release")
	}
	if MayRelease(base, t0, 3) || MayRelease(base, t0, 5) || MayRelease(base, t0, 0) {
		t.Fatal("released under a generation other than the active one")
	}
	if MayRelease(base, t0.Add(10*time.Millisecond), 4) {
		t.Fatal("released at the lease deadline")
	}
	w := base
	w.Self = infoW
	w.State.Primary = "w"
	if MayRelease(w, t0, 4) {
		t.Fatal("a witness released")
	}
	// Every field Decide fences on also closes the gate.
	for name, mut := range map[string]func(*View){
		"follower": func(v *View) { v.Leader = false },
		"term":     func(v *View) { v.Term++ },
		"transfer": func(v *View) { v.Transferring = true },
		"primary":  func(v *View) { v.State.Primary = "s" },
		"gen":      func(v *View) { v.State.Generation = 5 },
		"inactive": func(v *View) { v.Active = Activation{} },
	} {
		v := base
		mut(&v)
		if MayRelease(v, t0, 4) {
			t.Errorf("%s: gate open", name)
		}
		if v.Active.Generation != 0 && (len(Decide(v, t0)) == 0 || Decide(v, t0)[0].Kind != ActFence) {
			t.Errorf("%s: gate closed but Decide does not fence first", name)
		}
	}
}

// scenario drives Decide over a timeline for one node, applying the
// effects a Node would (activation, claims committed) so multi-step
// behaviour is checked with a fake clock.
type scenarioStep struct {
	at   time.Duration
	mut  func(*View)
	want string
}

func runScenario(t *testing.T, v View, steps []scenarioStep) {
	t.Helper()
	for i, s := range steps {
		if s.mut != nil {
			s.mut(&v)
		}
		now := t0.Add(s.at)
		acts := Decide(v, now)
		if got := render(acts); got != s.want {
			t.Fatalf("step %d at +%v:\n got  %q\n want %q", i, s.at, got, s.want)
		}
		for _, a := range acts {
			switch a.Kind {
			case ActFence:
				v.Active = Activation{}
			case ActActivate:
				v.Active = Activation{a.Generation, v.Term}
			case ActClaim:
				v.Pending.Claim = true
			case ActTransfer:
				v.Pending.Transfer = true
				v.LastTransfer = now
				v.TransferAttempts++
			case ActApplyEpoch:
				v.Pending.Epoch = true
				v.LastEpochApply = now
			case ActAnnouncePeer:
				v.AnnouncedPeer = a.Target
			}
		}
	}
}

func TestScenarioSecondaryTakesOver(t *testing.T) {
	st := FSMState{ClusterID: "c", Generation: 3, Primary: "p", Protected: true, Epoch: 40, Members: members()}
	v := View{Self: infoS, Term: 5, State: st, Runnable: true, RunnableEpoch: 41, RunnableGen: 3, AnnouncedPeer: infoS, Tuning: tuning}
	runScenario(t, v, []scenarioStep{
		{at: 0, want: ""},
		// The primary died; the secondary won the election in term 6 but
		// has no lease yet.
		{at: 300 * time.Millisecond, mut: func(v *View) { v.Leader, v.Term = true, 6 }, want: ""},
		{at: 302 * time.Millisecond, mut: func(v *View) { v.LeaseDeadline = t0.Add(400 * time.Millisecond) }, want: "claim gen=4"},
		{at: 303 * time.Millisecond, want: ""},
		{at: 305 * time.Millisecond, mut: func(v *View) {
			v.Pending.Claim = false
			v.Claimed, v.ClaimedTerm = 4, 6
			v.State.Generation, v.State.Primary, v.State.Protected = 4, "s", false
		}, want: "announce-peer to=p; activate gen=4 epoch=40"},
		{at: 310 * time.Millisecond, want: ""},
		// Epochs resume and get reported, rate limited.
		{at: 320 * time.Millisecond, mut: func(v *View) { v.ReportedEpoch = 45 }, want: "apply-epoch gen=4 epoch=45"},
		{at: 330 * time.Millisecond, mut: func(v *View) { v.Pending.Epoch = false; v.State.Epoch = 45; v.ReportedEpoch = 46 }, want: ""},
		{at: 390 * time.Millisecond, mut: func(v *View) { v.LeaseDeadline = t0.Add(500 * time.Millisecond) }, want: ""},
		{at: 420 * time.Millisecond, want: "apply-epoch gen=4 epoch=46"},
		// Partitioned: no lease renewal. At the deadline, fence.
		{at: 499 * time.Millisecond, want: ""},
		{at: 500 * time.Millisecond, want: "fence gen=4 (leader lease expired: no majority contact)"},
		{at: 600 * time.Millisecond, mut: func(v *View) { v.Leader = false }, want: ""},
	})
}

func TestScenarioWitnessNeverRuns(t *testing.T) {
	st := FSMState{Generation: 3, Primary: "p", Protected: true, Epoch: 40, Members: members()}
	v := View{Self: infoW, Term: 5, State: st, Runnable: true, RunnableEpoch: 1000, AnnouncedPeer: infoS, Tuning: tuning}
	runScenario(t, v, []scenarioStep{
		{at: 0, mut: func(v *View) { v.Leader, v.Term, v.LeaseDeadline = true, 6, t0.Add(time.Second) }, want: "transfer to=s (leader cannot run the guest)"},
		{at: 50 * time.Millisecond, want: ""},
		// The transfer to the secondary failed; next try goes to p.
		{at: 150 * time.Millisecond, mut: func(v *View) { v.Pending.Transfer = false }, want: "transfer to=p (leader cannot run the guest)"},
	})
	for _, at := range []time.Duration{0, time.Second} {
		v.Leader = true
		v.Active = Activation{}
		for _, a := range Decide(v, t0.Add(at)) {
			if a.Kind == ActClaim || a.Kind == ActActivate {
				t.Fatalf("witness asked to %v", a)
			}
		}
	}
}

// leaderAfterDouble is self as raft leader with a fresh lease after the
// double failure: generation 7 (primary p, protected), committed epoch
// 27353, holding its own guest of generation 7 at epoch 27360 unless mut
// says otherwise.
func leaderAfterDouble(self NodeInfo, mut func(*View)) View {
	v := View{Self: self, Leader: true, Term: 12, LeaseDeadline: t0.Add(time.Millisecond),
		State:    FSMState{Generation: 7, Primary: "p", Protected: true, Epoch: 27353, Members: members()},
		Runnable: true, RunnableGen: 7, RunnableEpoch: 27360, RunnableLive: true, Tuning: tuning}
	if mut != nil {
		mut(&v)
	}
	v.AnnouncedPeer, _ = v.State.Secondary() // already announced
	return v
}

func TestEligible(t *testing.T) {
	prot := FSMState{Generation: 2, Primary: "p", Protected: true, Epoch: 10, Members: members()}
	unprot := FSMState{Generation: 2, Primary: "p", Epoch: 10, Members: members()}
	for _, c := range []struct {
		name     string
		self     NodeInfo
		st       FSMState
		runnable bool
		gen      uint64
		epoch    uint64
		live     bool
		want     bool
	}{
		{"fresh cluster: the primary's booted guest", infoP, FSMState{}, true, 0, 0, true, true},
		{"fresh cluster: not the secondary", infoS, FSMState{}, true, 0, 0, false, false},
		{"never a witness", infoW, prot, true, 2, 99, false, false},
		{"primary's kept guest", infoP, prot, true, 2, 10, true, true},
		{"primary's kept guest, unprotected", infoP, unprot, true, 2, 12, true, true},
		{"primary's kept guest behind the committed epoch", infoP, prot, true, 2, 9, true, false},
		{"primary without an image", infoP, prot, false, 0, 0, false, false},
		{"primary with a stale stored image", infoP, prot, true, 1, 833, false, false},
		{"primary with a stored image of a generation-0 stream", infoP, prot, true, 0, 0, false, false},
		{"secondary's image of the generation at the epoch", infoS, prot, true, 2, 10, false, true},
		{"secondary's image behind the epoch", infoS, prot, true, 2, 9, false, false},
		{"secondary's image of an older generation", infoS, prot, true, 1, 50, false, false},
		{"secondary's image of a newer generation", infoS, prot, true, 3, 50, false, false},
		{"secondary of an unprotected cluster", infoS, unprot, true, 2, 10, false, false},
	} {
		v := View{Self: c.self, State: c.st, Runnable: c.runnable, RunnableGen: c.gen, RunnableEpoch: c.epoch, RunnableLive: c.live}
		if got := Eligible(v); got != c.want {
			t.Errorf("%s: Eligible(%s, gen %d protected %v, image gen %d epoch %d live %v) = %v (%s)",
				c.name, c.self.ID, c.st.Generation, c.st.Protected, c.gen, c.epoch, c.live, got, IneligibleReason(v))
		}
	}
}

func TestIneligibleReason(t *testing.T) {
	st := FSMState{Generation: 7, Primary: "p", Protected: true, Epoch: 27353, Members: members()}
	for _, c := range []struct {
		name string
		v    View
		want string
	}{
		{"eligible", View{Self: infoP, State: st, Runnable: true, RunnableGen: 7, RunnableEpoch: 27360, RunnableLive: true}, ""},
		{"stale stored image", View{Self: infoP, State: st, Runnable: true, RunnableGen: 2, RunnableEpoch: 833},
			"its replica image is of generation 2 (epoch 833), the cluster is at generation 7 (committed epoch 27353)"},
		{"behind", View{Self: infoS, State: st, Runnable: true, RunnableGen: 7, RunnableEpoch: 27000},
			"its replica image is at epoch 27000, behind the committed epoch 27353 (generation 7)"},
		{"no image", View{Self: infoP, State: st}, "it holds no image of the guest"},
		{"unprotected", View{Self: infoS, State: FSMState{Generation: 7, Primary: "p", Epoch: 27353}, Runnable: true, RunnableGen: 7, RunnableEpoch: 27353},
			"the cluster is unprotected at generation 7: only its primary p holds every released output"},
		{"witness", View{Self: infoW, State: st}, "a witness never runs the guest"},
	} {
		if got := IneligibleReason(c.v); got != c.want {
			t.Errorf("%s:\n got  %q\n want %q", c.name, got, c.want)
		}
	}
	if got, want := Needed(st), "primary p with its own guest of generation 7, or secondary s with its image of generation 7 at epoch >= 27353"; got != want {
		t.Errorf("Needed(protected):\n got  %q\n want %q", got, want)
	}
	st.Protected = false
	if got, want := Needed(st), "primary p with its own guest of generation 7 (unprotected: only it holds every released output)"; got != want {
		t.Errorf("Needed(unprotected):\n got  %q\n want %q", got, want)
	}
}
