package etcdcoord

import (
	"encoding/json"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/tandemvm/tandem/failover"
)

// The keys of a cluster, under /tandem/<cluster>/:
//
//	cluster          {"v":1,"identity":..,"name":..}   created once, never changed
//	state            {"v":1,"gen":..,"primary":..,"protected":..,"epoch":..}
//	leader           the leading node's ID, attached to its lease
//	members/<id>     {"v":1,"node":{..},"identity":..,"image":{..}}
//
// state changes only in a transaction that compares its mod revision with
// the one the writer read and the leader key's create revision with the
// writer's own: only the lease holder writes, and never over a record it
// has not seen.
type keys struct{ prefix string }

func newKeys(cluster string) keys { return keys{prefix: "/tandem/" + cluster + "/"} }

func (k keys) cluster() string            { return k.prefix + "cluster" }
func (k keys) state() string              { return k.prefix + "state" }
func (k keys) leader() string             { return k.prefix + "leader" }
func (k keys) members() string            { return k.prefix + "members/" }
func (k keys) member(id string) string    { return k.members() + id }
func (k keys) memberID(key string) string { return strings.TrimPrefix(key, k.members()) }

// recordVersion is the format of every record; a reader refuses others.
const recordVersion = 1

// maxRecord bounds a value read from etcd: records are a few hundred
// bytes, so anything near this is not one of ours.
const maxRecord = 64 << 10

// maxMembers is the nodes a protected guest has: its primary and its
// secondary.
const maxMembers = 2

// maxMessage bounds a message from etcd (clientv3's own bound is 2 GiB,
// read into memory before any check here). A Tandem prefix holds four
// kinds of records of a few hundred bytes; a read or watch answer larger
// than this is refused by gRPC, and the read retried (and logged), as
// for an unreachable etcd.
const maxMessage = 1 << 20

// clusterRecord is the owner of the prefix.
type clusterRecord struct {
	V        int    `json:"v"`
	Identity string `json:"identity"`
	Name     string `json:"name"`
}

// stateRecord is the cluster's record, the FSMState of the raft trio.
type stateRecord struct {
	V         int    `json:"v"`
	Gen       uint64 `json:"gen"`
	Primary   string `json:"primary"`
	Protected bool   `json:"protected"`
	Epoch     uint64 `json:"epoch"`
}

// imageRecord is a node's claim: the image it could resume.
type imageRecord struct {
	Has   bool   `json:"has"`
	Gen   uint64 `json:"gen"`
	Epoch uint64 `json:"epoch"`
	Live  bool   `json:"live"`
}

// nodeRecord is a member's registered info.
type nodeRecord struct {
	ID          string `json:"id"`
	Role        string `json:"role"`
	DataAddr    string `json:"data"`
	APIAddr     string `json:"api"`
	ConsoleAddr string `json:"console"`
}

// memberRecord is members/<id>.
type memberRecord struct {
	V        int         `json:"v"`
	Node     nodeRecord  `json:"node"`
	Identity string      `json:"identity"` // the node's data directory's (see Config.IdentityFile)
	Image    imageRecord `json:"image"`
	rev      int64       // mod revision (not stored)
}

// check refuses a member's info this node would act on wrongly: a role
// other than primary or secondary, or a data address that is not
// HOST:PORT (the primary dials it).
func (n nodeRecord) check(key string) error {
	if n.Role != string(failover.RolePrimary) && n.Role != string(failover.RoleSecondary) {
		return fmt.Errorf("%s: role %q, want primary or secondary", key, n.Role)
	}
	host, port, err := net.SplitHostPort(n.DataAddr)
	if err != nil || host == "" || len(n.DataAddr) > 255 {
		return fmt.Errorf("%s: data address %q, want HOST:PORT", key, n.DataAddr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%s: data address %q: port out of 1-65535", key, n.DataAddr)
	}
	return nil
}

func (n nodeRecord) info() failover.NodeInfo {
	return failover.NodeInfo{ID: n.ID, Role: failover.Role(n.Role), DataAddr: n.DataAddr, APIAddr: n.APIAddr, ConsoleAddr: n.ConsoleAddr}
}

func nodeOf(i failover.NodeInfo) nodeRecord {
	return nodeRecord{ID: i.ID, Role: string(i.Role), DataAddr: i.DataAddr, APIAddr: i.APIAddr, ConsoleAddr: i.ConsoleAddr}
}

func imageOf(img *failover.Image) imageRecord {
	if img == nil {
		return imageRecord{}
	}
	return imageRecord{Has: true, Gen: img.Generation, Epoch: img.Epoch, Live: img.Live}
}

// decode reads a record, bounded and versioned.
func decode(key string, b []byte, v any) error {
	if len(b) > maxRecord {
		return fmt.Errorf("%s: %d bytes, more than a record's %d", key, len(b), maxRecord)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", key, err)
	}
	var hdr struct {
		V int `json:"v"`
	}
	_ = json.Unmarshal(b, &hdr) // it parsed above
	if hdr.V != recordVersion {
		return fmt.Errorf("%s: record version %d, want %d", key, hdr.V, recordVersion)
	}
	return nil
}

func encode(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // plain structs of strings, numbers and bools
	}
	return string(b)
}

