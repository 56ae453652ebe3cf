package kvm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
)

// Device-state names and schema versions. A version only ever grows; a
// reader refuses versions it does not know.
const (
	stateMachine = "kvm-machine"
	stateVCPU    = "kvm-vcpu"
	stateClock   = "kvm-clock"
	stateUART    = "uart-8250"
	stateDisk    = "kvm-pvdisk"

	machineVersion = 1
	vcpuVersion    = 1
	clockVersion   = 1
	uartVersion    = 1
	diskVersion    = 1
)

const (
	msrTSC         = 0x10
	msrTSCAdjust   = 0x3b
	msrTSCDeadline = 0x6e0
)

// machineStateV1 ties the state to a shape of machine: a state is only
// loaded into a guest of the same memory size and vCPU count.
type machineStateV1 struct {
	Memory   uint64
	VCPUs    int
	Workload string
	TSCKHz   uint64
	Progress uint32
}

// vcpuStateV1 is one vCPU. XSAVE and Events are the kernel's opaque
// blocks; everything else is field by field.
type vcpuStateV1 struct {
	CPUID     []cpuidEntry
	MPState   uint32
	Regs      Regs
	Sregs     Sregs
	XSAVE     []byte
	XCRs      []XCR
	DebugRegs DebugRegs
	TSC       uint64
	MSRs      []MSR // without the TSC, which is restored on its own first
	Events    []byte
}

type clockStateV1 struct {
	Clock ClockData
}

var msgpackHandle = func() *codec.MsgpackHandle {
	h := &codec.MsgpackHandle{}
	h.WriteExt = true
	return h
}()

func encode(v any) ([]byte, error) {
	var b []byte
	if err := codec.NewEncoderBytes(&b, msgpackHandle).Encode(v); err != nil {
		return nil, err
	}
	return b, nil
}

func decode(b []byte, v any) error { return codec.NewDecoderBytes(b, msgpackHandle).Decode(v) }

// mtrrMSRs are not in KVM's index list but shape memory types (cloud-
// hypervisor PR #7944); they are saved when the vCPU accepts them.
var mtrrMSRs = func() []uint32 {
	l := []uint32{0xfe, 0x2ff, 0x250, 0x258, 0x259}
	for i := uint32(0x200); i < 0x210; i++ {
		l = append(l, i)
	}
	for i := uint32(0x268); i < 0x270; i++ {
		l = append(l, i)
	}
	return l
}()

// probeMSRs builds the list of MSRs to carry: KVM's index list plus the
// MTRRs, minus the TSC (restored on its own) and TSC_DEADLINE (no
// in-kernel LAPIC), keeping only those vCPU 0 can read and write back.
func (g *Guest) probeMSRs() error {
	var hdr [1]uint32
	_, err := ioctl(g.sysFd, kvmGetMSRIndexList, uintptr(unsafe.Pointer(&hdr[0])))
	if err != nil && !errors.Is(err, unix.E2BIG) {
		return fmt.Errorf("kvm: KVM_GET_MSR_INDEX_LIST: %w", err)
	}
	buf := make([]uint32, 1+hdr[0])
	buf[0] = hdr[0]
	if _, err := ioctl(g.sysFd, kvmGetMSRIndexList, uintptr(unsafe.Pointer(&buf[0]))); err != nil {
		return fmt.Errorf("kvm: KVM_GET_MSR_INDEX_LIST: %w", err)
	}
	runtime.KeepAlive(buf)
	cands := append(append([]uint32(nil), buf[1:1+buf[0]]...), mtrrMSRs...)
	seen := map[uint32]bool{}
	v := g.vcpus[0]
	for _, idx := range cands {
		if idx == msrTSC || idx == msrTSCDeadline || seen[idx] {
			continue
		}
		seen[idx] = true
		// Keep an MSR only if it can be written back too: some read fine
		// but refuse writes without an in-kernel LAPIC (async PF).
		m := []MSR{{Index: idx}}
		if n, err := msrIoctl(v.fd, kvmGetMSRs, m); err != nil || n != 1 {
			continue
		}
		if n, err := msrIoctl(v.fd, kvmSetMSRs, m); err == nil && n == 1 {
			g.msrIndices = append(g.msrIndices, idx)
		}
	}
	return nil
}

