package kvm

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
