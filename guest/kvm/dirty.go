package kvm

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"unsafe"

	"github.com/tandemvm/tandem/guest"
)

// SyncDirty implements guest.Guest. Per slot it reads KVM's log (with
// manual protect: GET_DIRTY_LOG copies, then CLEAR_DIRTY_LOG re-protects
// just the pages found, so a write after the GET either is in this copy or
// faults again for the next sync), ORs in the pages Tandem itself wrote,
// and hands the words to dst. With DirtyRing it harvests the vCPUs' rings
// instead (ring.go, syncRing).
func (g *Guest) SyncDirty(dst guest.DirtyLog) (uint64, error) {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return 0, guest.ErrClosed
	}
	if g.opts.DirtyMethod == DirtyRing {
		return g.syncRing(dst)
	}
	var total uint64
	for _, s := range g.slots {
		if err := g.readSlotLog(s); err != nil {
			return total, err
		}
		first := s.gpa >> guest.PageShift
		// Tandem's own writes (boot, MarkDirty), taken atomically.
		vm := g.vmmDirty[first/64 : first/64+uint64(len(s.scratch))]
		for i := range vm {
			if atomic.LoadUint64(&vm[i]) != 0 {
				s.scratch[i] |= atomic.SwapUint64(&vm[i], 0)
			}
		}
		total += dst.OrWords(first, s.scratch)
	}
	return total, nil
}

func (g *Guest) readSlotLog(s *memSlot) error {
	clear(s.scratch)
	dl := dirtyLog{Slot: s.id, Bitmap: uintptr(unsafe.Pointer(&s.scratch[0]))}
	_, err := ioctlPtr(g.vmFd, kvmGetDirtyLog, &dl)
	runtime.KeepAlive(s.scratch)
	if err != nil {
		return fmt.Errorf("kvm: KVM_GET_DIRTY_LOG slot %d: %w", s.id, err)
	}
	if g.opts.DirtyMethod != DirtyManualClear {
		return nil
	}
	// Clear only the spans that hold dirty pages: the kernel copies and
	// walks every word it is given. A span bridges gaps of up to
	// clearGap clean words, so scattered pages (a guest writing at
	// random) cost a few calls rather than one per 64-page word.
	pages := uint64(len(s.mem)) >> guest.PageShift
	for i := 0; i < len(s.scratch); {
		if s.scratch[i] == 0 {
			i++
			continue
		}
		j, last := i, i // last: the span's last dirty word
		for j < len(s.scratch) && j-last <= clearGap {
			if s.scratch[j] != 0 {
				last = j
			}
			j++
		}
		// Words last+1 to j-1 were read clean: the next span starts
		// after them (reading them again, one at a time, is the loop's
		// slowest part on a sparse log).
		scanned := j
		j = last + 1
		n := uint64(j-i) * 64
		if uint64(i)*64+n > pages {
			n = pages - uint64(i)*64
		}
		c := clearDirtyLog{Slot: s.id, NumPages: uint32(n), FirstPage: uint64(i) * 64,
			Bitmap: uintptr(unsafe.Pointer(&s.scratch[i]))}
		_, err := ioctlPtr(g.vmFd, kvmClearDirtyLog, &c)
		runtime.KeepAlive(s.scratch)
		if err != nil {
			return fmt.Errorf("kvm: KVM_CLEAR_DIRTY_LOG slot %d pages %d+%d: %w", s.id, c.FirstPage, n, err)
		}
		i = scanned
	}
	return nil
}

// clearGap is the most clean words (of 64 pages) one CLEAR_DIRTY_LOG
// call spans between dirty ones: 4 KiB of bitmap for the kernel to copy
// and skip, cheaper than another call.
const clearGap = 512

// MarkDirty implements guest.Guest. Pages outside RAM are ignored.
// Each word's summary bit is set after the word (takePending relies on
// that order), so DirtyRing's sync finds the words without scanning RAM's
// whole bitmap.
func (g *Guest) MarkDirty(first, n uint64) {
	limit := uint64(len(g.vmmDirty)) * 64
	for p := first; p < first+n && p < limit; {
		w := p / 64
		if p%64 == 0 && first+n-p >= 64 {
			atomic.StoreUint64(&g.vmmDirty[w], ^uint64(0))
			p += 64
		} else {
			atomic.OrUint64(&g.vmmDirty[w], 1<<(p%64))
			p++
		}
		atomic.OrUint64(&g.vmmSummary[w/64], 1<<(w%64))
	}
}

var _ guest.LazyDirtyLog = (*Guest)(nil)

// DiscardDirty implements guest.LazyDirtyLog. Only with manual protect
// (DirtyManualClear): there GET_DIRTY_LOG never write-protects, so
// nothing has to be done to KVM at all. Its bitmap keeps the pages
// written so far, and KVM keeps them writable until TrackDirty (or a
// SyncDirty) clears them. Tandem's own writes logged so far are dropped.
func (g *Guest) DiscardDirty() (bool, error) {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return false, guest.ErrClosed
	}
	if g.opts.DirtyMethod != DirtyManualClear {
		return false, nil
	}
	for i := range g.vmmDirty {
		if atomic.LoadUint64(&g.vmmDirty[i]) != 0 {
			atomic.SwapUint64(&g.vmmDirty[i], 0)
		}
	}
	return true, nil
}

// TrackDirty implements guest.LazyDirtyLog: KVM_CLEAR_DIRTY_LOG over the
// pages, per slot. KVM wants the range to start on a multiple of 64
// pages, so the range is widened to that and the mask's bits outside it
// stay clear (a page outside it keeps what is logged for it).
func (g *Guest) TrackDirty(first, n uint64) error {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return guest.ErrClosed
	}
	if g.opts.DirtyMethod != DirtyManualClear {
		return fmt.Errorf("kvm: TrackDirty needs the clear dirty-log method, not %v", g.opts.DirtyMethod)
	}
	for _, s := range g.slots {
		lo := s.gpa >> guest.PageShift
		hi := lo + uint64(len(s.mem))>>guest.PageShift
		if n == 0 || first+n <= lo || first >= hi {
			continue
		}
		a, b := max(first, lo)-lo, min(first+n, hi)-lo // slot-relative
		start := a &^ 63
		num := min((b-start+63)&^63, hi-lo-start) // whole words, or to the slot's end
		words := (num + 63) / 64
		if uint64(cap(g.trackMask)) < words {
			g.trackMask = make([]uint64, words)
		}
		mask := g.trackMask[:words]
		clear(mask)
		for p := a; p < b; p++ {
			mask[(p-start)/64] |= 1 << ((p - start) % 64)
		}
		c := clearDirtyLog{Slot: s.id, NumPages: uint32(num), FirstPage: start,
			Bitmap: uintptr(unsafe.Pointer(&mask[0]))}
		_, err := ioctlPtr(g.vmFd, kvmClearDirtyLog, &c)
		runtime.KeepAlive(mask)
		if err != nil {
			return fmt.Errorf("kvm: KVM_CLEAR_DIRTY_LOG slot %d pages %d+%d: %w", s.id, start, num, err)
		}
	}
	return nil
}
