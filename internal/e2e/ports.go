package e2e

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
)

// handedOut is every address FreeAddr returned in this process: the
// kernel may hand a just-closed port out again, and two addresses of one
// cluster must never be the same (a secondary once got its raft port as
// its API port). The set only grows; a process uses a few hundred.
var (
	handedOutMu sync.Mutex
	handedOut   = map[string]bool{}
)

// FreeAddr returns a loopback address nobody listened on a moment ago and
// that no earlier call returned. Another process may still take it in
// between: whoever starts a node on it retries when PortClash says so.
func FreeAddr() (string, error) {
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
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
	return "", errors.New("free port: 100 tries gave only addresses already handed out")
}

// PortClash says whether a node's log shows it lost a port race: the
// address was free when FreeAddr looked and taken when the node listened.
// Start again on fresh addresses.
func PortClash(log string) bool {
	return strings.Contains(log, "address already in use")
}
