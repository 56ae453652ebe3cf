// Package schemacheck tells whether two builds of Tandem can migrate to
// each other: a Dump is one build's stream format versions and device
// state schemas (what `tandem schema dump` prints), and Check lists what
// stops streams of one loading in the other.
package schemacheck

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"slices"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/version"
)

// Dump is the stream format versions a build reads and writes and every
// device's state schema version per guest kind. Two dumps, one per build,
// tell whether streams of one load in the other.
type Dump struct {
	Build   string                       `json:"build"`
	Format  FormatVersions               `json:"format"`
	Devices map[string]map[string]uint32 `json:"devices"` // guest kind -> device -> version
	// Optional lists, per guest kind, the devices a guest saves only
	// with a feature (a disk, a network card): streams of guests
	// without it lack the section. Dumps of builds before the field
	// have none (every device counts as always saved).
	Optional map[string][]string `json:"optional,omitempty"`
}

// FormatVersions are a build's checkpoint stream format versions.
type FormatVersions struct {
	Current     uint16 `json:"current"`
	MinReadable uint16 `json:"min_readable"`
	MinWritable uint16 `json:"min_writable"`
}

// Current is this build's dump.
func Current() Dump {
	return Dump{
		Build: version.Build(),
		Format: FormatVersions{uint16(checkpoint.Current), uint16(checkpoint.MinReadable),
			uint16(checkpoint.MinWritable)},
		Devices: map[string]map[string]uint32{synth.Kind: synth.StateVersions(), kvm.Kind: kvm.StateVersions()},
		// A device not listed here counts as saved by every guest of
		// its kind (the stricter rule).
		Optional: map[string][]string{synth.Kind: synth.OptionalDevices(), kvm.Kind: kvm.OptionalDevices()},
	}
}

// Read reads a dump a build wrote.
func Read(path string) (Dump, error) {
	var d Dump
	b, err := os.ReadFile(path)
	if err != nil {
		return d, err
	}
	if err := json.Unmarshal(b, &d); err != nil {
		return d, fmt.Errorf("%s: not a schema dump: %v", path, err)
	}
	if d.Format.Current == 0 || d.Devices == nil {
		return d, fmt.Errorf("%s: not a schema dump (no format or devices)", path)
	}
	return d, nil
}

// Check lists what stops streams of old from loading in nw (a migration
// from the old build to the new) or nw from writing what old reads (a
// migration back), and notes what holds for some guests only. This
// build's backends accept only the current version of each device, so
// any changed version is a problem until a backend learns to load the
// older one.
//
// The rule for a device section nw has and old lacks: an optional one
// (nw's Optional) is compatible. Old streams lack it and load in nw
// (their guests have no such device); nw streams a guest that carries
// it only to a receiver that loads it, and refuses an old receiver in
// one line at the handshake (replica's section check), while guests
// without it migrate both ways. A new device every guest saves is a
// problem: old streams lack it and the old build refuses every stream.
func Check(old, nw Dump) (problems, notes []string) {
	var out []string
	if old.Format.Current < nw.Format.MinReadable {
		out = append(out, fmt.Sprintf("stream format %d of the old build is older than the oldest the new one reads (%d)", old.Format.Current, nw.Format.MinReadable))
	}
	if nw.Format.MinWritable > old.Format.Current {
		out = append(out, fmt.Sprintf("the new build cannot write format %d, the newest the old build reads (it writes %d and up)", old.Format.Current, nw.Format.MinWritable))
	}
	for _, kind := range sortedKeys(old.Devices) {
		nd, ok := nw.Devices[kind]
		if !ok {
			out = append(out, fmt.Sprintf("guest kind %q is gone in the new build", kind))
			continue
		}
		p, n := checkDevices(kind, old.Devices[kind], nd, nw.Optional[kind])
		out = append(out, p...)
		notes = append(notes, n...)
	}
	return out, notes
}

// checkDevices compares one guest kind's device versions.
func checkDevices(kind string, devs, nd map[string]uint32, optional []string) (out, notes []string) {
	for _, name := range sortedKeys(devs) {
		ov := devs[name]
		nv, ok := nd[name]
		switch {
		case !ok:
			out = append(out, fmt.Sprintf("%s device %q (version %d) is unknown to the new build", kind, name, ov))
		case nv != ov:
			out = append(out, fmt.Sprintf("%s device %q changed version %d -> %d", kind, name, ov, nv))
		}
	}
	for _, name := range sortedKeys(nd) {
		if _, ok := devs[name]; ok {
			continue
		}
		if slices.Contains(optional, name) {
			notes = append(notes, fmt.Sprintf("%s device %q (version %d) is new and optional: old streams lack it and load; a guest that carries it streams only to a build that loads it (an older receiver is refused at the handshake, in one line), guests without it migrate both ways", kind, name, nd[name]))
			continue
		}
		out = append(out, fmt.Sprintf("%s device %q (version %d) is new and saved by every guest: old streams lack it, and the old build refuses every stream of the new one", kind, name, nd[name]))
	}
	return out, notes
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }
