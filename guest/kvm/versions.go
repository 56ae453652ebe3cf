package kvm

import "github.com/tandemvm/tandem/guest"

// The sections this backend loads, for receivers to check a stream's
// sections against (as guest/synth registers its own).
func init() { guest.RegisterStateVersions(Kind, StateVersions) }

// StateVersions lists every device this backend saves with its current
// schema version (for `tandem schema dump`).
func StateVersions() map[string]uint32 {
	return map[string]uint32{
		stateMachine: machineVersion,
		stateVCPU:    vcpuVersion,
		stateClock:   clockVersion,
		stateUART:    uartVersion,
		stateDisk:    diskVersion,
	}
}

// OptionalDevices are the sections a guest saves only with a feature:
// the paravirtual disk's queue with --disk. (The network card keeps no
// section: its rings live in guest memory and its host side is rebuilt
// on load.)
func OptionalDevices() []string { return []string{stateDisk} }

// StateSections is the sections this guest's saved state carries, with
// versions (guest.StateSectioner, listed in a sender's handshake): every
// device but the disk when the guest has none, as saveState writes them.
func (g *Guest) StateSections() map[string]uint32 {
	s := StateVersions()
	if g.disk == nil {
		delete(s, stateDisk)
	}
	return s
}
