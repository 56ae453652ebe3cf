package checkpoint

import (
	"bytes"
	"errors"
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

// keepingTarget is a MemTarget that, as a PageBatcher may, keeps the
// slices StorePage gives it and copies them only at FlushPages; every
// copy it makes is checked against a copy taken at StorePage.
type keepingTarget struct {
	*MemTarget
	t        *testing.T
	kept     []Page
	taken    [][]byte
	flushes  int
	batching bool
	failAt   int // StorePage fails on this call (1-based; 0: never)
	stores   int
}

func (k *keepingTarget) BatchPages() {
	if k.batching {
		k.t.Fatal("BatchPages twice without FlushPages")
	}
	k.batching = true
}

func (k *keepingTarget) StorePage(index uint64, data []byte) error {
	if !k.batching {
		k.t.Fatalf("StorePage(%d) outside BatchPages and FlushPages", index)
	}
	if k.stores++; k.stores == k.failAt {
		return errors.New("store failed")
	}
	k.kept = append(k.kept, Page{Index: index, Data: data})
	k.taken = append(k.taken, bytes.Clone(data))
	return nil
}

func (k *keepingTarget) PageBase(index uint64) ([]byte, error) {
	if len(k.kept) > 0 {
		k.t.Fatalf("PageBase(%d) with %d pages not flushed", index, len(k.kept))
	}
	return k.MemTarget.PageBase(index)
}

func (k *keepingTarget) EndEpoch(e EpochEnd) error {
	if len(k.kept) > 0 {
		k.t.Fatalf("EndEpoch with %d pages not flushed", len(k.kept))
	}
	return k.MemTarget.EndEpoch(e)
}

func (k *keepingTarget) FlushPages() {
	k.flushes++
	k.batching = false
	for i, p := range k.kept {
		if !bytes.Equal(p.Data, k.taken[i]) {
			k.t.Fatalf("page %d changed between StorePage and FlushPages", p.Index)
		}
		if err := k.MemTarget.StorePage(p.Index, p.Data); err != nil {
			k.t.Fatal(err)
		}
	}
	k.kept, k.taken = k.kept[:0], k.taken[:0]
}

// A PageBatcher may keep StorePage's slices from BatchPages to
// FlushPages: the Reader brackets every RAM section's stores with them,
// flushing before it reuses the slices or asks for a delta's base, and
// the target ends with what a copying one holds.
func TestPageBatcherKeepsSlicesUntilFlush(t *testing.T) {
	for _, opts := range []Options{{}, {Compression: CompressNone}} {
		stream, _ := writeStream(t, opts, 8, 5)
		plain := NewMemTarget()
		if _, err := Restore(bytes.NewReader(stream), Limits{}, plain); err != nil {
			t.Fatal(err)
		}
		kt := &keepingTarget{MemTarget: NewMemTarget(), t: t}
		if _, err := Restore(bytes.NewReader(stream), Limits{}, kt); err != nil {
			t.Fatal(err)
		}
		if kt.flushes < 8 {
			t.Fatalf("%d flushes over 8 epochs of pages", kt.flushes)
		}
		// A store that fails part way through a section: the section is
		// still flushed.
		ft := &keepingTarget{MemTarget: NewMemTarget(), t: t, failAt: 5}
		if _, err := Restore(bytes.NewReader(stream), Limits{}, ft); err == nil {
			t.Fatal("a failed store went unreported")
		}
		if ft.batching || ft.flushes != 1 || len(ft.kept) != 0 {
			t.Fatalf("after a failed store: batching %v, %d flushes, %d pages kept", ft.batching, ft.flushes, len(ft.kept))
		}
		if !reflect.DeepEqual(plain.PageIndices(), kt.PageIndices()) {
			t.Fatal("the keeping target holds other pages")
		}
		for _, idx := range plain.PageIndices() {
			if !bytes.Equal(plain.Page(idx), kt.Page(idx)) {
				t.Fatalf("page %d differs", idx)
			}
		}
	}
}
