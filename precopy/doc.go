// Package precopy owns the dirty Bitmap and the iterative copy core shared by
// live migration and by every fault-tolerance epoch: dirty sync (OR plus a
// count of newly dirty pages), the copy rounds, and the figures and rules
// that decide when to stop and copy.
//
// The Bitmap (bitmap.go) has one bit per 4 KiB guest page, indexed by uint64
// everywhere, so guests far beyond 2^32 pages work. It is two-level and
// lazily allocated: a summary bit per word and a top bit per chunk let sync,
// iteration and clearing cost time in proportion to the dirty words, not to
// the guest's size.
//
// What this package must never do: I/O in its decision logic. Convergence,
// downtime prediction and throttling decisions are plain functions of
// observed figures and an injected clock (internal/clock), so they can be tested without
// sockets or guests. The Bitmap itself never blocks, allocates only when a
// chunk is first dirtied, and never panics on an out-of-range page index.
package precopy
