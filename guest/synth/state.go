package synth

import (
	"fmt"

	"github.com/hashicorp/go-msgpack/v2/codec"

	"github.com/tandemvm/tandem/guest"
)

// Device names in the saved state, in the order SaveState writes them
// (kept stable: guest.StateDigest hashes in this order).
const (
	devMachine = "synth-machine"
	devVCPU    = "synth-vcpu"
	devConsole = "synth-console"
	devNIC     = "synth-nic"
	devDisk    = "synth-disk"
)

// machineState, version 1, says what the state was saved from; LoadState
// refuses state from a differently shaped guest.
type machineState struct {
	Workload string
	VCPUs    uint32
	Memory   uint64
	Touch    uint64
	Pattern  string
	Booted   bool
	// The content and write profiles (issue 11), empty for the defaults so
	// that a default guest's state encodes as before.
	Fill       string `codec:",omitempty"`
	WriteBytes int    `codec:",omitempty"`
	WriteData  string `codec:",omitempty"`
}

const machineStateVersion = 1

// diskState, version 1, is the disk's queue: writes submitted but not yet
// completed at the pause. A restored guest reissues them.
type diskState struct {
	Pending []pendingWrite
}

type pendingWrite struct {
	Offset uint64
	Data   []byte
}

const diskStateVersion = 1

// StateVersions lists every device this backend saves with its current
// schema version (for `tandem schema dump`).
func StateVersions() map[string]uint32 {
	return map[string]uint32{
		devMachine: machineStateVersion,
		devVCPU:    vcpuStateVersion,
		devConsole: consoleStateVersion,
		devDisk:    diskStateVersion,
		devNIC:     nicStateVersion,
	}
}

// OptionalDevices are the sections a guest saves only with a feature:
// the disk queue with --disk, the card with --guest-ip. Streams of
// guests without them lack them, so a build that adds one still loads
// older streams (docs/PAIR-AND-MIGRATION.md, schema rules).
func OptionalDevices() []string { return []string{devDisk, devNIC} }

// StateSections is the sections this guest's saved state carries, with
// versions (guest.StateSectioner): every device but an optional one
// the guest lacks.
func (g *Guest) StateSections() map[string]uint32 {
	s := StateVersions()
	if g.disk == nil {
		delete(s, devDisk)
	}
	if g.nic == nil {
		delete(s, devNIC)
	}
	return s
}

func init() { guest.RegisterStateVersions(Kind, StateVersions) }

var msgpackHandle = &codec.MsgpackHandle{}

func encode(v any) ([]byte, error) {
	var b []byte
	if err := codec.NewEncoderBytes(&b, msgpackHandle).Encode(v); err != nil {
		return nil, fmt.Errorf("synth: encode state: %w", err)
	}
	return b, nil
}

func decode(name string, b []byte, v any) error {
	if err := codec.NewDecoderBytes(b, msgpackHandle).Decode(v); err != nil {
		return fmt.Errorf("%w: %s: %v", guest.ErrState, name, err)
	}
	return nil
}

func (g *Guest) machineState() machineState {
	m := machineState{
		Workload: g.cfg.Workload.Kind,
		VCPUs:    uint32(len(g.vcpus)),
		Memory:   g.cfg.Memory,
		Touch:    g.cfg.Workload.Touch,
		Pattern:  g.cfg.Workload.Pattern,
	}
	w := g.cfg.Workload
	switch k := guest.FillKind(w.Fill); {
	case k == guest.FillKindFile:
		m.Fill = "file" // the path is the sender's, not the guest's shape
	case k != guest.FillKindZero:
		m.Fill = w.Fill
	}
	if w.WriteSize() != guest.DefaultWriteBytes {
		m.WriteBytes = w.WriteSize()
	}
	if guest.WriteKind(w.WriteData) != guest.WriteKindCounter {
		m.WriteData = w.WriteData
	}
	return m
}

