package postcopy

import (
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/uffd"
)

// Available reports whether regions can be served by faults: nil, or an
// error wrapping uffd.ErrUnavailable that says why in one line (no
// userfaultfd, not permitted, memory of a kind it does not take). It is
// the check a destination makes when a migration asks for post-copy,
// before any page moves, so a refusal leaves the migration precopy-only.
// It registers the regions on a descriptor of its own and releases them;
// call it while the guest is paused (a vCPU touching a never-populated
// page meanwhile would wait for the release, microseconds).
func Available(regions []guest.Region) error {
	fd, err := uffd.Open()
	if err != nil {
		return err
	}
	defer fd.Close()
	for _, r := range regions {
		if err := fd.Register(r.Mem); err != nil {
			return err
		}
		if err := fd.Unregister(r.Mem); err != nil {
			return err
		}
	}
	return nil
}
