package e2e

import (
	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/guest/synth"
)

// DefaultGuest is the guest a harness runs by default: kvm when /dev/kvm
// works and the micro-guest image is built, the software guest otherwise.
func DefaultGuest() string {
	if kvm.Available() != nil {
		return synth.Kind
	}
	if _, err := kvm.DefaultImage(); err != nil {
		return synth.Kind
	}
	return kvm.Kind
}
