package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest/kvm"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/version"
)

func init() {
	register("schema", "dump this build's stream and device-state schemas, or check two dumps for compatibility", cmdSchema)
}

// schemaDump is what `tandem schema dump` prints: the stream format
// versions this build reads and writes and every device's state schema
// version per guest kind. Two dumps, one per build, tell whether streams
// of one load in the other.
type schemaDump struct {
	Build   string                       `json:"build"`
	Format  formatVersions               `json:"format"`
	Devices map[string]map[string]uint32 `json:"devices"` // guest kind -> device -> version
}

type formatVersions struct {
	Current     uint16 `json:"current"`
	MinReadable uint16 `json:"min_readable"`
	MinWritable uint16 `json:"min_writable"`
}

func currentSchema() schemaDump {
	return schemaDump{
		Build: version.Build(),
		Format: formatVersions{uint16(checkpoint.Current), uint16(checkpoint.MinReadable),
			uint16(checkpoint.MinWritable)},
		Devices: map[string]map[string]uint32{synth.Kind: synth.StateVersions(), kvm.Kind: kvm.StateVersions()},
	}
}

func cmdSchema(args []string) error {
	if len(args) == 0 {
		return usagef("want 'schema dump' or 'schema check OLD.json NEW.json'")
	}
	switch args[0] {
	case "dump":
		if len(args) != 1 {
			return usagef("schema dump takes no arguments")
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(currentSchema())
	case "check":
		if len(args) != 3 {
			return usagef("want 'schema check OLD.json NEW.json' (dumps of the two builds)")
		}
		old, err := readSchema(args[1])
		if err != nil {
			return err
		}
		nw, err := readSchema(args[2])
		if err != nil {
			return err
		}
		problems := checkSchemas(old, nw)
		if len(problems) == 0 {
			fmt.Printf("compatible: streams of %s load in %s, and %s can write them a stream %s reads\n", old.Build, nw.Build, nw.Build, old.Build)
			return nil
		}
		for _, p := range problems {
			fmt.Println("incompatible:", p)
		}
		return fmt.Errorf("%d incompatibilities between %s and %s", len(problems), old.Build, nw.Build)
	}
	return usagef("unknown schema subcommand %q: want dump or check", args[0])
}

func readSchema(path string) (schemaDump, error) {
	var d schemaDump
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

// checkSchemas lists what stops streams of old from loading in new (a
// migration from the old build to the new) or new from writing what old
// reads (a migration back). This build's backends accept only the current
// version of each device, so any changed version is a problem until a
// backend learns to load the older one.
func checkSchemas(old, nw schemaDump) []string {
	var out []string
	if old.Format.Current < nw.Format.MinReadable {
		out = append(out, fmt.Sprintf("stream format %d of the old build is older than the oldest the new one reads (%d)", old.Format.Current, nw.Format.MinReadable))
	}
	if nw.Format.MinWritable > old.Format.Current {
		out = append(out, fmt.Sprintf("the new build cannot write format %d, the newest the old build reads (it writes %d and up)", old.Format.Current, nw.Format.MinWritable))
	}
	kinds := make([]string, 0, len(old.Devices))
	for k := range old.Devices {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, kind := range kinds {
		devs := old.Devices[kind]
		nd, ok := nw.Devices[kind]
		if !ok {
			out = append(out, fmt.Sprintf("guest kind %q is gone in the new build", kind))
			continue
		}
		names := make([]string, 0, len(devs))
		for n := range devs {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, name := range names {
			ov := devs[name]
			nv, ok := nd[name]
			switch {
			case !ok:
				out = append(out, fmt.Sprintf("%s device %q (version %d) is unknown to the new build", kind, name, ov))
			case nv != ov:
				out = append(out, fmt.Sprintf("%s device %q changed version %d -> %d", kind, name, ov, nv))
			}
		}
		for name, nv := range nd {
			if _, ok := devs[name]; !ok {
				out = append(out, fmt.Sprintf("%s device %q (version %d) is new: the old build refuses streams that carry it", kind, name, nv))
			}
		}
	}
	return out
}
