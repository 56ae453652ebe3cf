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
//   - NewWithOptions(cfg, Options) adds the dirty-log method, NoBoot (what
//     NewEmpty sets) and an injected block.Disk.
//   - DefaultImage() finds microguest.bin without flags.
//
// # vCPUs and pausing
//
// Every vCPU is entered in 64-bit long mode at CPL3 with IOPL=3 and a TSS
// I/O bitmap granting every port (kvm-pvm ignores IOPL at CPL3 and checks
// the bitmap), so port I/O exits to Tandem. There is no in-kernel irqchip:
// the micro-guest polls with interrupts off, so no PIC, IOAPIC, PIT or
// LAPIC state exists to carry across a checkpoint, and an idle guest waits
// in Tandem (port 0x502) rather than in HLT. Console I/O uses the 8250's
// bulk extension (ports 0x504/0x505, see uart.go): each exit costs tens of
// microseconds on kvm-pvm and string I/O exits once per byte there. Pause sets kvm_run's
// immediate_exit and sends SIGURG (Go's own preemption signal, harmless to
// the runtime) to each vCPU thread with tgkill; KVM_RUN returns EINTR. A
// vCPU only parks after a KVM_RUN that returned EINTR, so a port I/O that
// exited to Tandem is completed by KVM before any state is read.
//
// # Dirty log
//
// SyncDirty reads KVM's per-slot bitmap and ORs in the pages Tandem wrote
// itself (boot, the console's bulk input buffer, MarkDirty). Both methods
// are implemented (DirtyMethod); the default is plain KVM_GET_DIRTY_LOG.
// Measured with `go test -run '^$' -bench SyncDirty -benchtime 500ms
// -count 2 ./guest/kvm/` (2026-11-25, kvm-pvm on a 2-core AMD EPYC VM,
// guest paused, ~850 of 1,000 pages re-dirtied between syncs):
//
//	          GET_DIRTY_LOG   manual protect + CLEAR_DIRTY_LOG
//	 1 GiB    59-65 us        59-62 us
//	16 GiB    321-331 us      360-415 us
//
// Both are O(memory) here: manual protect still copies the whole bitmap
// with GET, then Tandem scans it for dirty runs and issues CLEAR, so it
// makes two passes where GET_DIRTY_LOG makes one. Its real advantage,
// clearing a chunk just before sending it (QEMU), does not fit
// SyncDirty's contract of one cut per call, and INITIALLY_SET would make
// the first sync report all of RAM. The dirty ring (O(dirty pages)) would
// win for large idle guests but cannot be combined with GET_DIRTY_LOG and
// needs a harvest on ring-full exits; it is not implemented.
//
// # Figures (same command line with -bench ., same machine and date)
//
//	start to first kv reply (New+Resume+one request)  4-5 ms
//	kv requests, one at a time over Console            ~2,500 req/s (400 us each)
//	Pause, 1 vCPU busy in the guest                     p50 ~80 us, p99 0.4-1 ms
//	Pause, 2 vCPUs busy in the guest                    p50 110-160 us, p99 8-15 ms
//	SaveState / LoadState, 2 vCPUs (23 KB of state)     ~370 us / ~870 us
//
// The 2-vCPU p99 is the scheduler: both vCPU threads spin on the machine's
// two cores, so the controlling goroutine waits for a core.
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
