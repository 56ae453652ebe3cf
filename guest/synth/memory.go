package synth

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/uffd"
)

// memory is the guest's RAM: one anonymous private mapping with
// MAP_NORESERVE, so an untouched page costs nothing, plus the dirty log,
// one bit per page in atomically updated words.
//
// Every store the guest makes goes through put/write, which store the data
// first and set the page's bit after, with an atomic OR (a locked RMW, so
// the data store is visible to anyone who later swaps the word out). A
// racing SyncDirty therefore reports the store in this sync or the next,
// never in neither.
type memory struct {
	mem   []byte
	dirty []uint64
	// postcopy is set while pages may still be missing (registered with
	// userfaultfd on a post-copy destination): every access then faults
	// its pages in first through a system call (uffd.Populate), so a vCPU
	// waits for a missing page in the kernel, as a KVM vCPU does inside
	// KVM_RUN. A goroutine that faulted in a plain load could keep its P
	// (no preemption point inside memmove) and starve the goroutines that
	// fetch the page, or the collector.
	postcopy atomic.Bool
}

// faultIn makes bytes [off, off+n) present before an access, while
// post-copy is on. An error leaves the access to fault by itself.
func (m *memory) faultIn(off, n uint64) {
	if n == 0 || !m.postcopy.Load() {
		return
	}
	_ = uffd.Populate(m.mem[off : off+n])
}

func newMemory(size uint64) (*memory, error) {
	if size > uint64(^uint(0)>>1) {
		return nil, fmt.Errorf("%w: --memory %s does not fit this host's address space", guest.ErrConfig, guest.FormatSize(size))
	}
	b, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("synth: map %s of guest memory: %w", guest.FormatSize(size), err)
	}
	pages := size >> guest.PageShift
	return &memory{mem: b, dirty: make([]uint64, (pages+63)/64)}, nil
}

func (m *memory) pages() uint64 { return uint64(len(m.mem)) >> guest.PageShift }

// mark records a store to page p. It must follow the store.
func (m *memory) mark(p uint64) {
	atomic.OrUint64(&m.dirty[p>>6], 1<<(p&63))
}

// markRange records stores to pages [first, first+n), clamped to memory.
func (m *memory) markRange(first, n uint64) {
	end := first + n
	if end < first || end > m.pages() {
		end = m.pages()
	}
	for p := first; p < end; {
		if p&63 == 0 && end-p >= 64 {
			atomic.StoreUint64(&m.dirty[p>>6], ^uint64(0)) // whole word: no bit to keep
			p += 64
			continue
		}
		m.mark(p)
		p++
	}
}

// putUint64 stores v little-endian at byte offset off (8-aligned, so it
// never spans pages) and marks the page.
func (m *memory) putUint64(off, v uint64) {
	m.faultIn(off, 8)
	binary.LittleEndian.PutUint64(m.mem[off:off+8], v)
	m.mark(off >> guest.PageShift)
}

// write copies p to byte offset off and marks every page it touched.
func (m *memory) write(off uint64, p []byte) {
	if len(p) == 0 {
		return
	}
	m.faultIn(off, uint64(len(p)))
	copy(m.mem[off:off+uint64(len(p))], p)
	first := off >> guest.PageShift
	last := (off + uint64(len(p)) - 1) >> guest.PageShift
	m.markRange(first, last-first+1)
}

// syncChunk is how many words SyncDirty hands to the log at once.
const syncChunk = 512

// sync moves the dirty log into dst and clears it: each non-zero word is
// swapped with zero and handed over in chunks of syncChunk words.
func (m *memory) sync(dst guest.DirtyLog) uint64 {
	var buf [syncChunk]uint64
	var newly uint64
	for base := 0; base < len(m.dirty); base += syncChunk {
		end := min(base+syncChunk, len(m.dirty))
		last := -1
		for i := base; i < end; i++ {
			if atomic.LoadUint64(&m.dirty[i]) == 0 {
				buf[i-base] = 0
				continue
			}
			buf[i-base] = atomic.SwapUint64(&m.dirty[i], 0)
			last = i - base
		}
		if last >= 0 {
			newly += dst.OrWords(uint64(base)*64, buf[:last+1])
		}
	}
	return newly
}

func (m *memory) unmap() error {
	if m.mem == nil {
		return nil
	}
	err := unix.Munmap(m.mem)
	m.mem = nil
	if err != nil {
		return fmt.Errorf("synth: unmap guest memory: %w", err)
	}
	return nil
}
