// Package netframe is the guest side of Tandem's network path, as pure
// functions over byte slices: Ethernet II, ARP for IPv4, IPv4 without
// options or fragments, and UDP, parsed with every length and checksum
// checked, and built for the replies a guest sends. An Endpoint is the
// tiny stack a guest runs on top: it answers ARP for its own address,
// hands UDP datagrams for its own address and port to the caller, builds
// the reply frames, and counts every frame it drops by reason.
//
// It owns no I/O, no clock and no goroutine: a guest's NIC (its rings and
// doorbell) feeds frames in and takes frames out, and the host's TAP
// device and output gate are elsewhere (internal/tap, failover). The
// micro-guest's freestanding C stack follows the same rules; this package
// is its reference and the host's oracle in tests.
//
// It must never panic or allocate without bound on a frame from the
// network: every field read from a frame is checked against the frame's
// own length before it is used.
package netframe
