package checkpoint

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/tandemvm/tandem/guest"
)

// MemTarget is an in-memory Target with the replica's semantics: pages,
// devices and disk writes are staged and only become visible (Page,
// Devices, Disk, Epochs) when EndEpoch commits them. Tests and tools use
// it; it holds every page it is sent, so it is not for large guests.
type MemTarget struct {
	pages   map[uint64][]byte
	devices guest.MachineState
	disk    []guest.DiskWrite
	epochs  []EpochEnd

	stagedPages   map[uint64][]byte
	stagedDevices *guest.MachineState
	stagedDisk    []guest.DiskWrite
}

// NewMemTarget returns an empty MemTarget (all pages zero).
func NewMemTarget() *MemTarget {
	return &MemTarget{pages: map[uint64][]byte{}, stagedPages: map[uint64][]byte{}}
}

func (m *MemTarget) PageBase(index uint64) ([]byte, error) {
	if p, ok := m.stagedPages[index]; ok {
		return p, nil
	}
	return m.pages[index], nil
}

func (m *MemTarget) StorePage(index uint64, data []byte) error {
	if len(data) != guest.PageSize {
		return fmt.Errorf("page %d of %d bytes", index, len(data))
	}
	p, ok := m.stagedPages[index]
	if !ok {
		p = make([]byte, guest.PageSize)
		m.stagedPages[index] = p
	}
	copy(p, data)
	return nil
}

func (m *MemTarget) StoreDevices(ms guest.MachineState) error {
	m.stagedDevices = &ms
	return nil
}

func (m *MemTarget) StoreDisk(ws []guest.DiskWrite) error {
	for _, w := range ws {
		m.stagedDisk = append(m.stagedDisk, guest.DiskWrite{Offset: w.Offset, Data: slices.Clone(w.Data)})
	}
	return nil
}

func (m *MemTarget) EndEpoch(e EpochEnd) error {
	for i, p := range m.stagedPages {
		if isZeroPage(p) {
			delete(m.pages, i)
		} else {
			m.pages[i] = p
		}
	}
	m.stagedPages = map[uint64][]byte{}
	if m.stagedDevices != nil {
		m.devices = *m.stagedDevices
		m.stagedDevices = nil
	}
	m.disk = append(m.disk, m.stagedDisk...)
	m.stagedDisk = nil
	m.epochs = append(m.epochs, e)
	return nil
}

// Discard drops whatever is staged (a failed epoch).
func (m *MemTarget) Discard() {
	m.stagedPages = map[uint64][]byte{}
	m.stagedDevices = nil
	m.stagedDisk = nil
}

// Page returns the committed copy of page index, nil if zero.
func (m *MemTarget) Page(index uint64) []byte { return m.pages[index] }

// PageIndices lists the committed non-zero pages in ascending order.
func (m *MemTarget) PageIndices() []uint64 { return slices.Sorted(maps.Keys(m.pages)) }

// Devices returns the committed machine state.
func (m *MemTarget) Devices() guest.MachineState { return m.devices }

// Disk returns every committed disk write, in order.
func (m *MemTarget) Disk() []guest.DiskWrite { return m.disk }

// Epochs returns the committed epochs, in order.
func (m *MemTarget) Epochs() []EpochEnd { return m.epochs }

// Staged reports whether anything is staged and not committed.
func (m *MemTarget) Staged() bool {
	return len(m.stagedPages) > 0 || m.stagedDevices != nil || len(m.stagedDisk) > 0
}

// Image lays the committed pages out as guest regions of the given layout,
// for guest.MemoryDigest. Pages outside the layout are an error.
func (m *MemTarget) Image(layout []MemRegion) ([]guest.Region, error) {
	rs := make([]guest.Region, len(layout))
	for i, l := range layout {
		rs[i] = guest.Region{GPA: l.GPA, Mem: make([]byte, l.Size)}
	}
	t := &RegionTarget{Regions: rs}
	for i, p := range m.pages {
		if err := t.StorePage(i, p); err != nil {
			return nil, err
		}
	}
	return rs, nil
}

// ErrNoDisk is returned by RegionTarget.StoreDisk when the stream carries
// disk writes and the target has no Disk.
var ErrNoDisk = errors.New("checkpoint: stream has disk writes and the target has no disk")

// RegionTarget restores a stream straight into a paused guest's memory
// (snapshot restore, the destination of a migration before Start). Pages
// are written in place as they arrive, so it has no staging: if the stream
// fails, the guest's memory is partly restored and the caller must discard
// the guest (nothing of it has run). Device state of the last DEVICE
// section is kept in State for the caller to LoadState once the stream
// ends; disk writes go to Disk as they arrive.
type RegionTarget struct {
	Regions []guest.Region
	// Disk receives disk writes; nil makes a stream with disk writes fail.
	Disk guest.Disk
	// State is the last device state received (Kind == "" if none).
	State guest.MachineState
	// Epochs lists the epochs received.
	Epochs []EpochEnd

	last int // region of the previous page: pages arrive in runs
}

func (t *RegionTarget) locate(index uint64) ([]byte, error) {
	if t.last < len(t.Regions) {
		if p := pageIn(t.Regions[t.last], index); p != nil {
			return p, nil
		}
	}
	for i, r := range t.Regions {
		if p := pageIn(r, index); p != nil {
			t.last = i
			return p, nil
		}
	}
	return nil, fmt.Errorf("page %d is outside the guest's memory", index)
}

func pageIn(r guest.Region, index uint64) []byte {
	first := r.FirstPage()
	if index < first || index-first >= r.Pages() {
		return nil
	}
	off := (index - first) << guest.PageShift
	return r.Mem[off : off+guest.PageSize]
}

// Prefault implements Prefaulter: a restore writes each page once, into
// memory that is not populated yet.
func (t *RegionTarget) Prefault(first, n uint64) { guest.PrefaultPages(t.Regions, first, n, false) }

func (t *RegionTarget) PageBase(index uint64) ([]byte, error) { return t.locate(index) }

func (t *RegionTarget) StorePage(index uint64, data []byte) error {
	p, err := t.locate(index)
	if err != nil {
		return err
	}
	copy(p, data)
	return nil
}

func (t *RegionTarget) StoreDevices(ms guest.MachineState) error {
	t.State = ms
	return nil
}

func (t *RegionTarget) StoreDisk(ws []guest.DiskWrite) error {
	if len(ws) == 0 {
		return nil
	}
	if t.Disk == nil {
		return ErrNoDisk
	}
	return t.Disk.ApplyDiskWrites(ws)
}

func (t *RegionTarget) EndEpoch(e EpochEnd) error {
	t.Epochs = append(t.Epochs, e)
	return nil
}
