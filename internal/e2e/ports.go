package e2e

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
)

// handedOut is every address FreeAddr returned in this process: two
// addresses of one cluster must never be the same (a secondary once got
// its raft port as its API port). The set only grows; a process uses a
// few hundred.
var (
	handedOutMu sync.Mutex
	handedOut   = map[string]bool{}
)

// FreeAddr returns a loopback address nobody listened on a moment ago and
// that no earlier call returned.
//
// The port is drawn at random from below the kernel's ephemeral range
// (ip_local_port_range), where the kernel itself never puts anything: a
// port it hands to a "127.0.0.1:0" listener or to an outgoing connection
// (every test's client, every raft dial) is always inside that range, so
// between this check and the caller's listen only another process drawing
// the same port from the same range can take it (two test binaries of one
// `go test` run, say: one chance in thousands per pair of draws, against
// the near certainty, over a long run, of an ephemeral port being reused
// by the kernel). Whoever starts a node on it still retries when PortClash
// says so. Where that range cannot be read or leaves too little room below
// it, the kernel picks ("127.0.0.1:0") as before.
func FreeAddr() (string, error) {
	lo, hi := belowEphemeral()
	draw := hi > lo
	for range 100 {
		want := "127.0.0.1:0"
		if draw {
			want = fmt.Sprintf("127.0.0.1:%d", lo+rand.IntN(hi-lo))
		}
		ln, err := net.Listen("tcp", want)
		if err != nil {
			if draw {
				continue // taken: draw again
			}
			return "", fmt.Errorf("free port: %w", err)
		}
		addr := ln.Addr().String()
		ln.Close()
		handedOutMu.Lock()
		fresh := !handedOut[addr]
		handedOut[addr] = true
		handedOutMu.Unlock()
		if fresh {
			return addr, nil
		}
	}
	return "", errors.New("free port: 100 tries gave only addresses taken or already handed out")
}

// lowestPort is the bottom of the range FreeAddr draws from: above the
// registered services a test host may run (up to 10000 in practice).
const lowestPort = 10000

// belowEphemeral is [lowestPort, the ephemeral range's first port), or
// an empty range when that is under 1,000 ports or unknown.
func belowEphemeral() (lo, hi int) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0, 0
	}
	var first, last int
	if _, err := fmt.Sscan(string(b), &first, &last); err != nil || first-lowestPort < 1000 {
		return 0, 0
	}
	return lowestPort, first
}

// PortClash says whether a node's log shows it lost a port race: the
// address was free when FreeAddr looked and taken when the node listened.
// Start again on fresh addresses.
func PortClash(log string) bool {
	return strings.Contains(log, "address already in use")
}
