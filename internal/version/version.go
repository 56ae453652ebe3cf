// Package version names this build in stream headers, handshakes and
// status, so a failed migration between two builds says which two.
package version

import (
	"runtime"
	"runtime/debug"
	"sync"
)

// Release is Tandem's release; streams and handshakes carry it.
const Release = "0.1.0-dev"

var build = sync.OnceValue(func() string {
	s := "tandem/" + Release + " " + runtime.Version()
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, kv := range bi.Settings {
			if kv.Key == "vcs.revision" && len(kv.Value) >= 12 {
				s += " " + kv.Value[:12]
			}
		}
	}
	return s
})

// Build returns the build string, e.g. "tandem/0.1.0-dev go1.26.8".
func Build() string { return build() }
