// Package etcdcoord is the etcd Coordinator of a protected guest (issue
// 15): a primary and a secondary that keep their record in an etcd
// cluster shared by a fleet, under /tandem/<cluster>/, instead of in a
// raft trio of their own. It makes the same decisions as the trio by
// calling failover.Decide on a failover.View built from etcd:
//
//   - leadership is a key (leader) held with this node's etcd lease; its
//     create revision is the "term";
//   - the lease deadline is measured here, from the start of the last
//     keepalive etcd answered, minus a margin, so CanRelease does no I/O
//     and turns false before etcd can expire the lease;
//   - the record (generation, primary, protected, committed epoch) is one
//     key (state) changed only by transactions that compare its mod
//     revision and the leader key's create revision: a promotion is a
//     compare-and-set, and a node that lost its lease can change nothing.
//
// It never runs the guest and never dials the data port: ft.Member does,
// as for the raft trio. Every etcd call has a deadline (Config.CallTimeout).
//
// Lock order: writeMu (this node's writes of the record, one at a time)
// before mu; mu is never held across an etcd call: the decision step
// takes it, starts workers for the calls, and returns.
package etcdcoord
