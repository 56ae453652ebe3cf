package kvm

import (
	"fmt"
	"unsafe"

	"github.com/tandemvm/tandem/guest"
	"golang.org/x/sys/unix"
)

// openVM opens /dev/kvm and creates the VM. No in-kernel irqchip: the
// micro-guest polls with interrupts off, so there is no PIC, IOAPIC, PIT or
// LAPIC state to carry (and KVM's HLT, which the guest never executes at
// CPL3, reaches userspace).
func (g *Guest) openVM() error {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%w: open /dev/kvm: %v", ErrUnavailable, err)
	}
	g.sysFd = fd
	if v, err := ioctl(fd, kvmGetAPIVersion, 0); err != nil || v != 12 {
		return fmt.Errorf("%w: KVM API version %d (%v), want 12", ErrUnavailable, v, err)
	}
	sz, err := ioctl(fd, kvmGetVCPUMmapSize, 0)
	if err != nil {
		return fmt.Errorf("%w: KVM_GET_VCPU_MMAP_SIZE: %v", ErrUnavailable, err)
	}
	g.mmapSize = int(sz)
	if checkExtension(fd, capImmediateExit) == 0 {
		return fmt.Errorf("%w: KVM_CAP_IMMEDIATE_EXIT missing (needed to pause vCPUs)", ErrUnavailable)
	}
	g.xsaveSize = 4096
	if n := checkExtension(fd, capXSAVE2); n > 4096 {
		g.xsaveSize = n
	}
	vm, err := ioctl(fd, kvmCreateVM, 0)
	if err != nil {
		return fmt.Errorf("%w: KVM_CREATE_VM: %v", ErrUnavailable, err)
	}
	g.vmFd = int(vm)
	g.syncRegs = checkExtension(g.vmFd, capSyncRegs)&syncRegsAll == syncRegsAll
	// VMX needs a TSS region for real-mode emulation; harmless elsewhere.
	if _, err := ioctl(g.vmFd, kvmSetTSSAddr, tssAddr); err != nil {
		return fmt.Errorf("kvm: KVM_SET_TSS_ADDR: %w", err)
	}
	if g.opts.DirtyMethod == DirtyManualClear {
		// Without INITIALLY_SET: the first sync must not report all RAM.
		if checkExtension(g.vmFd, capManualDirtyLogProtect2)&manualProtect == 0 {
			g.opts.DirtyMethod = DirtyGetLog
		} else {
			c := enableCap{Cap: capManualDirtyLogProtect2, Args: [4]uint64{manualProtect}}
			if _, err := ioctlPtr(g.vmFd, kvmEnableCap, &c); err != nil {
				return fmt.Errorf("kvm: enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: %w", err)
			}
		}
	}
	if g.opts.DirtyMethod == DirtyRing {
		// Before any vCPU: KVM refuses the cap with EINVAL afterwards.
		if err := g.enableDirtyRing(); err != nil {
			return err
		}
	}
	khz, err := ioctl(g.vmFd, kvmGetTSCKHz, 0)
	if err != nil || khz == 0 {
		return fmt.Errorf("kvm: KVM_GET_TSC_KHZ: %v", err)
	}
	g.tscKHz = uint64(khz)
	return nil
}

