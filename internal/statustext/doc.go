// Package statustext renders a node's GET /status for a terminal,
// cluster first (like pcs status): a table of every member, the quorum
// and what one more failure would do, then this node's own figures.
//
// It only formats what it is given; it must never fetch anything nor
// decide anything about the cluster (the node computed the quorum and
// the sentence).
package statustext