// msrIoctl runs GET_MSRS or SET_MSRS on ms and returns how many entries the
// kernel processed (it stops at the first failure).
func msrIoctl(fd int, req uintptr, ms []MSR) (int, error) {
	if len(ms) == 0 {
		return 0, nil
	}
	buf := make([]byte, 8+16*len(ms))
	binary.LittleEndian.PutUint32(buf, uint32(len(ms)))
	copy(buf[8:], unsafe.Slice((*byte)(unsafe.Pointer(&ms[0])), 16*len(ms)))
	n, err := ioctl(fd, req, uintptr(unsafe.Pointer(&buf[0])))
	runtime.KeepAlive(buf)
	if err != nil {
		return 0, err
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&ms[0])), 16*len(ms)), buf[8:])
	return int(n), nil
}

// SaveState implements guest.Guest. Order per vCPU follows Firecracker:
// MP state first (reading it may change other state), events last.
func (g *Guest) SaveState() (guest.MachineState, error) {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	return g.saveState()
}

func (g *Guest) saveState() (guest.MachineState, error) {
	ms := guest.MachineState{Kind: Kind}
	if g.closed {
		return ms, guest.ErrClosed
	}
	if !g.paused {
		return ms, guest.ErrNotPaused
	}
	add := func(name string, inst, ver uint32, v any) error {
		b, err := encode(v)
		if err != nil {
			return fmt.Errorf("kvm: encode %s %d: %w", name, inst, err)
		}
		ms.Devices = append(ms.Devices, guest.DeviceState{Name: name, Instance: inst, Version: ver, Fields: b})
		return nil
	}
	if err := add(stateMachine, 0, machineVersion, machineStateV1{Memory: g.cfg.Memory, VCPUs: g.cfg.VCPUs,
		Workload: g.cfg.Workload.Kind, TSCKHz: g.tscKHz, Progress: g.progress.Load()}); err != nil {
		return ms, err
	}
	for _, v := range g.vcpus {
		s, err := v.save()
		if err != nil {
			return ms, err
		}
		b, err := v.encodeState(&s)
		if err != nil {
			return ms, fmt.Errorf("kvm: encode %s %d: %w", stateVCPU, v.id, err)
		}
		ms.Devices = append(ms.Devices, guest.DeviceState{Name: stateVCPU, Instance: uint32(v.id), Version: vcpuVersion, Fields: b})
	}
	var c clockStateV1
	if _, err := ioctlPtr(g.vmFd, kvmGetClock, &c.Clock); err != nil {
		return ms, fmt.Errorf("kvm: KVM_GET_CLOCK: %w", err)
	}
	if err := add(stateClock, 0, clockVersion, c); err != nil {
		return ms, err
	}
	if err := add(stateUART, 0, uartVersion, g.uart.save()); err != nil {
		return ms, err
	}
	if g.disk != nil {
		if err := add(stateDisk, 0, diskVersion, g.disk.save()); err != nil {
			return ms, err
		}
	}
	return ms, nil
}

