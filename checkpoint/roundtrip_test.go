package checkpoint

import (
	"bytes"
	"reflect"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	for _, opts := range []Options{
		{},
		{Compression: CompressNone},
		{Compression: CompressBest, BatchPages: 7},
		{CacheBytes: -1},
		{CacheBytes: 16 * 4096}, // collisions and evictions
	} {
		t.Run(opts.Compression.String(), func(t *testing.T) {
			stream, g := writeStream(t, opts, 5, 1)
			tgt := NewMemTarget()
			h, err := Restore(bytes.NewReader(stream), Limits{}, tgt)
			if err != nil {
				t.Fatal(err)
			}
			if h.Version != Current || h.Kind != "synth" || h.Build != "test" || len(h.Regions) != 2 {
				t.Fatalf("header %+v", h)
			}
			for idx, want := range g.pages {
				got := tgt.Page(idx)
				if got == nil {
					got = zeroPage[:]
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("page %d differs", idx)
				}
			}
			for _, idx := range tgt.PageIndices() {
				if _, ok := g.pages[idx]; !ok {
					t.Fatalf("page %d was never written", idx)
				}
			}
			if !reflect.DeepEqual(tgt.Devices(), g.state(5)) {
				t.Fatalf("devices %+v", tgt.Devices())
			}
			if len(tgt.Disk()) != 5 || len(tgt.Epochs()) != 5 || tgt.Staged() {
				t.Fatalf("disk %d epochs %d staged %v", len(tgt.Disk()), len(tgt.Epochs()), tgt.Staged())
			}
		})
	}
}

// Encoding must be deterministic: the same input gives the same bytes.
func TestDeterministic(t *testing.T) {
	a, _ := writeStream(t, Options{}, 3, 7)
	b, _ := writeStream(t, Options{}, 3, 7)
	if !bytes.Equal(a, b) {
		t.Fatal("two encodings of the same input differ")
	}
}
