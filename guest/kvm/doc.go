// Package kvm is Tandem's real guest backend: a KVM virtual machine run by
// Tandem itself, running Tandem's micro-guest (microguest/, built by
// `make guest-image`).
//
// It owns the VM and vCPU file descriptors, guest RAM (mmap'd, registered
// in two memory slots split around the 32-bit hole [3 GiB, 4 GiB)), one
// goroutine per vCPU locked to its OS thread, the 8250 UART model at 0x3f8
// bridged to guest.Console, Tandem's paravirtual disk on ports 0x510-0x511
// (backed by guest/block), the dirty-log reading and the save/restore of
// every piece of vCPU and VM state.
//
// It must never run guest code at CPL0 on purpose (on kvm-pvm hosts CPL0 is
// emulated ~450x slower; only the exception stubs run there, and they only
// report and stop), never block a controlling call without a bound, never
// write guest memory without marking it dirty, and never import packages
// above guest.
//
// # Construction
//
//   - New(cfg) creates the VM, writes the machine (GDT, TSSs, IDT, identity
//     page tables, boot block at 0x5000, image at 0x200000) and leaves the
//     guest paused; Resume runs it.
//   - NewEmpty(cfg) creates the same VM with zero memory and reset vCPUs,
//     for a restore: write the received memory into Regions(), LoadState,
//     then Resume.
//   - NewWithOptions(cfg, Options) adds the dirty-log method and an injected
//     block.Disk.
//   - DefaultImage() finds microguest.bin without flags.
//
// # vCPUs and pausing
//
// Every vCPU is entered in 64-bit long mode at CPL3 with IOPL=3 and a TSS
// I/O bitmap granting every port (kvm-pvm ignores IOPL at CPL3 and checks
// the bitmap), so port I/O exits to Tandem. There is no in-kernel irqchip:
// the micro-guest polls with interrupts off, so no PIC, IOAPIC, PIT or
// LAPIC state exists to carry across a checkpoint, and an idle guest waits
// in Tandem (port 0x502) rather than in HLT. Pause sets kvm_run's
// immediate_exit and sends SIGURG (Go's own preemption signal, harmless to
// the runtime) to each vCPU thread with tgkill; KVM_RUN returns EINTR. A
// vCPU only parks after a KVM_RUN that returned EINTR, so a port I/O that
// exited to Tandem is completed by KVM before any state is read.
//
// # Dirty log
//
// SyncDirty reads KVM's per-slot bitmap and ORs in the pages Tandem wrote
// itself (boot, MarkDirty). The default method is manual protect
// (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 without INITIALLY_SET): GET_DIRTY_LOG
// copies, then CLEAR_DIRTY_LOG re-protects only the 64-page runs that hold
// dirty pages. Plain GET_DIRTY_LOG clears and write-protects the whole slot
// on every call. See BenchmarkSyncDirty for the figures behind the choice.
//
// # State
//
// SaveState writes versioned msgpack structs: kvm-machine (shape), one
// kvm-vcpu per vCPU (CPUID, MP state, regs, sregs, XSAVE, XCRs, debug regs,
// TSC, MSRs, events), kvm-clock, uart-8250 and kvm-pvdisk. LoadState decodes
// and checks everything before applying anything; applyState documents the
// restore order. The guest's TSC continues from the saved value on every
// vCPU (the largest saved TSC), so it never goes backwards across a restore.
//
// Lock order: Guest.ctl, then Guest.mu; uart.mu and pvDisk.mu are leaves.
package kvm
