package checkpoint

import (
	"fmt"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/tandemvm/tandem/guest"
)

// The DEVICE section's msgpack schema. These wire structs, not
// guest.MachineState, define the bytes: renaming a Go field in guest must
// not change the format. Keys are short and fixed; add new keys, never
// rename or reuse one. Fields are opaque msgpack bytes owned by each
// device; this package never looks inside them.
type wireMachine struct {
	Kind    string       `codec:"k"`
	Devices []wireDevice `codec:"d"`
}

type wireDevice struct {
	Name        string           `codec:"n"`
	Instance    uint32           `codec:"i"`
	Version     uint32           `codec:"v"`
	Fields      []byte           `codec:"f"`
	Subsections []wireSubsection `codec:"s,omitempty"`
}

type wireSubsection struct {
	Name    string `codec:"n"`
	Version uint32 `codec:"v"`
	Fields  []byte `codec:"f"`
}

// msgpackHandle writes the new msgpack spec (bin for []byte, str for
// strings). A Handle is safe for concurrent use once configured.
var msgpackHandle = func() *codec.MsgpackHandle {
	h := &codec.MsgpackHandle{}
	h.WriteExt = true
	// Bound the initial allocation a length prefix can cause; slices grow
	// as elements actually decode.
	h.MaxInitLen = 4096
	// Nesting is bounded so hostile input cannot recurse deeply; device
	// Fields are opaque bytes, so the schema itself nests three levels.
	h.MaxDepth = 32
	return h
}()

func encodeMachine(ms guest.MachineState) ([]byte, error) {
	w := wireMachine{Kind: ms.Kind, Devices: make([]wireDevice, len(ms.Devices))}
	for i, d := range ms.Devices {
		wd := wireDevice{Name: d.Name, Instance: d.Instance, Version: d.Version, Fields: d.Fields}
		for _, s := range d.Subsections {
			wd.Subsections = append(wd.Subsections, wireSubsection(s))
		}
		w.Devices[i] = wd
	}
	var out []byte
	if err := codec.NewEncoderBytes(&out, msgpackHandle).Encode(&w); err != nil {
		return nil, fmt.Errorf("%w: encode device state: %v", ErrBadInput, err)
	}
	return out, nil
}

// decodeMachine decodes and validates a DEVICE body. The msgpack decoder is
// third-party code fed hostile bytes; a panic in it becomes ErrCorrupt
// rather than taking down the receiver.
func decodeMachine(b []byte, lim Limits) (ms guest.MachineState, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: device state: decoder panic: %v", ErrCorrupt, p)
		}
	}()
	var w wireMachine
	d := codec.NewDecoderBytes(b, msgpackHandle)
	if err := d.Decode(&w); err != nil {
		return ms, fmt.Errorf("%w: device state: %v", ErrCorrupt, err)
	}
	if n := d.NumBytesRead(); n != len(b) {
		return ms, fmt.Errorf("%w: device state: %d trailing bytes", ErrCorrupt, len(b)-n)
	}
	if len(w.Devices) > lim.MaxDevices {
		return ms, fmt.Errorf("%w: %d devices (limit %d)", ErrTooLarge, len(w.Devices), lim.MaxDevices)
	}
	ms.Kind = w.Kind
	if len(w.Devices) > 0 {
		ms.Devices = make([]guest.DeviceState, len(w.Devices))
	}
	for i, wd := range w.Devices {
		if wd.Name == "" {
			return ms, fmt.Errorf("%w: device %d has no name", ErrCorrupt, i)
		}
		ds := guest.DeviceState{Name: wd.Name, Instance: wd.Instance, Version: wd.Version, Fields: wd.Fields}
		for _, s := range wd.Subsections {
			ds.Subsections = append(ds.Subsections, guest.Subsection(s))
		}
		ms.Devices[i] = ds
	}
	return ms, nil
}
