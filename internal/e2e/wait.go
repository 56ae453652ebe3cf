package e2e

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/tandemvm/tandem/api"
)

// Cluster is st's raft view (every trio node's, the witness's too); the
// zero view when st has none.
func Cluster(st api.Status) api.ClusterView {
	if st.Cluster != nil {
		return *st.Cluster
	}
	return api.ClusterView{}
}

// Epochs is a primary's epoch-loop figures; zero when st has none.
func Epochs(st api.Status) api.EpochStatus {
	if st.Epochs != nil {
		return *st.Epochs
	}
	return api.EpochStatus{}
}

// Waiting is why nobody serves the guest, as n's status says.
func Waiting(st api.Status) string {
	return Cluster(st).Waiting
}

// IsProtectedPrimary says whether st is id's: running primary, protected,
// the cluster naming it primary, protected and able to release output.
func IsProtectedPrimary(id string, st api.Status) bool {
	c := Cluster(st)
	return st.Role == "primary" && st.State == "running" && st.Protected() &&
		c.Protected && c.Primary == id && c.CanRelease
}

// ProtectedPrimary returns the node that is primary, running and
// protected with the cluster agreeing, and its status; ok is false while
// there is none.
func (t *Trio) ProtectedPrimary(ctx context.Context) (*Node, api.Status, bool) {
	for _, n := range t.nodes {
		if n.Role == "witness" || !n.Running() {
			continue
		}
		st, err := n.Status(ctx)
		if err == nil && IsProtectedPrimary(n.ID, st) {
			return n, st, true
		}
	}
	return nil, api.Status{}, false
}

// WaitProtected waits at most timeout until some node is a protected
// primary whose secondary (the other member) is running and says it is
// secondary. It gives up at once when a node exited or cannot boot.
func (t *Trio) WaitProtected(ctx context.Context, timeout time.Duration) (*Node, api.Status, error) {
	deadline := time.Now().Add(timeout)
	for {
		for _, n := range t.nodes {
			if !n.Running() {
				return nil, api.Status{}, fmt.Errorf("%s exited: %s", n.ID, LastLine(n.Tail(5)))
			}
			if strings.Contains(n.Tail(5), "cannot boot the guest") {
				return nil, api.Status{}, fmt.Errorf("%s: %s", n.ID, LastLine(n.Tail(5)))
			}
		}
		if p, st, ok := t.ProtectedPrimary(ctx); ok && t.hasSecondary(ctx, p) {
			return p, st, nil
		}
		if time.Now().After(deadline) {
			return nil, api.Status{}, fmt.Errorf("no protected primary within %v", timeout)
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return nil, api.Status{}, err
		}
	}
}

// hasSecondary says whether the member other than p runs and says it is
// secondary.
func (t *Trio) hasSecondary(ctx context.Context, p *Node) bool {
	for _, s := range t.nodes {
		if s == p || s.Role == "witness" || !s.Running() {
			continue
		}
		if st, err := s.Status(ctx); err == nil && st.Role == "secondary" {
			return true
		}
	}
	return false
}

// ServingPrimary returns the one node that serves the guest: it says it
// is the running primary, the cluster names it and it may release; count
// is how many running nodes say they are the running primary (p is nil
// unless that is 1).
func (t *Trio) ServingPrimary(ctx context.Context) (p *Node, st api.Status, count int) {
	for _, nd := range t.nodes {
		if nd.Role == "witness" || !nd.Running() {
			continue
		}
		s, err := nd.Status(ctx)
		if err != nil || s.Role != "primary" || s.State != "running" {
			continue
		}
		count++
		if c := Cluster(s); c.Primary == nd.ID && c.CanRelease {
			p, st = nd, s
		}
	}
	if count != 1 {
		return nil, api.Status{}, count
	}
	return p, st, count
}

// CurrentPrimary waits at most timeout for the running node the cluster
// names primary and that says it runs the guest.
func (t *Trio) CurrentPrimary(ctx context.Context, timeout time.Duration) (*Node, api.Status, error) {
	deadline := time.Now().Add(timeout)
	for {
		for _, n := range t.nodes {
			if n.Role == "witness" || !n.Running() {
				continue
			}
			if st, err := n.Status(ctx); err == nil && st.Role == "primary" && st.State == "running" && Cluster(st).Primary == n.ID {
				return n, st, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, api.Status{}, errors.New("no node says it is the running primary")
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return nil, api.Status{}, err
		}
	}
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
