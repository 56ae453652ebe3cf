package failover

import (
	"slices"
	"sort"
)

// Role is the part a node is configured to play. It is a hint for the
// first start and for choosing leadership-transfer targets; who actually runs
// the guest is decided by raft leadership and the replicated generation.
type Role string

// The three roles of a Tandem trio.
const (
	RolePrimary   Role = "primary"
	RoleSecondary Role = "secondary"
	RoleWitness   Role = "witness"
)

// Valid reports whether r is one of the three roles.
func (r Role) Valid() bool {
	return r == RolePrimary || r == RoleSecondary || r == RoleWitness
}

// NodeInfo is one member's replicated identity and addresses. A primary finds
// its secondary's data address here, not on its command line.
type NodeInfo struct {
	ID          string `codec:"id"`
	Role        Role   `codec:"role"`
	RaftAddr    string `codec:"raft"`
	DataAddr    string `codec:"data"`
	APIAddr     string `codec:"api"`
	ConsoleAddr string `codec:"console"`
}

// FSMState is the replicated state of the trio. Values returned by Node are
// copies; mutating them changes nothing.
type FSMState struct {
	// ClusterID is set by the first registration and never changes; a node
	// configured for another cluster is refused.
	ClusterID string `codec:"cluster"`
	// Generation is the fencing token: it grows by one with every promotion
	// (a change of primary, or the same primary winning a new raft term).
	// Zero means no primary has ever been chosen.
	Generation uint64 `codec:"gen"`
	// Primary is the ID of the node that holds Generation; "" before the first
	// promotion.
	Primary string `codec:"primary"`
	// Protected is true while the primary replicates every epoch to the
	// secondary and only releases acknowledged output. Only a protected
	// secondary may take over.
	Protected bool `codec:"protected"`
	// Epoch is the last epoch the primary reported as acknowledged by the
	// secondary. It never decreases.
	Epoch uint64 `codec:"epoch"`
	// Members is sorted by ID.
	Members []NodeInfo `codec:"members"`
}

// Clone returns a deep copy.
func (s FSMState) Clone() FSMState {
	s.Members = slices.Clone(s.Members)
	return s
}

// Member returns the registered info of id.
func (s FSMState) Member(id string) (NodeInfo, bool) {
	for _, m := range s.Members {
		if m.ID == id {
			return m, true
		}
	}
	return NodeInfo{}, false
}

// Secondary returns the member that would take over from the primary: the
// registered non-witness that is not the primary. Before the first promotion
// it is the member registered with role secondary.
func (s FSMState) Secondary() (NodeInfo, bool) {
	for _, m := range s.Members {
		if m.Role == RoleWitness || m.ID == s.Primary {
			continue
		}
		if s.Primary == "" && m.Role != RoleSecondary {
			continue
		}
		return m, true
	}
	return NodeInfo{}, false
}

// upsert replaces or inserts info, keeping Members sorted.
func (s *FSMState) upsert(info NodeInfo) {
	for i := range s.Members {
		if s.Members[i].ID == info.ID {
			s.Members[i] = info
			return
		}
	}
	s.Members = append(s.Members, info)
	sort.Slice(s.Members, func(i, j int) bool { return s.Members[i].ID < s.Members[j].ID })
}
