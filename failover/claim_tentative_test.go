package failover

import "testing"

// A claim whose outcome raft could not tell (leadership lost while
// committing) counts for this node's image only once the FSM shows this
// node holding the claimed generation; another holder, or a newer
// generation, drops it. Found by a double-failure drill under load: the
// entry committed after the error, the cluster stood at a generation no
// image covered, and nobody could serve.
func TestTentativeClaim(t *testing.T) {
	mk := func() *Node {
		n := &Node{image: &Image{Generation: 1, Epoch: 40, Live: true}, claims: ImageClaims{tentFrom: 1, tentTo: 2}}
		n.cfg.ID = "a"
		return n
	}
	for _, c := range []struct {
		name      string
		state     FSMState
		wantGen   uint64
		wantClaim uint64 // claimTo after the view
		wantTent  uint64 // tentTo after the view
	}{
		{"not committed (yet)", FSMState{Generation: 1, Primary: "a"}, 1, 0, 2},
		{"committed: ours", FSMState{Generation: 2, Primary: "a"}, 2, 2, 0},
		{"another node holds it", FSMState{Generation: 2, Primary: "b"}, 1, 0, 0},
		{"the cluster moved past it", FSMState{Generation: 3, Primary: "b"}, 1, 0, 0},
	} {
		n := mk()
		v := n.viewLocked(View{State: c.state})
		if v.RunnableGen != c.wantGen || n.claims.to != c.wantClaim || n.claims.tentTo != c.wantTent {
			t.Errorf("%s: runnable gen %d, claimTo %d, tentTo %d; want %d, %d, %d", c.name, v.RunnableGen, n.claims.to, n.claims.tentTo, c.wantGen, c.wantClaim, c.wantTent)
		}
	}
	// An image that changed since the claim is not the one it covered.
	n := mk()
	n.image = &Image{Generation: 0, Epoch: 10}
	if v := n.viewLocked(View{State: FSMState{Generation: 2, Primary: "a"}}); v.RunnableGen != 0 || n.claims.to != 0 {
		t.Errorf("another image: runnable gen %d, claimTo %d", v.RunnableGen, n.claims.to)
	}
}
