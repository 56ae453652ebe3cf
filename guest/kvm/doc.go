// Package kvm is Tandem's real guest backend: a KVM virtual machine run by
// Tandem itself, running Tandem's micro-guest (microguest/, built by
// `make guest-image`).
//
// It owns the VM and vCPU file descriptors, guest RAM (mmap'd, registered
// in two memory slots split around the 32-bit hole [3 GiB, 4 GiB)), one
// goroutine per vCPU locked to its OS thread, the 8250 UART model at 0x3f8
// bridged to guest.Console, Tandem's paravirtual disk on ports 0x510-0x511
// (backed by guest/block), the network card's host side (nic.go: rings in
// guest memory at 0xD00000, filled during the console poll's exit and
// sent at the doorbell port 0x520, see docs/NETWORK.md), the dirty-log
// reading and the save/restore of every piece of vCPU and VM state.
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
// Epochs pause the guest hundreds of times a second, so the pause is
// kept short (vcpu.go, Guest.Pause):
//   - a vCPU that goes idle while pauses come (one in the last second)
//     first completes its idle port write with a KVM_RUN that does not
//     enter the guest, and waits marked clean: Pause takes it as parked
//     without a kick or a thread switch (a claimed vCPU that wakes before
//     the resume parks instead of entering the guest);
//   - the KVM_RUN a vCPU parks after is entered with kvm_valid_regs set
//     (KVM_CAP_SYNC_REGS), so KVM leaves its registers, special registers
//     and events in kvm_run and SaveState reads them there (a vCPU kicked
//     out of the guest runs once more, without entering it, for that);
//   - SaveState reads the TSC and the other MSRs in one KVM_GET_MSRS, and
//     encodes the fixed CPUID once per vCPU and the MSRs by hand, writing
//     the same bytes as before (state_encode.go).
//
// Each vCPU ioctl costs ~8 us on kvm-pvm (vcpu_load and vcpu_put; other
// hosts differ). A save used nine (MP state, regs, sregs, xsave, xcrs,
// debug regs, MSRs twice, events); it is now five per vCPU where the host
// has KVM_CAP_SYNC_REGS (a kicked vCPU pays one more KVM_RUN for them),
// and eight without it.
//
// # Dirty log
//
// SyncDirty reports what vCPUs dirtied plus the pages Tandem wrote itself
// (boot, the console's bulk input buffer, MarkDirty). Three methods are
// implemented (DirtyMethod); the package's default (Options' zero value,
// used by guests built to receive an image) is plain KVM_GET_DIRTY_LOG,
// the command's (--dirty-log) manual protect: only there can a
// migration's round 0 write-protect memory piece by piece as it sends it
// (guest.LazyDirtyLog: DiscardDirty, TrackDirty).
//
//   - DirtyGetLog: KVM_GET_DIRTY_LOG per slot copies, clears and
//     re-protects in one call; Tandem ORs in its own bitmap.
//   - DirtyManualClear: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 without
//     INITIALLY_SET; GET copies, CLEAR_DIRTY_LOG re-protects the spans
//     of 64-page words found dirty (bridging up to clearGap clean words,
//     so scattered pages cost a few calls).
//   - DirtyRing (ring.go): KVM_CAP_DIRTY_LOG_RING_ACQ_REL (plain _RING if
//     that is missing) enabled before any vCPU exists; each vCPU's ring of
//     DirtyRingEntries 16-byte kvm_dirty_gfn is mapped from its fd at page
//     64. SyncDirty, under ringMu, reads each ring from its fetch index
//     while flags has DIRTY (atomic load = acquire), sets RESET (atomic
//     store = release), calls KVM_RESET_DIRTY_RINGS, and only then takes
//     the pending bitmap, so every page it reports is re-protected before
//     the caller reads it. Harvested pages go into the same pending bitmap
//     as Tandem's own writes; a summary bitmap (one bit per 64-page word)
//     lets the sync find them without scanning RAM's bitmap.
//     KVM_GET_DIRTY_LOG is not used (KVM answers ENXIO with a ring).
//     A full ring exits KVM_RUN with KVM_EXIT_DIRTY_RING_FULL: the vCPU
//     harvests its own ring into the pending bitmap and resets it before
//     re-entering (the next SyncDirty reports those pages); re-entering
//     without a reset would only exit again. On a running guest, a page
//     written just before a sync may appear one sync late (KVM pushes
//     entries at fault or PML-flush time); a paused guest's ring is
//     complete, which is what the final epoch relies on.
//
// Measured with `go test -run '^$' -bench SyncDirty -benchtime 500ms
// -count 2 ./guest/kvm/` (2026-11-25, kvm-pvm on a 2-core AMD EPYC VM
// shared with other work, guest paused, ~850-950 of 1,000 pages
// re-dirtied between syncs, rings of 4,096 entries):
//
//	          GET_DIRTY_LOG   manual protect + CLEAR   dirty ring
//	 1 GiB    81-90 us        83-87 us                 77-79 us
//	16 GiB    338-346 us      359-376 us               73-78 us
//
// The bitmap methods are O(memory): manual protect still copies the whole
// bitmap with GET, then Tandem scans it and issues CLEAR, two passes where
// GET_DIRTY_LOG makes one, and INITIALLY_SET would make the first sync
// report all of RAM. The ring is O(dirty pages): flat from 1 GiB to
// 16 GiB, 4.5x faster than GET_DIRTY_LOG at 16 GiB, barely better at
// 1 GiB (not profiled; KVM_RESET_DIRTY_RINGS re-protects each of the ~900
// pages one by one).
//
// With more dirty pages the ring falls behind: BenchmarkSyncDirtyHeavy
// (same date and machine, `-bench SyncDirtyHeavy -benchtime 300ms -count
// 2`; 1 GiB, the guest rewriting 64 MiB as fast as its write faults allow,
// ~3,100-3,400 pages per sync, rings of 16,384 entries):
//
//	         GET_DIRTY_LOG   manual protect + CLEAR   dirty ring
//	1 GiB    168-180 us      170-172 us               201-224 us
//
// So both grow with the pages dirtied (each must be re-protected), the
// ring by roughly 55 ns a page against GET's ~37 ns (two points each,
// a rough fit): at 1 GiB the ring stops winning near 1,300 pages per
// sync; at 16 GiB, by extrapolation, near 15,000.
//
// GET_DIRTY_LOG stays the default: it is ahead whenever a guest of a few
// GiB dirties more than about a thousand pages per epoch (the busy case
// that decides whether precopy converges; the idle case is cheap either
// way), it needs no
// size fixed before the vCPUs exist (a ring smaller than one vCPU's
// dirtying per epoch costs a ring-full exit each time it fills), and it
// works on every kernel, where DirtyRing fails New without the
// capability. Choose DirtyRing for large guests with a modest dirty rate
// (RAM of several GiB, under a few thousand pages per epoch), sizing
// DirtyRingEntries to hold one vCPU's pages per epoch.
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
// Lock order: Guest.ctl, then Guest.mu or Guest.ringMu (a vCPU thread
// takes ringMu alone on a ring-full exit); uart.mu, pvDisk.mu and nic.mu
// are leaves (nic.transmit calls the sink after releasing nic.mu).
//
// The network card has no device section: it is all guest memory (its
// address, rings, counters and IPv4 ID), which is why the state's schema
// did not change with it. Frames queued on the host and not yet in the
// ring are not saved: a restore loses them like frames on a wire.
package kvm
