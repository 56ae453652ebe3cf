package kvm

import "github.com/tandemvm/tandem/internal/uffd"

// SetPostcopy turns the post-copy access path on or off. A vCPU that
// touches a missing page (registered with userfaultfd on a post-copy
// destination) waits inside KVM_RUN, where the Go runtime is not held up;
// but the VMM's own reads and writes of guest memory (the console and
// disk buffers, the statistics page) run in Go code, and a plain load
// that faults there can hold its P and stall a collection, and with it
// the goroutine that fetches the page. On, those accesses fault their
// pages in through a system call first (uffd.Populate). Turn it on before
// resuming a guest whose pages may be missing, off once all arrived.
func (g *Guest) SetPostcopy(on bool) { g.postcopy.Store(on) }

// faultIn makes b's pages present before the VMM touches them, while
// post-copy is on. An error leaves the access to fault by itself.
func (g *Guest) faultIn(b []byte) {
	if g.postcopy.Load() {
		_ = uffd.Populate(b)
	}
}

// VCPUOfThread returns the vCPU whose OS thread is tid, or -1: a
// userfaultfd fault names the thread, and each vCPU runs on one locked
// thread for its life.
func (g *Guest) VCPUOfThread(tid uint32) int {
	for i, v := range g.vcpus {
		if t := v.tid.Load(); t != 0 && uint32(t) == tid {
			return i
		}
	}
	return -1
}

// arrived reports whether [gpa, gpa+n) can be read without waiting: post-copy
// is off, or its pages are mapped (uffd.Resident, which touches nothing).
// On a post-copy destination whose source is gone, a missing page never
// comes: code holding a lock asks here first instead of faulting in
// (the card's status counters, under its mutex).
func (g *Guest) arrived(gpa, n uint64) bool {
	if !g.postcopy.Load() {
		return true
	}
	b, ok := g.memAt(gpa, n)
	if !ok {
		return true // no such memory: the caller's own lookup says so
	}
	in, err := uffd.Resident(b)
	return err == nil && in
}

// faultInGPA faults [gpa, gpa+n) in while post-copy is on. Callers call it
// before taking a lock that status needs, so a wait for a missing page
// (unbounded while the source is away) holds no one else up.
func (g *Guest) faultInGPA(gpa, n uint64) {
	if b, ok := g.memAt(gpa, n); ok {
		g.faultIn(b)
	}
}