func (v *vcpu) save() (vcpuStateV1, error) {
	s := vcpuStateV1{CPUID: v.cpuid}
	fail := func(what string, err error) (vcpuStateV1, error) {
		return s, fmt.Errorf("kvm: save vCPU %d: %s: %w", v.id, what, err)
	}
	if _, err := ioctlPtr(v.fd, kvmGetMPState, &s.MPState); err != nil {
		return fail("KVM_GET_MP_STATE", err)
	}
	// Registers, special registers and events: as KVM stored them in
	// kvm_run at the exit the vCPU parked after (sync regs, see
	// vcpu.synced), or read one ioctl each. Without an in-kernel irqchip
	// reading the MP state changes none of them, so taking them at the
	// exit keeps Firecracker's order's reason.
	synced := v.synced.Load()
	if synced {
		s.Regs, s.Sregs = *v.syncedRegs(), *v.syncedSregs()
	} else {
		if _, err := ioctlPtr(v.fd, kvmGetRegs, &s.Regs); err != nil {
			return fail("KVM_GET_REGS", err)
		}
		if _, err := ioctlPtr(v.fd, kvmGetSregs, &s.Sregs); err != nil {
			return fail("KVM_GET_SREGS", err)
		}
	}
	s.XSAVE = make([]byte, v.g.xsaveSize)
	req := kvmGetXSAVE2
	if v.g.xsaveSize > 4096 {
		req = ioc(iocRead, 0xcf, uintptr(v.g.xsaveSize)&0x3fff)
	}
	if _, err := ioctl(v.fd, req, uintptr(unsafe.Pointer(&s.XSAVE[0]))); err != nil {
		if _, err := ioctl(v.fd, kvmGetXSAVE, uintptr(unsafe.Pointer(&s.XSAVE[0]))); err != nil {
			return fail("KVM_GET_XSAVE", err)
		}
	}
	var x xcrs
	if _, err := ioctlPtr(v.fd, kvmGetXCRs, &x); err != nil {
		return fail("KVM_GET_XCRS", err)
	}
	s.XCRs = append([]XCR(nil), x.XCRs[:min(int(x.NrXCRs), len(x.XCRs))]...)
	if _, err := ioctlPtr(v.fd, kvmGetDebugRegs, &s.DebugRegs); err != nil {
		return fail("KVM_GET_DEBUGREGS", err)
	}
	// The TSC and the other MSRs in one KVM_GET_MSRS: the TSC first, the
	// kernel reads the entries in order.
	ms := make([]MSR, 1+len(v.g.msrIndices))
	ms[0].Index = msrTSC
	for i, idx := range v.g.msrIndices {
		ms[1+i].Index = idx
	}
	if n, err := msrIoctl(v.fd, kvmGetMSRs, ms); err != nil || n != len(ms) {
		if n == 0 {
			return fail("KVM_GET_MSRS(TSC)", fmt.Errorf("read %d of 1: %v", n, err))
		}
		return fail("KVM_GET_MSRS", fmt.Errorf("read %d of %d: %v", n-1, len(ms)-1, err))
	}
	s.TSC, s.MSRs = ms[0].Data, ms[1:]
	if synced {
		ev := *v.syncedEvents()
		s.Events = ev[:]
	} else {
		var ev VCPUEvents
		if _, err := ioctlPtr(v.fd, kvmGetVCPUEvents, &ev); err != nil {
			return fail("KVM_GET_VCPU_EVENTS", err)
		}
		s.Events = ev[:]
	}
	return s, nil
}

// decodedState is a MachineState checked and decoded, ready to apply.
type decodedState struct {
	machine machineStateV1
	vcpus   []vcpuStateV1
	clock   *clockStateV1
	uart    *uartStateV1
	disk    *diskStateV1
}

