package guest

import (
	"maps"
	"sync"
)

// Device sections a stream carries (issue 14: the first section a new
// build adds, synth-nic). A receiver must know every section of the
// state it is sent, at its version; a section a guest saves only with
// some feature (a disk, a network card) is optional: streams of guests
// without the feature lack it and load in builds that do not know it.

// StateSectioner is implemented by guests that can say, before any
// pause, which device sections their saved state carries and at which
// versions (a sender lists them in its handshake, so a receiver that
// does not know one refuses before anything is paused).
type StateSectioner interface {
	StateSections() map[string]uint32
}

// StateSectionsOf is g's device sections (nil when g cannot say).
func StateSectionsOf(g Guest) map[string]uint32 {
	if s, ok := g.(StateSectioner); ok {
		return s.StateSections()
	}
	return nil
}

// versions is every registered backend's loadable sections, by kind.
var versions struct {
	mu   sync.Mutex
	kind map[string]func() map[string]uint32
}

// RegisterStateVersions records the device sections, with versions, the
// backend of kind loads (called once per kind, from an init).
func RegisterStateVersions(kind string, f func() map[string]uint32) {
	versions.mu.Lock()
	defer versions.mu.Unlock()
	if versions.kind == nil {
		versions.kind = map[string]func() map[string]uint32{}
	}
	versions.kind[kind] = f
}

// StateVersionsOf is the device sections this build loads for guests of
// kind; ok is false when no backend of kind registered them.
func StateVersionsOf(kind string) (map[string]uint32, bool) {
	versions.mu.Lock()
	f := versions.kind[kind]
	versions.mu.Unlock()
	if f == nil {
		return nil, false
	}
	return maps.Clone(f()), true
}
