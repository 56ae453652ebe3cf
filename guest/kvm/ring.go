package kvm

import (
	"errors"
	"fmt"
	"math/bits"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
)

// DefaultDirtyRingEntries is the per-vCPU ring size DirtyRing uses when
// Options.DirtyRingEntries is 0: 4,096 entries (64 KiB per vCPU), the
// kernel's recommended minimum, enough for several thousand pages per
// sync before a vCPU has to stop for a ring-full harvest.
const DefaultDirtyRingEntries = 4096

// dirtyGFN mirrors struct kvm_dirty_gfn. flags is shared with the kernel:
// it is only ever read with an atomic load (acquire) and written with an
// atomic store (release), the protocol KVM_CAP_DIRTY_LOG_RING_ACQ_REL asks for.
type dirtyGFN struct {
	Flags  uint32
	Slot   uint32 // as_id<<16 | slot id
	Offset uint64 // page index inside the slot
}

const (
	gfnDirty = 1 // KVM_DIRTY_GFN_F_DIRTY: pushed by KVM, not yet collected
	gfnReset = 2 // KVM_DIRTY_GFN_F_RESET: collected, KVM may re-protect it
)

// dirtyRing is one vCPU's ring, mmap'd from its fd. fetch is Tandem's
// position in it; it only moves under Guest.ringMu.
type dirtyRing struct {
	mem     []byte
	entries []dirtyGFN
	fetch   uint32
}

// enableDirtyRing turns the ring on for the VM. Preconditions: no vCPU
// exists yet (KVM answers EINVAL afterwards). It prefers the _ACQ_REL
// capability, whose contract is exactly what harvest does.
func (g *Guest) enableDirtyRing() error {
	n := g.opts.DirtyRingEntries
	if n == 0 {
		n = DefaultDirtyRingEntries
	}
	if n < 64 || n&(n-1) != 0 {
		return fmt.Errorf("%w: dirty ring of %d entries: want a power of two, at least 64", guest.ErrConfig, n)
	}
	bytes := n * int(unsafe.Sizeof(dirtyGFN{}))
	capID := uintptr(capDirtyLogRingAcqRel)
	limit := checkExtension(g.vmFd, capID)
	if limit == 0 {
		capID = capDirtyLogRing
		limit = checkExtension(g.vmFd, capID)
	}
	if limit == 0 {
		return fmt.Errorf("%w: KVM_CAP_DIRTY_LOG_RING is not offered by this kernel", ErrUnavailable)
	}
	if bytes > limit {
		return fmt.Errorf("%w: dirty ring of %d entries is %d bytes; this kernel allows at most %d per vCPU", guest.ErrConfig, n, bytes, limit)
	}
	c := enableCap{Cap: uint32(capID), Args: [4]uint64{uint64(bytes)}}
	if _, err := ioctlPtr(g.vmFd, kvmEnableCap, &c); err != nil {
		return fmt.Errorf("kvm: KVM_ENABLE_CAP dirty ring (cap %d, %d bytes): %w", capID, bytes, err)
	}
	g.ringEntries = n
	return nil
}

// mapDirtyRing maps vCPU v's ring at KVM_DIRTY_LOG_PAGE_OFFSET pages into
// its fd.
func (g *Guest) mapDirtyRing(v *vcpu) error {
	bytes := g.ringEntries * int(unsafe.Sizeof(dirtyGFN{}))
	mem, err := unix.Mmap(v.fd, int64(dirtyLogPageOffset*unix.Getpagesize()), bytes,
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("kvm: mmap dirty ring of vCPU %d (%d bytes at page %d): %w", v.id, bytes, dirtyLogPageOffset, err)
	}
	v.ring = &dirtyRing{mem: mem, entries: unsafe.Slice((*dirtyGFN)(unsafe.Pointer(&mem[0])), g.ringEntries)}
	return nil
}

// harvest moves every collected entry of v's ring into the pending
// bitmap and hands the entries back to KVM (flag RESET). It returns how
// many entries it took. Preconditions: g.ringMu held; the caller issues
// KVM_RESET_DIRTY_RINGS before releasing it.
func (g *Guest) harvest(v *vcpu) (int, error) {
	r := v.ring
	mask := uint32(len(r.entries) - 1)
	var bad error
	n := 0
	for n < len(r.entries) {
		e := &r.entries[r.fetch&mask]
		// Acquire: slot and offset are valid once DIRTY is seen.
		if atomic.LoadUint32(&e.Flags)&gfnDirty == 0 {
			break
		}
		slot, off := e.Slot, e.Offset
		if p, ok := g.slotPage(slot, off); ok {
			g.markPage(p)
		} else if bad == nil {
			bad = fmt.Errorf("kvm: dirty ring of vCPU %d: entry for slot %#x page %d outside guest RAM", v.id, slot, off)
		}
		// Release: KVM may reuse the entry once it sees RESET.
		atomic.StoreUint32(&e.Flags, gfnReset)
		r.fetch++
		n++
	}
	return n, bad
}