func (g *Guest) decodeState(ms guest.MachineState) (*decodedState, error) {
	bad := func(f string, args ...any) error {
		return fmt.Errorf("%w: kvm: %s", guest.ErrState, fmt.Sprintf(f, args...))
	}
	if ms.Kind != Kind {
		return nil, bad("state of a %q guest, this is %q", ms.Kind, Kind)
	}
	d := &decodedState{vcpus: make([]vcpuStateV1, g.cfg.VCPUs)}
	seenVCPU := make([]bool, g.cfg.VCPUs)
	seenMachine := false
	for _, dev := range ms.Devices {
		var want uint32
		var dst any
		switch dev.Name {
		case stateMachine:
			want, dst, seenMachine = machineVersion, &d.machine, true
		case stateVCPU:
			if int(dev.Instance) >= g.cfg.VCPUs {
				return nil, bad("state for vCPU %d, the guest has %d", dev.Instance, g.cfg.VCPUs)
			}
			want, dst = vcpuVersion, &d.vcpus[dev.Instance]
			seenVCPU[dev.Instance] = true
		case stateClock:
			d.clock = &clockStateV1{}
			want, dst = clockVersion, d.clock
		case stateUART:
			d.uart = &uartStateV1{}
			want, dst = uartVersion, d.uart
		case stateDisk:
			if g.disk == nil {
				return nil, bad("disk state for a guest without a disk")
			}
			d.disk = &diskStateV1{}
			want, dst = diskVersion, d.disk
		default:
			return nil, bad("unknown device %q", dev.Name)
		}
		if dev.Version != want {
			return nil, bad("%s %d has schema version %d, this Tandem reads %d", dev.Name, dev.Instance, dev.Version, want)
		}
		if err := decode(dev.Fields, dst); err != nil {
			return nil, bad("decode %s %d: %v", dev.Name, dev.Instance, err)
		}
	}
	if !seenMachine {
		return nil, bad("no %s entry", stateMachine)
	}
	if d.machine.Memory != g.cfg.Memory || d.machine.VCPUs != g.cfg.VCPUs {
		return nil, bad("state of a %s guest with %d vCPUs, this guest has %s and %d", guest.FormatSize(d.machine.Memory),
			d.machine.VCPUs, guest.FormatSize(g.cfg.Memory), g.cfg.VCPUs)
	}
	for i, ok := range seenVCPU {
		if !ok {
			return nil, bad("no state for vCPU %d", i)
		}
		s := &d.vcpus[i]
		if len(s.Events) != 64 || len(s.XSAVE) < 4096 || len(s.XCRs) > 16 {
			return nil, bad("vCPU %d: malformed state (events %d bytes, xsave %d bytes, %d xcrs)", i, len(s.Events), len(s.XSAVE), len(s.XCRs))
		}
	}
	if d.uart == nil || d.clock == nil {
		return nil, bad("missing %s or %s", stateUART, stateClock)
	}
	if g.disk != nil && d.disk == nil {
		return nil, bad("no %s entry for a guest with a disk", stateDisk)
	}
	if err := g.checkNICMemory(); err != nil {
		return nil, err
	}
	return d, nil
}

// LoadState implements guest.Guest. The whole state is decoded and
// checked before anything is applied; if applying fails half way the
// state saved just before is put back.
func (g *Guest) LoadState(ms guest.MachineState) error {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return guest.ErrClosed
	}
	if !g.paused {
		return guest.ErrNotPaused
	}
	d, err := g.decodeState(ms)
	if err != nil {
		return err
	}
	before, saveErr := g.saveState()
	if err := g.applyState(d); err != nil {
		if saveErr == nil {
			if prev, derr := g.decodeState(before); derr == nil {
				_ = g.applyState(prev)
			}
		}
		return err
	}
	return nil
}

// applyState restores in this order (KVM-NOTES §2.5; each step's reason):
//  1. CPUID, because later SETs depend on it (only if it differs: KVM
//     refuses a new CPUID once a vCPU has run);
//  2. MP state, REGS (which clears pending exceptions), SREGS (EFER,
//     control registers), XSAVE, XCRS, DEBUGREGS;
//  3. MSRs: TSC_ADJUST, then the TSC, then the rest — there is no
//     in-kernel LAPIC, so no LAPIC and no TSC_DEADLINE ordering to keep;
//  4. vCPU events after REGS, KVMCLOCK_CTRL last per vCPU;
//  5. VM clock, then Tandem's devices.
//
// Every vCPU gets the largest TSC saved across vCPUs, so no vCPU's TSC
// goes back and KVM's TSC sync keeps them matched.
func (g *Guest) applyState(d *decodedState) error {
	var tsc uint64
	for _, s := range d.vcpus {
		tsc = max(tsc, s.TSC)
	}
	for i, v := range g.vcpus {
		if err := v.load(&d.vcpus[i], tsc); err != nil {
			return err
		}
	}
	if d.clock != nil {
		c := ClockData{Clock: d.clock.Clock.Clock}
		if _, err := ioctlPtr(g.vmFd, kvmSetClock, &c); err != nil {
			return fmt.Errorf("kvm: KVM_SET_CLOCK: %w", err)
		}
	}
	g.uart.load(*d.uart)
	if d.disk != nil {
		g.disk.load(*d.disk)
	}
	g.progress.Store(d.machine.Progress)
	if g.nic != nil {
		g.nic.dropQueued() // received for the guest this state replaces
	}
	return nil
}

