// Package linkproxy is a TCP proxy that shapes the link between two Tandem
// processes in end-to-end tests: a bandwidth limit per direction shared by
// all connections, an added one-way latency that keeps the throughput (a
// timestamped queue, not a sleep per write), abrupt cuts, and partitions
// that black-hole traffic so peers see timeouts rather than resets.
//
// It owns every goroutine it starts: Close stops them all and returns only
// when they are gone, and every wait inside the proxy ends on the proxy's
// or the connection's context, so nothing outlives Close.
//
// What it must never do: run in production paths (it is test
// infrastructure, imported only by tests), hold an unbounded amount of data
// (each direction queues at most queueChunks chunks), or block a caller of
// Cut, Partition, SetShape or Addr on network I/O.
package linkproxy
