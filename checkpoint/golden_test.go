package checkpoint

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

var updateGolden = flag.Bool("update-golden", false, "rewrite testdata/golden-v*.stream (only when a new format version is added)")

// Streams written by this and earlier format versions are kept in
// testdata and must load forever. The writer's output for the fixed input
// must also stay byte-identical for a given version: a change means the
// format changed without a new version number.
func TestGoldenStreams(t *testing.T) {
	for v := MinReadable; v <= Current; v++ {
		if _, ok := lookupVersion(v); !ok {
			continue
		}
		// Uncompressed: byte-identical output is required. zstd-compressed:
		// must load (zstd's output may change with the library version).
		for _, g := range []struct {
			suffix string
			opts   Options
			exact  bool
		}{{"", Options{Version: v, Compression: CompressNone}, true}, {"-zstd", Options{Version: v}, false}} {
			path := filepath.Join("testdata", fmt.Sprintf("golden-v%d%s.stream", v, g.suffix))
			got := fuzzStream(t, g.opts)
			if *updateGolden {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("golden stream for version %d: %v", v, err)
			}
			tgt := NewMemTarget()
			if _, err := Restore(bytes.NewReader(want), Limits{}, tgt); err != nil {
				t.Fatalf("%s no longer loads: %v", path, err)
			}
			if len(tgt.Epochs()) != 2 || len(tgt.PageIndices()) == 0 {
				t.Fatalf("%s: %d epochs, %d pages", path, len(tgt.Epochs()), len(tgt.PageIndices()))
			}
			if g.exact && !bytes.Equal(got, want) {
				t.Fatalf("writing version %d no longer gives %s: the format changed without a new version", v, path)
			}
		}
	}
}

// TestOlderWriterStreams: streams an older writer produced for the same
// format version, with other encoding choices, must load too.
// golden-v1-raw.stream is version 1 without compression as written before
// uncompressed pages went in the stored tail (2026-12-01): raw entries.
func TestOlderWriterStreams(t *testing.T) {
	for _, name := range []string{"golden-v1-raw.stream"} {
		data, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			t.Fatal(err)
		}
		rep, err := Analyze(bytes.NewReader(data))
		if err != nil || !rep.Complete {
			t.Fatalf("%s: analyse: %v (complete %v)", name, err, rep.Complete)
		}
		if rep.Totals.Pages.Raw == 0 {
			t.Fatalf("%s holds no raw pages: %+v", name, rep.Totals.Pages)
		}
		tgt := NewMemTarget()
		if _, err := Restore(bytes.NewReader(data), Limits{}, tgt); err != nil {
			t.Fatalf("%s no longer loads: %v", name, err)
		}
		if len(tgt.Epochs()) != 2 || len(tgt.PageIndices()) == 0 {
			t.Fatalf("%s: %d epochs, %d pages", name, len(tgt.Epochs()), len(tgt.PageIndices()))
		}
	}
}
