package synth

import (
	"errors"
	"testing"

	"github.com/tandemvm/tandem/guest"
)

// FuzzLoadState feeds arbitrary device fields to LoadState: it must refuse
// them with ErrState (or accept them) and never panic.
func FuzzLoadState(f *testing.F) {
	g, err := New(kvConfig())
	if err != nil {
		f.Fatal(err)
	}
	defer g.Close()
	good, err := g.SaveState()
	if err != nil {
		f.Fatal(err)
	}
	for i, d := range good.Devices {
		f.Add(i, d.Fields)
	}
	f.Add(1, []byte{0xdb, 0xff, 0xff, 0xff, 0xff}) // a 4 GiB string header
	f.Fuzz(func(t *testing.T, dev int, fields []byte) {
		s := guest.MachineState{Kind: good.Kind, Devices: append([]guest.DeviceState(nil), good.Devices...)}
		if dev < 0 || dev >= len(s.Devices) {
			return
		}
		s.Devices[dev].Fields = fields
		if err := g.LoadState(s); err != nil && !errors.Is(err, guest.ErrState) {
			t.Fatalf("LoadState: %v", err)
		}
	})
}
