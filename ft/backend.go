package ft

import (
	"fmt"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/guest/synth"
)

// DefaultGuestKind is kvm when /dev/kvm works and the micro-guest image is
// built, the software guest otherwise.
func DefaultGuestKind() string {
	if kvm.Available() != nil {
		return synth.Kind
	}
	if _, err := kvm.DefaultImage(); err != nil {
		return synth.Kind
	}
	return kvm.Kind
}

// BootGuest builds a guest that boots its workload on the first Resume;
// dirty is the dirty-log method of a KVM guest (guests built to receive an
// image use the default).
func BootGuest(kind string, cfg guest.Config, dirty kvm.DirtyMethod) (guest.Guest, error) {
	switch kind {
	case synth.Kind:
		return synth.New(cfg)
	case kvm.Kind:
		return kvm.NewWithOptions(cfg, kvm.Options{DirtyMethod: dirty})
	}
	return nil, fmt.Errorf("unknown guest kind %q: want kvm or synth", kind)
}

// EmptyGuest builds a paused guest with zero memory that will not boot: a
// received image is written into it and its state loaded.
func EmptyGuest(kind string, cfg guest.Config) (guest.Guest, error) {
	switch kind {
	case synth.Kind:
		return synth.New(cfg)
	case kvm.Kind:
		return kvm.NewEmpty(cfg)
	}
	return nil, fmt.Errorf("unknown guest kind %q: this build runs kvm and synth guests", kind)
}

// guestInfo is what status says about the guest itself.
type guestInfo = api.GuestInfo

func describeGuest(g guest.Guest, cfg guest.Config) guestInfo {
	gi := guestInfo{Kind: g.Kind(), Memory: guest.FormatSize(cfg.Memory), VCPUs: cfg.VCPUs, Workload: cfg.Workload.Kind, Paused: g.Paused(), DiskPath: cfg.Disk}
	if g.Kind() == kvm.Kind {
		gi.Flavour = kvm.Flavour()
	}
	if d, ok := g.(guest.DiskImage); ok {
		gi.DiskDroppedWrites = d.DiskDropped()
	}
	if w, ok := g.(guest.PageWriteCounter); ok {
		gi.PageWrites = w.PageWrites()
	}
	return gi
}
