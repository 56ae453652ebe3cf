package postcopy

import (
	"testing"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvm"
)

// The KVM guest's memory slots take userfaultfd as they are: a vCPU that
// touches a missing page waits inside KVM_RUN (a fault taken in the
// kernel, which the descriptor gets because it is not user-mode-only),
// the VMM's own accesses (the console buffers) go through
// SetPostcopy's path, and the kv replies match an unmigrated guest's.
func TestPostcopyKVMKVMatchesUnmigrated(t *testing.T) {
	if err := kvm.Available(); err != nil {
		t.Skipf("no usable KVM: %v", err)
	}
	if _, err := kvm.DefaultImage(); err != nil {
		t.Skipf("no micro-guest image (make guest-image): %v", err)
	}
	testKVMatchesUnmigrated(t, kvmKind, 1)
}

var kvmKind = kind{
	name:        "kvm",
	new:         func(c guest.Config) (guest.Guest, error) { return kvm.New(c) },
	setPostcopy: func(g guest.Guest, on bool) { g.(*kvm.Guest).SetPostcopy(on) },
	vcpuOf:      func(g guest.Guest) func(uint32) int { return g.(*kvm.Guest).VCPUOfThread },
}