// slotPage turns a ring entry's slot and offset into a guest page number.
func (g *Guest) slotPage(slot uint32, off uint64) (uint64, bool) {
	if slot>>16 != 0 || int(slot) >= len(g.slots) {
		return 0, false
	}
	s := g.slots[slot]
	if off >= uint64(len(s.mem))>>guest.PageShift {
		return 0, false
	}
	return s.gpa>>guest.PageShift + off, true
}

// resetDirtyRings makes KVM re-protect every entry marked RESET.
func (g *Guest) resetDirtyRings() error {
	if _, err := ioctl(g.vmFd, kvmResetDirtyRings, 0); err != nil {
		return fmt.Errorf("kvm: KVM_RESET_DIRTY_RINGS: %w", err)
	}
	return nil
}

// ringFull serves KVM_EXIT_DIRTY_RING_FULL on v's own thread: the vCPU
// cannot re-enter until its ring has room, so it harvests its ring into
// the pending bitmap (reported by the next SyncDirty) and resets it. The
// pages are re-protected before ringMu is released, so a SyncDirty that
// reports them never races with the re-protection.
func (g *Guest) ringFull(v *vcpu) error {
	g.ringFulls.Add(1)
	g.ringMu.Lock()
	defer g.ringMu.Unlock()
	n, err := g.harvest(v)
	if n > 0 {
		err = errors.Join(err, g.resetDirtyRings())
	}
	return err
}

// syncRing is SyncDirty for DirtyRing: harvest every ring, reset them,
// then report the pending bitmap (ring pages plus Tandem's own writes)
// through its summary, so the cost follows the dirty pages, not RAM.
// Every page reported has been re-protected before SyncDirty returns: a
// later guest write to it is in a ring again for the next sync, and a
// write between harvest and reset lands in a page the caller has yet to
// read. Preconditions: g.ctl held.
func (g *Guest) syncRing(dst guest.DirtyLog) (uint64, error) {
	g.ringMu.Lock()
	defer g.ringMu.Unlock()
	var errs []error
	took := 0
	for _, v := range g.vcpus {
		n, err := g.harvest(v)
		took += n
		if err != nil {
			errs = append(errs, err)
		}
	}
	if took > 0 {
		if err := g.resetDirtyRings(); err != nil {
			return 0, err
		}
	}
	return g.takePending(dst), errors.Join(errs...)
}

// takePending hands every pending word to dst, runs of adjacent words in
// one OrWords call, and clears it. Words in the 32-bit hole (MarkDirty of
// pages outside RAM) are dropped.
func (g *Guest) takePending(dst guest.DirtyLog) uint64 {
	holeFirst := uint64(lowRAMEnd>>guest.PageShift) / 64
	holeEnd := uint64(highRAMBase>>guest.PageShift) / 64
	buf := g.ringBuf[:0]
	var start, total uint64
	flush := func() {
		if len(buf) > 0 {
			total += dst.OrWords(start*64, buf)
			buf = buf[:0]
		}
	}
	for si := range g.vmmSummary {
		if atomic.LoadUint64(&g.vmmSummary[si]) == 0 {
			continue
		}
		// Summary before words: a MarkDirty racing with this sets its
		// word first and its summary bit second, so its page is either
		// taken now or found through the summary next time.
		for s := atomic.SwapUint64(&g.vmmSummary[si], 0); s != 0; s &= s - 1 {
			wi := uint64(si)*64 + uint64(bits.TrailingZeros64(s))
			w := atomic.SwapUint64(&g.vmmDirty[wi], 0)
			if w == 0 || wi >= holeFirst && wi < holeEnd {
				continue
			}
			if len(buf) == cap(buf) || len(buf) > 0 && start+uint64(len(buf)) != wi {
				flush()
			}
			if len(buf) == 0 {
				start = wi
			}
			buf = append(buf, w)
		}
	}
	flush()
	return total
}

// markPage adds page p to the pending bitmap.
func (g *Guest) markPage(p uint64) {
	w := p / 64
	if w >= uint64(len(g.vmmDirty)) {
		return
	}
	atomic.OrUint64(&g.vmmDirty[w], 1<<(p%64))
	atomic.OrUint64(&g.vmmSummary[w/64], 1<<(w%64))
}

func (r *dirtyRing) release() {
	if r != nil && r.mem != nil {
		_ = unix.Munmap(r.mem)
		r.mem, r.entries = nil, nil
	}
}