func (v *vcpu) load(s *vcpuStateV1, tsc uint64) error {
	fail := func(what string, err error) error {
		return fmt.Errorf("kvm: restore vCPU %d: %s: %w", v.id, what, err)
	}
	// From here the registers in kvm_run are no longer the vCPU's.
	v.synced.Store(false)
	if !cpuidEqual(s.CPUID, v.cpuid) {
		if err := setCPUID(v.fd, s.CPUID); err != nil {
			return fail("KVM_SET_CPUID2 (the saved CPUID differs from this host's)", err)
		}
		v.cpuid = append([]cpuidEntry(nil), s.CPUID...)
		v.cpuidEnc = nil
	}
	if _, err := ioctlPtr(v.fd, kvmSetMPState, &s.MPState); err != nil {
		return fail("KVM_SET_MP_STATE", err)
	}
	if _, err := ioctlPtr(v.fd, kvmSetRegs, &s.Regs); err != nil {
		return fail("KVM_SET_REGS", err)
	}
	if _, err := ioctlPtr(v.fd, kvmSetSregs, &s.Sregs); err != nil {
		return fail("KVM_SET_SREGS", err)
	}
	xs := make([]byte, max(len(s.XSAVE), v.g.xsaveSize))
	copy(xs, s.XSAVE)
	if _, err := ioctl(v.fd, kvmSetXSAVE, uintptr(unsafe.Pointer(&xs[0]))); err != nil {
		return fail("KVM_SET_XSAVE", err)
	}
	runtime.KeepAlive(xs)
	var x xcrs
	x.NrXCRs = uint32(len(s.XCRs))
	copy(x.XCRs[:], s.XCRs)
	if _, err := ioctlPtr(v.fd, kvmSetXCRs, &x); err != nil {
		return fail("KVM_SET_XCRS", err)
	}
	if _, err := ioctlPtr(v.fd, kvmSetDebugRegs, &s.DebugRegs); err != nil {
		return fail("KVM_SET_DEBUGREGS", err)
	}
	// TSC_ADJUST before the TSC: a host write of TSC_ADJUST only stores it,
	// and the TSC write then sets the offset the guest sees.
	var first, rest []MSR
	for _, m := range s.MSRs {
		if m.Index == msrTSCAdjust {
			first = append(first, m)
		} else {
			rest = append(rest, m)
		}
	}
	first = append(first, MSR{Index: msrTSC, Data: tsc})
	for _, batch := range [][]MSR{first, rest} {
		n, err := msrIoctl(v.fd, kvmSetMSRs, batch)
		if err != nil {
			return fail("KVM_SET_MSRS", err)
		}
		if n != len(batch) {
			return fail("KVM_SET_MSRS", fmt.Errorf("the kernel refused MSR %#x (wrote %d of %d)", batch[n].Index, n, len(batch)))
		}
	}
	ev := VCPUEvents(s.Events)
	if _, err := ioctlPtr(v.fd, kvmSetVCPUEvents, &ev); err != nil {
		return fail("KVM_SET_VCPU_EVENTS", err)
	}
	// Tells a kvmclock guest it was stopped; EINVAL when the guest never
	// enabled kvmclock (the micro-guest does not), which is fine.
	if _, err := ioctl(v.fd, kvmKVMClockCtrl, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fail("KVM_KVMCLOCK_CTRL", err)
	}
	return nil
}

func cpuidEqual(a, b []cpuidEntry) bool {
	if len(a) != len(b) {
		return false
	}
	if len(a) == 0 {
		return true
	}
	sa := unsafe.Slice((*byte)(unsafe.Pointer(&a[0])), 40*len(a))
	sb := unsafe.Slice((*byte)(unsafe.Pointer(&b[0])), 40*len(b))
	return bytes.Equal(sa, sb)
}
