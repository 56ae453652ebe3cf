package schemacheck

import (
	"strings"
	"testing"
)

func TestCheckSchemas(t *testing.T) {
	cur := Current()
	if p := Check(cur, cur); len(p) != 0 {
		t.Fatalf("a build is incompatible with itself: %v", p)
	}
	clone := func() Dump {
		d := cur
		d.Devices = map[string]map[string]uint32{}
		for k, v := range cur.Devices {
			m := map[string]uint32{}
			for n, ver := range v {
				m[n] = ver
			}
			d.Devices[k] = m
		}
		return d
	}
	bumped := clone()
	bumped.Devices["kvm"]["kvm-vcpu"]++
	gone := clone()
	delete(gone.Devices["synth"], "synth-console")
	added := clone()
	added.Devices["synth"]["synth-extra"] = 1
	newer := clone()
	newer.Format.MinReadable, newer.Format.MinWritable, newer.Format.Current = 2, 2, 2
	for _, tc := range []struct {
		name string
		nw   Dump
		want string
	}{
		{"version bump", bumped, `"kvm-vcpu" changed version`},
		{"device removed", gone, `"synth-console" (version 1) is unknown`},
		{"device added", added, `"synth-extra" (version 1) is new`},
		{"format moved on", newer, "older than the oldest the new one reads"},
	} {
		p := Check(cur, tc.nw)
		if !strings.Contains(strings.Join(p, "\n"), tc.want) {
			t.Errorf("%s: problems %v, want one saying %q", tc.name, p, tc.want)
		}
	}
}