// setupMemory maps RAM and registers it with dirty logging: one slot below
// the 32-bit hole and one above it.
func (g *Guest) setupMemory() error {
	top := topGPA(g.cfg.Memory)
	g.vmmDirty = make([]uint64, (top>>guest.PageShift+63)/64)
	g.vmmSummary = make([]uint64, (len(g.vmmDirty)+63)/64)
	g.ringBuf = make([]uint64, 0, 512)
	for i, r := range ramRanges(g.cfg.Memory) {
		mem, err := unix.Mmap(-1, 0, int(r[1]), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		if err != nil {
			return fmt.Errorf("kvm: mmap %s of guest RAM: %w", guest.FormatSize(r[1]), err)
		}
		s := &memSlot{id: uint32(i), gpa: r[0], mem: mem, scratch: make([]uint64, (r[1]>>guest.PageShift+63)/64)}
		g.slots = append(g.slots, s)
		g.regions = append(g.regions, guest.Region{GPA: r[0], Mem: mem})
		reg := userspaceMemoryRegion{Slot: s.id, Flags: memLogDirtyPages, GuestPhysAddr: r[0],
			MemorySize: r[1], UserspaceAddr: uint64(uintptr(unsafe.Pointer(&mem[0])))}
		if _, err := ioctlPtr(g.vmFd, kvmSetUserMemoryRegion, &reg); err != nil {
			return fmt.Errorf("kvm: KVM_SET_USER_MEMORY_REGION slot %d (%s at %#x): %w", i, guest.FormatSize(r[1]), r[0], err)
		}
	}
	return nil
}

// boot writes the machine and sets every vCPU to enter the image at CPL3.
func (g *Guest) boot(img *image) error {
	bb := bootBlock{Magic: bootMagic, Version: bootVersion, NVCPUs: uint32(g.cfg.VCPUs), MemBytes: g.cfg.Memory,
		LowEnd: lowRAMEnd, HighBase: highRAMBase, TouchBytes: g.cfg.Workload.Touch, DirtyRate: g.cfg.Workload.DirtyRate,
		Seed: g.cfg.Workload.Seed, TSCKHz: g.tscKHz}
	switch g.cfg.Workload.Kind {
	case guest.WorkloadKV:
		bb.Workload = wlKV
	default:
		bb.Workload = wlDirty
	}
	switch g.cfg.Workload.Pattern {
	case guest.PatternRandom:
		bb.Pattern = 1
	case guest.PatternHot:
		bb.Pattern = 2
	}
	w := g.cfg.Workload
	bb.Fill, bb.WriteBytes, bb.WriteData = uint32(guest.FillKind(w.Fill)), uint32(w.WriteSize()), uint32(guest.WriteKind(w.WriteData))
	if g.disk != nil {
		bb.DiskBytes = diskBytes
	}
	if g.opts.faultTest {
		bb.FaultTest = 1
	}
	written, err := g.writeMachine(img, bb)
	if err != nil {
		return err
	}
	for _, w := range written {
		g.MarkDirty(w[0], w[1])
	}
	if g.nic != nil {
		g.nic.writeConfig()
	}
	if err := g.fillFromFile(); err != nil {
		return err
	}
	for _, v := range g.vcpus {
		if err := v.setEntryState(img.entry); err != nil {
			return err
		}
	}
	return nil
}

// fillFromFile fills the dirty workload's touched range from the file of a
// file: fill before the first instruction (the micro-guest cannot read
// host files; its touch then leaves those pages alone). Only a booting
// guest reads the file: a receiving one gets the pages with the image.
func (g *Guest) fillFromFile() error {
	w := g.cfg.Workload
	if w.Kind != guest.WorkloadDirty || guest.FillKind(w.Fill) != guest.FillKindFile {
		return nil
	}
	file, err := guest.LoadFillFile(w.Fill)
	if err != nil {
		return err
	}
	pages := touchedPages(g.cfg)
	for p := uint64(0); p < pages; p++ {
		gpa := dataPageGPA(p)
		for _, r := range g.regions {
			if gpa >= r.GPA && gpa < r.GPA+uint64(len(r.Mem)) {
				off := gpa - r.GPA
				guest.FillFromFile(r.Mem[off:off+guest.PageSize], file, p)
				g.MarkDirty(gpa>>guest.PageShift, 1)
			}
		}
	}
	return nil
}

// touchedPages is how many pages the dirty workload touches: Touch, cut
// to the RAM above dataGPA (the micro-guest's dirty_loop does the same).
func touchedPages(cfg guest.Config) uint64 {
	avail := uint64(0)
	if cfg.Memory > dataGPA {
		avail = cfg.Memory - dataGPA
	}
	return min(cfg.Workload.Touch, avail) >> guest.PageShift
}

// dataPageGPA is the GPA of page p of the data range (page_gpa in the
// micro-guest: RAM from lowRAMEnd on moves to highRAMBase).
func dataPageGPA(p uint64) uint64 {
	a := uint64(dataGPA) + p*guest.PageSize
	if a >= lowRAMEnd {
		a = a - lowRAMEnd + highRAMBase
	}
	return a
}
