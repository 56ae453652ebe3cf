package checkpoint

import (
	"bytes"
	"reflect"
	"testing"

	"github.com/cespare/xxhash/v2"
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

// hashCheckTarget is a MemTarget that checks what the Reader tells a
// HashedTarget: each page's XXH64 and whether it is all zero.
type hashCheckTarget struct {
	*MemTarget
	t            *testing.T
	zero, hashed int
}

func (h *hashCheckTarget) StorePageHashed(index uint64, data []byte, sum uint64, zero bool) error {
	if zero != isZeroPage(data) {
		h.t.Fatalf("page %d: zero %v, content says %v", index, zero, !zero)
	}
	if zero {
		h.zero++
	} else if want := xxhash.Sum64(data); sum != want {
		h.t.Fatalf("page %d: sum %x, want %x", index, sum, want)
	} else {
		h.hashed++
	}
	return h.MemTarget.StorePage(index, data)
}

// A HashedTarget gets every page through StorePageHashed, with the hash
// the epoch digest used, and ends with the same content as a plain one.
func TestHashedTarget(t *testing.T) {
	for _, opts := range []Options{{}, {Compression: CompressNone}} {
		stream, _ := writeStream(t, opts, 5, 3)
		plain := NewMemTarget()
		if _, err := Restore(bytes.NewReader(stream), Limits{}, plain); err != nil {
			t.Fatal(err)
		}
		ht := &hashCheckTarget{MemTarget: NewMemTarget(), t: t}
		if _, err := Restore(bytes.NewReader(stream), Limits{}, ht); err != nil {
			t.Fatal(err)
		}
		if ht.zero == 0 || ht.hashed == 0 {
			t.Fatalf("%d zero and %d hashed pages: the stream should have both", ht.zero, ht.hashed)
		}
		if !reflect.DeepEqual(plain.PageIndices(), ht.PageIndices()) {
			t.Fatal("hashed target holds other pages")
		}
		for _, idx := range plain.PageIndices() {
			if !bytes.Equal(plain.Page(idx), ht.Page(idx)) {
				t.Fatalf("page %d differs", idx)
			}
		}
	}
}
