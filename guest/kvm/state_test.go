package kvm

import (
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"testing"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/block"
)

// restoreInto moves a paused guest's memory and state into a fresh VM and
// closes the old one; the new guest is paused.
func restoreInto(t testing.TB, old *Guest) *Guest {
	t.Helper()
	st, err := old.SaveState()
	if err != nil {
		t.Fatalf("save: %v", err)
	}
	ng, err := NewEmpty(old.cfg)
	if err != nil {
		t.Fatalf("new empty: %v", err)
	}
	for i, r := range old.Regions() {
		copyNonZero(ng.Regions()[i].Mem, r.Mem)
	}
	if err := ng.LoadState(st); err != nil {
		ng.Close()
		t.Fatalf("load: %v", err)
	}
	if err := old.Close(); err != nil {
		t.Fatalf("close old: %v", err)
	}
	return ng
}

// copyNonZero copies the non-zero pages only, as a receiver of a stream
// would (the destination is fresh zero memory).
func copyNonZero(dst, src []byte) {
	for off := 0; off < len(src); off += guest.PageSize {
		p := src[off : off+guest.PageSize]
		if !guest.IsZeroPage(p) {
			copy(dst[off:], p)
		}
	}
}

func vcpuTSCs(t testing.TB, g *Guest) []uint64 {
	t.Helper()
	var out []uint64
	for _, v := range g.vcpus {
		m := []MSR{{Index: msrTSC}}
		if n, err := msrIoctl(v.fd, kvmGetMSRs, m); err != nil || n != 1 {
			t.Fatalf("read TSC: %d %v", n, err)
		}
		out = append(out, m[0].Data)
	}
	return out
}

func TestSaveRestoreKV(t *testing.T) {
	skipWithoutKVM(t)
	g, err := New(kvConfig(64<<20, 2))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { g.Close() }()
	lr := newLineReader()
	g.Console().SetOutput(lr.sink)
	mustResume(t, g)
	for i := 1; i <= 50; i++ {
		expect(t, ask(t, g, lr, fmt.Sprintf("a:%d SET key%d value%d", i, i, i)), fmt.Sprintf("a:%d OK", i))
	}
	mustPause(t, g)
	before := vcpuTSCs(t, g)
	g = restoreInto(t, g)
	after := vcpuTSCs(t, g)
	for i := range before {
		if after[i] < before[i] {
			t.Fatalf("vCPU %d TSC went back across restore: %d -> %d", i, before[i], after[i])
		}
	}
	g.Console().SetOutput(lr.sink)
	mustResume(t, g)
	for i := 1; i <= 50; i++ {
		expect(t, ask(t, g, lr, fmt.Sprintf("b:%d GET key%d", i, i)), fmt.Sprintf("b:%d OK value%d", i, i))
	}
	// the dedup record survived: a retry of a:50 is answered, not applied
	expect(t, ask(t, g, lr, "a:50 SET key50 other"), "a:50 OK")
	expect(t, ask(t, g, lr, "b:51 GET key50"), "b:51 OK value50")
	mustPause(t, g)
	later := vcpuTSCs(t, g)
	for i := range later {
		if later[i] < after[i] {
			t.Fatalf("vCPU %d TSC went back after resume: %d -> %d", i, after[i], later[i])
		}
	}
	if err := g.Err(); err != nil {
		t.Fatal(err)
	}
}

func TestSaveRestoreCycles(t *testing.T) {
	skipWithoutKVM(t)
	g, err := New(kvConfig(64<<20, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { g.Close() }()
	lr := newLineReader()
	g.Console().SetOutput(lr.sink)
	mustResume(t, g)
	var lastTSC uint64
	for i := 1; i <= 20; i++ {
		expect(t, ask(t, g, lr, fmt.Sprintf("c:%d SET k%d v%d", 2*i, i, i)), fmt.Sprintf("c:%d OK", 2*i))
		mustPause(t, g)
		tsc := vcpuTSCs(t, g)[0]
		if tsc < lastTSC {
			t.Fatalf("cycle %d: TSC went back: %d -> %d", i, lastTSC, tsc)
		}
		lastTSC = tsc
		g = restoreInto(t, g)
		g.Console().SetOutput(lr.sink)
		mustResume(t, g)
		expect(t, ask(t, g, lr, fmt.Sprintf("c:%d GET k%d", 2*i+1, i)), fmt.Sprintf("c:%d OK v%d", 2*i+1, i))
	}
	for i := 1; i <= 20; i++ {
		expect(t, ask(t, g, lr, fmt.Sprintf("d:%d GET k%d", i, i)), fmt.Sprintf("d:%d OK v%d", i, i))
	}
}

func TestLoadStateRejectsBadInput(t *testing.T) {
	skipWithoutKVM(t)
	g, err := New(kvConfig(64<<20, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	st, err := g.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	// Not paused: refused.
	mustResume(t, g)
	if err := g.LoadState(st); !errors.Is(err, guest.ErrNotPaused) {
		t.Fatalf("load while running: %v", err)
	}
	if _, err := g.SaveState(); !errors.Is(err, guest.ErrNotPaused) {
		t.Fatalf("save while running: %v", err)
	}
	mustPause(t, g)
	corrupt := func(f func(*guest.MachineState)) guest.MachineState {
		c := guest.MachineState{Kind: st.Kind, Devices: append([]guest.DeviceState(nil), st.Devices...)}
		f(&c)
		return c
	}
	cases := map[string]guest.MachineState{
		"kind":     corrupt(func(s *guest.MachineState) { s.Kind = "synth" }),
		"version":  corrupt(func(s *guest.MachineState) { s.Devices[1].Version = 99 }),
		"garbage":  corrupt(func(s *guest.MachineState) { s.Devices[1].Fields = []byte{0xc1, 0xff, 0x00} }),
		"missing":  corrupt(func(s *guest.MachineState) { s.Devices = s.Devices[:1] }),
		"unknown":  corrupt(func(s *guest.MachineState) { s.Devices = append(s.Devices, guest.DeviceState{Name: "gpu"}) }),
		"vcpu idx": corrupt(func(s *guest.MachineState) { s.Devices[1].Instance = 7 }),
	}
	small, err := NewEmpty(kvConfig(32<<20, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	for name, c := range cases {
		if err := g.LoadState(c); !errors.Is(err, guest.ErrState) {
			t.Errorf("%s: got %v, want ErrState", name, err)
		}
	}
	if err := small.LoadState(st); !errors.Is(err, guest.ErrState) {
		t.Errorf("state of a 64MiB guest into a 32MiB one: got %v, want ErrState", err)
	}
	// The guest still works after the refusals.
	lr := newLineReader()
	g.Console().SetOutput(lr.sink)
	mustResume(t, g)
	expect(t, ask(t, g, lr, "z:1 SET a b"), "z:1 OK")
}

// StateSections (what a sender lists in its handshake, and a receiver
// checks) is exactly the sections SaveState writes, with their versions:
// with and without a disk, with and without a network card.
func TestStateSectionsMatchSaveState(t *testing.T) {
	skipWithoutKVM(t)
	for _, c := range []struct {
		name       string
		disk, card bool
	}{{"plain", false, false}, {"disk", true, false}, {"card", false, true}, {"disk and card", true, true}} {
		t.Run(c.name, func(t *testing.T) {
			cfg := kvConfig(32<<20, 1)
			var opts Options
			if c.card {
				cfg.Net.IP = "10.77.0.10/24"
			}
			if c.disk {
				d, err := block.Open(filepath.Join(t.TempDir(), "disk.img"), block.Options{})
				if err != nil {
					t.Fatal(err)
				}
				opts.Disk = d
			}
			g, err := NewWithOptions(cfg, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			if (guest.NICOf(g) != nil) != c.card {
				t.Fatalf("card %v, but the guest has one: %v", c.card, guest.NICOf(g) != nil)
			}
			listed := guest.StateSectionsOf(g)
			if listed == nil {
				t.Fatal("a kvm guest lists no sections (not a guest.StateSectioner)")
			}
			mustResume(t, g)
			mustPause(t, g)
			ms, err := g.SaveState()
			if err != nil {
				t.Fatal(err)
			}
			saved := map[string]uint32{}
			for _, d := range ms.Devices {
				saved[d.Name] = d.Version
			}
			if !maps.Equal(listed, saved) {
				t.Fatalf("StateSections %v, SaveState wrote %v", listed, saved)
			}
			if _, has := listed[stateDisk]; has != c.disk {
				t.Fatalf("disk %v, but %s listed: %v", c.disk, stateDisk, has)
			}
		})
	}
}
