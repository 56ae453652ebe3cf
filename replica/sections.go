package replica

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"unicode"

	"github.com/tandemvm/tandem/guest"
)

// Device sections in the handshake (docs/PAIR-AND-MIGRATION.md, "Device
// sections"). A sender lists the sections its guest's state carries
// (Hello.Devices); a receiver refuses, in one line, a section it does
// not load at that version, before the sender pauses anything, and says
// it checked (HelloReply.SectionsChecked). A receiver older than these
// fields says nothing: it loads exactly legacySections, so the sender
// itself refuses to stream it a guest carrying any other section. No
// downgrade is offered: leaving a section out would hand the receiver a
// different guest (a card, and the address clients use, gone).

// legacySections are the device sections, with versions, every build
// before section checks loads: the schema dump of the build before the
// first new section (synth-nic), kept as
// internal/schemacheck/testdata/schema-before-nic.json. Frozen: a
// section added later is never in it.
var legacySections = map[string]map[string]uint32{
	"synth": {"synth-console": 1, "synth-disk": 1, "synth-machine": 1, "synth-vcpu": 1},
	"kvm":   {"kvm-clock": 1, "kvm-machine": 1, "kvm-pvdisk": 1, "kvm-vcpu": 1, "uart-8250": 1},
}

// LegacySections is a copy of the sections every receiver loads, by
// guest kind (a test holds it to the old build's dump).
func LegacySections() map[string]map[string]uint32 {
	out := map[string]map[string]uint32{}
	for k, v := range legacySections {
		out[k] = maps.Clone(v)
	}
	return out
}

// maxHelloDevices bounds the sections a Hello may list (a guest has a
// handful; a vCPU is one section name however many instances).
const maxHelloDevices = 64

// sections is the device sections this receiver loads for kind.
func (r *Receiver) sections(kind string) (map[string]uint32, bool) {
	if r.Sections != nil {
		return r.Sections(kind)
	}
	return guest.StateVersionsOf(kind)
}

// checkSections refuses a Hello listing a section this receiver does not
// load at the listed version. It checks nothing (and the reply says so)
// when no backend of the kind registered its sections here.
func (r *Receiver) checkSections(h Hello) error {
	if len(h.Devices) > maxHelloDevices {
		return fmt.Errorf("%w: %d device sections listed (at most %d)", ErrProtocol, len(h.Devices), maxHelloDevices)
	}
	known, ok := r.sections(h.Kind)
	if !ok {
		return nil
	}
	for _, name := range slices.Sorted(maps.Keys(h.Devices)) {
		v, have := known[name]
		switch {
		case !have:
			return fmt.Errorf("the guest's state carries device section %q (version %d), which this build (%s) does not load; it loads %s",
				name, h.Devices[name], r.Build, listSections(known))
		case v != h.Devices[name]:
			return fmt.Errorf("the guest's state carries device section %q version %d; this build (%s) loads version %d",
				name, h.Devices[name], r.Build, v)
		}
	}
	return nil
}

// checkUnchecked is the sender's check of a receiver that did not say it
// checked the sections (one older than section checks, or without the
// kind's backend): every section must be one it loads for sure.
func checkUnchecked(addr string, reply HelloReply, h Hello) error {
	legacy := legacySections[h.Kind]
	for _, name := range slices.Sorted(maps.Keys(h.Devices)) {
		if v, ok := legacy[name]; !ok || v != h.Devices[name] {
			return fmt.Errorf("%s (build %q) does not check device sections, so it predates device section %q (version %d) that this guest's state carries, and would fail to load it after the guest was paused; it loads only %s. Upgrade it, or run the guest without that device",
				addr, reply.Build, name, h.Devices[name], listSections(legacy))
		}
	}
	return nil
}

// listSections is "a 1, b 2" (sorted), for one-line refusals.
func listSections(m map[string]uint32) string {
	if len(m) == 0 {
		return "no sections of this kind"
	}
	parts := make([]string, 0, len(m))
	for _, name := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s %d", name, m[name]))
	}
	return strings.Join(parts, ", ")
}

// oneLine is a peer's text with every control character (a newline, an
// escape sequence) shown as a space, so a refusal quoting it stays one
// plain line whatever the peer sent.
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
}