// SaveState captures the vCPUs' workload positions, the console input
// queue and the disk queue. Precondition: paused.
func (g *Guest) SaveState() (guest.MachineState, error) {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return guest.MachineState{}, guest.ErrClosed
	}
	if !g.paused {
		return guest.MachineState{}, fmt.Errorf("synth: save state: %w", guest.ErrNotPaused)
	}
	ms := guest.MachineState{Kind: Kind}
	add := func(name string, inst, version uint32, v any) error {
		b, err := encode(v)
		if err != nil {
			return err
		}
		ms.Devices = append(ms.Devices, guest.DeviceState{Name: name, Instance: inst, Version: version, Fields: b})
		return nil
	}
	m := g.machineState()
	m.Booted = g.booted
	if err := add(devMachine, 0, machineStateVersion, m); err != nil {
		return guest.MachineState{}, err
	}
	for i, v := range g.vcpus {
		if err := add(devVCPU, uint32(i), vcpuStateVersion, v.st); err != nil {
			return guest.MachineState{}, err
		}
	}
	if err := add(devConsole, 0, consoleStateVersion, g.console.save()); err != nil {
		return guest.MachineState{}, err
	}
	if g.nic != nil {
		if err := add(devNIC, 0, nicStateVersion, g.nic.save()); err != nil {
			return guest.MachineState{}, err
		}
	}
	if g.disk != nil {
		var ds diskState
		// Writes loaded but not yet reissued are still pending.
		for _, w := range g.diskResubmit {
			ds.Pending = append(ds.Pending, pendingWrite{w.Offset, w.Data})
		}
		for _, w := range g.disk.Pending() {
			ds.Pending = append(ds.Pending, pendingWrite{w.Offset, w.Data})
		}
		if err := add(devDisk, 0, diskStateVersion, ds); err != nil {
			return guest.MachineState{}, err
		}
	}
	return ms, nil
}

// loadedState is a MachineState decoded and checked, ready to commit.
type loadedState struct {
	mach  machineState
	vcpus []vcpuState
	cons  consoleState
	disk  diskState
	nic   *nicState // nil: the state has no card
}

// LoadState replaces the vCPU, console and disk-queue state. Everything is
// decoded and checked before anything changes, so on error (wrapping
// guest.ErrState) the guest is as it was. Precondition: paused.
func (g *Guest) LoadState(s guest.MachineState) error {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return guest.ErrClosed
	}
	if !g.paused {
		return fmt.Errorf("synth: load state: %w", guest.ErrNotPaused)
	}
	if s.Kind != Kind {
		return fmt.Errorf("%w: state of kind %q, this guest is %q", guest.ErrState, s.Kind, Kind)
	}
	ls, err := g.decodeState(s)
	if err != nil {
		return err
	}
	mach, vcpus, cons, disk := ls.mach, ls.vcpus, ls.cons, ls.disk
	// Commit: nothing below fails.
	for i, v := range g.vcpus {
		v.st = vcpus[i]
		v.writes.Store(v.st.Counter)
	}
	g.console.load(cons)
	if ls.nic != nil {
		g.nic.load(*ls.nic)
	}
	g.diskResubmit = g.diskResubmit[:0]
	for _, w := range disk.Pending {
		g.diskResubmit = append(g.diskResubmit, guest.DiskWrite{Offset: w.Offset, Data: w.Data})
	}
	g.booted = mach.Booted
	return nil
}

// decodeState decodes every device of s and checks it against this guest,
// changing nothing. Preconditions: g.ctl held.
func (g *Guest) decodeState(s guest.MachineState) (loadedState, error) {
	var (
		ls       = loadedState{vcpus: make([]vcpuState, len(g.vcpus))}
		seen     = make([]bool, len(g.vcpus))
		haveMach bool
		haveCons bool
	)
	for _, d := range s.Devices {
		want, known := StateVersions()[d.Name]
		if !known {
			return ls, fmt.Errorf("%w: unknown device %q", guest.ErrState, d.Name)
		}
		if d.Version != want {
			return ls, fmt.Errorf("%w: device %s version %d, this build reads version %d", guest.ErrState, d.Name, d.Version, want)
		}
		var err error
		switch d.Name {
		case devMachine:
			if haveMach {
				return ls, fmt.Errorf("%w: device %s saved twice", guest.ErrState, d.Name)
			}
			err, haveMach = decode(d.Name, d.Fields, &ls.mach), true
		case devVCPU:
			if int(d.Instance) >= len(ls.vcpus) || seen[d.Instance] {
				return ls, fmt.Errorf("%w: vcpu %d: this guest has %d vCPUs", guest.ErrState, d.Instance, len(ls.vcpus))
			}
			err, seen[d.Instance] = decode(d.Name, d.Fields, &ls.vcpus[d.Instance]), true
		case devConsole:
			if err = decode(d.Name, d.Fields, &ls.cons); err == nil && len(ls.cons.Input) > InputBufferSize {
				err = fmt.Errorf("%w: console input of %d bytes exceeds %d", guest.ErrState, len(ls.cons.Input), InputBufferSize)
			}
			haveCons = true
		case devDisk:
			if g.disk == nil {
				return ls, fmt.Errorf("%w: state has a disk queue, this guest has no --disk", guest.ErrState)
			}
			err = decode(d.Name, d.Fields, &ls.disk)
		case devNIC:
			ls.nic, err = g.decodeNIC(d, ls.nic)
		}
		if err != nil {
			return ls, err
		}
	}
	if g.nic != nil && ls.nic == nil {
		return ls, fmt.Errorf("%w: state lacks the %s device this guest's --guest-ip needs", guest.ErrState, devNIC)
	}
	if !haveMach || !haveCons {
		return ls, fmt.Errorf("%w: state lacks the %s or %s device", guest.ErrState, devMachine, devConsole)
	}
	mach := ls.mach
	if want := g.machineState(); mach.Workload != want.Workload || mach.VCPUs != want.VCPUs ||
		mach.Memory != want.Memory || mach.Touch != want.Touch || mach.Pattern != want.Pattern {
		return ls, fmt.Errorf("%w: state saved from a %s guest with %d vCPUs, %s memory, touch %s, pattern %q; this one is %s, %d, %s, %s, %q",
			guest.ErrState, mach.Workload, mach.VCPUs, guest.FormatSize(mach.Memory), guest.FormatSize(mach.Touch), mach.Pattern,
			want.Workload, want.VCPUs, guest.FormatSize(want.Memory), guest.FormatSize(want.Touch), want.Pattern)
	}
	if want := g.machineState(); mach.Fill != want.Fill || mach.WriteBytes != want.WriteBytes || mach.WriteData != want.WriteData {
		return ls, fmt.Errorf("%w: state saved from a guest with fill %q, write bytes %d, write data %q; this one has %q, %d, %q (empty: default)",
			guest.ErrState, mach.Fill, mach.WriteBytes, mach.WriteData, want.Fill, want.WriteBytes, want.WriteData)
	}
	for i, ok := range seen {
		if !ok {
			return ls, fmt.Errorf("%w: state lacks vcpu %d", guest.ErrState, i)
		}
		st := ls.vcpus[i]
		if st.Phase > phaseDirty || st.TouchNext > g.vcpus[i].n {
			return ls, fmt.Errorf("%w: vcpu %d: phase %d at page %d of %d", guest.ErrState, i, st.Phase, st.TouchNext, g.vcpus[i].n)
		}
	}
	return ls, nil
}

// decodeNIC decodes and checks the card's section d; prev is the one
// decoded before (nil: none), as a section may appear once.
func (g *Guest) decodeNIC(d guest.DeviceState, prev *nicState) (*nicState, error) {
	if g.nic == nil {
		return nil, fmt.Errorf("%w: state has a network card, this guest has no --guest-ip", guest.ErrState)
	}
	if prev != nil {
		return nil, fmt.Errorf("%w: device %s saved twice", guest.ErrState, d.Name)
	}
	ns := new(nicState)
	if err := decode(d.Name, d.Fields, ns); err != nil {
		return nil, err
	}
	return ns, g.nic.check(*ns)
}