// snapshot is what this node knows of the prefix at revision rev. It is
// immutable once published.
type snapshot struct {
	rev      int64
	cluster  *clusterRecord
	state    stateRecord
	stateRev int64 // mod revision of state (0: absent)
	// leader holds the leader key (""), with lease leaderLease, created
	// at leaderRev (the term).
	leader      string
	leaderRev   int64
	leaderLease int64
	members     map[string]memberRecord
	// bad holds the records etcd holds but this node cannot read, by
	// key: the error. A later readable version or a delete clears one.
	bad map[string]string
}

// with is s with the key-values kvs applied (puts) and the keys of dels
// removed, at revision rev. A change older than what s holds of a key (a
// watch event trailing this node's own write) is skipped.
func (s *snapshot) with(k keys, rev int64, kvs []*mvccpb.KeyValue, dels []*mvccpb.KeyValue) *snapshot {
	n := *s
	n.rev = rev
	n.members = make(map[string]memberRecord, len(s.members))
	for id, m := range s.members {
		n.members[id] = m
	}
	n.bad = make(map[string]string, len(s.bad))
	for key, err := range s.bad {
		n.bad[key] = err
	}
	for _, del := range dels {
		key := string(del.Key)
		delete(n.bad, key)
		switch {
		case key == k.state() && del.ModRevision > n.stateRev:
			n.state, n.stateRev = stateRecord{}, 0
		case key == k.leader() && del.ModRevision > n.leaderRev:
			n.leader, n.leaderRev, n.leaderLease = "", 0, 0
		case key == k.cluster():
			n.cluster = nil
		case strings.HasPrefix(key, k.members()):
			delete(n.members, k.memberID(key))
		}
	}
	for _, kv := range kvs {
		n.put(k, kv)
	}
	return &n
}

// put applies one key-value. An unreadable record is kept out and named
// in bad. An unreadable state record empties the state (generation 0,
// no primary): a primary then fences, since the record no longer names
// it; and the node neither claims nor campaigns while the state is
// unreadable (stateUnreadable), which keeps generation 0 from reading as
// a fresh cluster.
func (n *snapshot) put(k keys, kv *mvccpb.KeyValue) {
	key := string(kv.Key)
	var err error
	switch {
	case key == k.state() && kv.ModRevision < n.stateRev, key == k.leader() && kv.CreateRevision < n.leaderRev:
		return // older than what this node already holds
	case key == k.state():
		var st stateRecord
		if err = decode(key, kv.Value, &st); err != nil {
			st = stateRecord{}
		}
		n.state, n.stateRev = st, kv.ModRevision
	case key == k.leader():
		if len(kv.Value) > maxRecord || !validCluster.Match(kv.Value) {
			err = fmt.Errorf("%s: not a node ID", key)
			break
		}
		n.leader, n.leaderRev, n.leaderLease = string(kv.Value), kv.CreateRevision, kv.Lease
	case key == k.cluster():
		var c clusterRecord
		if err = decode(key, kv.Value, &c); err == nil {
			n.cluster = &c
		}
	case strings.HasPrefix(key, k.members()):
		var m memberRecord
		if err = decode(key, kv.Value, &m); err == nil && m.Node.ID != k.memberID(key) {
			err = fmt.Errorf("%s: names node %q", key, m.Node.ID)
		}
		if err == nil {
			err = m.Node.check(key)
		}
		if _, known := n.members[m.Node.ID]; err == nil && !known && len(n.members) >= maxMembers {
			// Open refuses a third node; a record written around it is
			// kept out, so the members (and what reads them) stay bounded.
			err = fmt.Errorf("%s: a third node's record (a guest has %d)", key, maxMembers)
		}
		if err != nil {
			delete(n.members, k.memberID(key)) // what etcd holds is not the version kept
			break
		}
		m.rev = kv.ModRevision
		n.members[m.Node.ID] = m
	}
	if n.bad == nil {
		n.bad = map[string]string{}
	}
	if err != nil {
		n.bad[key] = err.Error()
	} else {
		delete(n.bad, key)
	}
}

// stateUnreadable is why the state record cannot be read ("" if it
// can).
func (s *snapshot) stateUnreadable(k keys) string { return s.bad[k.state()] }

// unreadable names every record this node cannot read, sorted ("" if
// none).
func (s *snapshot) unreadable() string {
	var out []string
	for _, err := range s.bad {
		out = append(out, err)
	}
	sort.Strings(out)
	return strings.Join(out, "; ")
}

// fsmState is the record as failover.Decide reads it.
func (s *snapshot) fsmState() failover.FSMState {
	st := failover.FSMState{Generation: s.state.Gen, Primary: s.state.Primary, Protected: s.state.Protected, Epoch: s.state.Epoch}
	if s.cluster != nil {
		st.ClusterID = s.cluster.Identity
	}
	for _, m := range s.members {
		st.Members = append(st.Members, m.Node.info())
	}
	sort.Slice(st.Members, func(i, j int) bool { return st.Members[i].ID < st.Members[j].ID })
	return st
}
