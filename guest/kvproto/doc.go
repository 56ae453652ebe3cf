// Package kvproto parses and formats the kv workload's line protocol
// (docs/OPERATIONS.md, "The kv protocol"): requests of the form
// "<client>:<seq> SET|GET|DEL ..." and their replies. Guest backends use it
// to serve the protocol; clients and tests use it to build requests and
// read replies.
//
// It owns syntax only: no table, no record of replies. It must never
// allocate without bound on hostile input (lines are bounded by MaxLine)
// and never panic on any input.
package kvproto
