package checkpoint

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/vfs"
)

func TestXORDelta(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	for i := 0; i < 2000; i++ {
		base := make([]byte, guest.PageSize)
		fillRandom(rng, base)
		page := bytes.Clone(base)
		for k := 0; k < rng.IntN(40); k++ {
			at := rng.IntN(guest.PageSize)
			for j := at; j < min(at+1+rng.IntN(12), guest.PageSize); j++ {
				page[j] ^= byte(1 + rng.IntN(255))
			}
		}
		d, ok := appendXORDelta(nil, page, base)
		if !ok {
			t.Fatalf("case %d: small change refused", i)
		}
		out := bytes.Clone(base)
		if n := applyXORDelta(out, d); n != len(d) || !bytes.Equal(out, page) {
			t.Fatalf("case %d: delta of %d bytes consumed %d, equal %v", i, len(d), n, bytes.Equal(out, page))
		}
	}
	// A page unrelated to its base is refused.
	a, b := make([]byte, guest.PageSize), make([]byte, guest.PageSize)
	fillRandom(rng, a)
	fillRandom(rng, b)
	if _, ok := appendXORDelta(nil, a, b); ok {
		t.Fatal("delta of unrelated pages accepted")
	}
}

func TestIncompressibleSample(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	p := make([]byte, guest.PageSize)
	fillRandom(rng, p)
	if !looksIncompressible(p) {
		t.Fatal("random page judged compressible")
	}
	for i := range p {
		p[i] = "the quick brown fox jumps over the lazy dog 0123456789"[i%53]
	}
	if looksIncompressible(p) {
		t.Fatal("text page judged incompressible")
	}
}

// The delta cache only ever deltas against what the receiver holds:
// after an invalidation the page goes whole, after a seed it goes as XOR.
func TestCacheSeedInvalidate(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, testHeader(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(2, 2))
	p := make([]byte, guest.PageSize)
	fillRandom(rng, p)
	w.SeedPage(10, p)
	p2 := bytes.Clone(p)
	p2[5]++
	if err := w.WritePages([]Page{{10, p2}}); err != nil {
		t.Fatal(err)
	}
	s1, _ := w.EndEpoch(1)
	w.InvalidatePage(10)
	p2[6]++
	w.WritePages([]Page{{10, p2}})
	s2, _ := w.EndEpoch(2)
	p2[7]++
	w.WritePages([]Page{{10, p2}})
	s3, _ := w.EndEpoch(3)
	w.InvalidateAll()
	p2[8]++
	w.WritePages([]Page{{10, p2}})
	s4, _ := w.EndEpoch(4)
	if s1.Encodings.XOR != 1 || s2.Encodings.XOR != 0 || s3.Encodings.XOR != 1 || s4.Encodings.XOR != 0 {
		t.Fatalf("xor counts %d %d %d %d, want 1 0 1 0", s1.Encodings.XOR, s2.Encodings.XOR, s3.Encodings.XOR, s4.Encodings.XOR)
	}
	if s1.WireBytes*10 > s2.WireBytes {
		t.Fatalf("delta epoch %d bytes vs whole page epoch %d bytes", s1.WireBytes, s2.WireBytes)
	}
	w.EndStream()
	// The receiver holds the seeded page.
	tgt := NewMemTarget()
	tgt.StorePage(10, p)
	tgt.EndEpoch(EpochEnd{})
	if _, err := Restore(bytes.NewReader(buf.Bytes()), Limits{}, tgt); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tgt.Page(10), p2) {
		t.Fatal("page differs after deltas")
	}
}

func TestRunsAndDuplicates(t *testing.T) {
	text := bytes.Repeat([]byte("run of pages "), guest.PageSize/13+1)[:guest.PageSize]
	other := bytes.Clone(text)
	other[0] = 'R'
	pages := []Page{{1, text}, {2, text}, {3, text}, {4, text}, {3, other}, {3, text}}
	var buf bytes.Buffer
	w, _ := NewWriter(&buf, testHeader(), Options{})
	w.WritePages(pages)
	s, err := w.EndEpoch(1)
	if err != nil {
		t.Fatal(err)
	}
	w.EndStream()
	if s.Encodings.Run != 4 || s.Encodings.XOR != 2 {
		t.Fatalf("encodings %+v, want a run of 4 and 2 deltas", s.Encodings)
	}
	tgt := NewMemTarget()
	if _, err := Restore(bytes.NewReader(buf.Bytes()), Limits{}, tgt); err != nil {
		t.Fatal(err)
	}
	for i := uint64(1); i <= 4; i++ {
		if !bytes.Equal(tgt.Page(i), text) {
			t.Fatalf("page %d differs", i)
		}
	}
}

func TestWriterMisuse(t *testing.T) {
	var buf bytes.Buffer
	if _, err := NewWriter(&buf, testHeader(), Options{Version: Current + 1}); !errors.Is(err, ErrBadInput) {
		t.Fatalf("future version: %v", err)
	}
	if _, err := NewWriter(&buf, testHeader(), Options{Version: MinWritable}); err != nil {
		t.Fatalf("oldest writable version: %v", err)
	}
	h := testHeader()
	h.Regions = append(h.Regions, MemRegion{GPA: 4096, Size: 4096}) // overlaps
	if _, err := NewWriter(&buf, h, Options{}); !errors.Is(err, ErrBadInput) {
		t.Fatalf("overlapping regions: %v", err)
	}
	w, _ := NewWriter(&buf, testHeader(), Options{})
	if err := w.WritePages([]Page{{Index: 1 << 40, Data: make([]byte, guest.PageSize)}}); !errors.Is(err, ErrBadInput) {
		t.Fatalf("page outside layout: %v", err)
	}
	if err := w.WritePages([]Page{{Index: 1, Data: make([]byte, 10)}}); !errors.Is(err, ErrBadInput) {
		t.Fatalf("short page: %v", err)
	}
	if err := w.WriteDevices(guest.MachineState{Kind: "kvm"}); !errors.Is(err, ErrBadInput) {
		t.Fatalf("wrong kind: %v", err)
	}
	w.EndEpoch(5)
	if _, err := w.EndEpoch(5); !errors.Is(err, ErrBadInput) {
		t.Fatalf("repeated epoch: %v", err)
	}
	w.WritePages([]Page{{Index: 1, Data: make([]byte, guest.PageSize)}})
	if err := w.EndStream(); !errors.Is(err, ErrWriterState) {
		t.Fatalf("EndStream in open epoch: %v", err)
	}
	w.EndEpoch(6)
	if err := w.EndStream(); err != nil {
		t.Fatal(err)
	}
	if err := w.WritePages(nil); !errors.Is(err, ErrWriterState) {
		t.Fatalf("write after end: %v", err)
	}
}

// Big disk writes are split under the limits and arrive whole.
func TestDiskSplit(t *testing.T) {
	big := make([]byte, DefaultLimits().MaxDiskWriteSize*2+100)
	for i := range big {
		big[i] = byte(i * 7)
	}
	var buf bytes.Buffer
	w, _ := NewWriter(&buf, testHeader(), Options{})
	if err := w.WriteDisk([]guest.DiskWrite{{Offset: 1 << 20, Data: big}, {Offset: 0, Data: []byte("x")}}); err != nil {
		t.Fatal(err)
	}
	w.EndEpoch(1)
	w.EndStream()
	tgt := NewMemTarget()
	if _, err := Restore(bytes.NewReader(buf.Bytes()), Limits{}, tgt); err != nil {
		t.Fatal(err)
	}
	var got []byte
	for _, d := range tgt.Disk()[:len(tgt.Disk())-1] {
		if d.Offset != 1<<20+uint64(len(got)) {
			t.Fatalf("piece at %d", d.Offset)
		}
		got = append(got, d.Data...)
	}
	if !bytes.Equal(got, big) || string(tgt.Disk()[len(tgt.Disk())-1].Data) != "x" {
		t.Fatal("disk writes differ")
	}
}

// A snapshot file restores into a guest's regions with the same memory
// digest, and publishing is atomic.
func TestSnapshotFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "snap.tdm")
	rng := rand.New(rand.NewPCG(4, 4))
	src := []guest.Region{{GPA: 0, Mem: make([]byte, 64*guest.PageSize)}, {GPA: 1 << 30, Mem: make([]byte, 16*guest.PageSize)}}
	var pages []Page
	for _, r := range src {
		for p := uint64(0); p < r.Pages(); p++ {
			page := r.Mem[p*guest.PageSize : (p+1)*guest.PageSize]
			if p%3 != 0 {
				fillRandom(rng, page[:rng.IntN(guest.PageSize)])
			}
			pages = append(pages, Page{Index: r.FirstPage() + p, Data: page})
		}
	}
	ms := guest.MachineState{Kind: "synth", Devices: []guest.DeviceState{{Name: "vcpu", Fields: []byte{0x90}}}}
	h := Header{Build: "test", Kind: "synth", Regions: RegionsOf(src)}
	if err := WriteSnapshot(path, h, Options{}, pages, ms, nil); err != nil {
		t.Fatal(err)
	}
	dst := []guest.Region{{GPA: 0, Mem: make([]byte, 64*guest.PageSize)}, {GPA: 1 << 30, Mem: make([]byte, 16*guest.PageSize)}}
	// Dirty the destination: restore must overwrite, zero pages included.
	fillRandom(rng, dst[0].Mem)
	rt := &RegionTarget{Regions: dst}
	got, err := RestoreFile(path, Limits{}, rt)
	if err != nil {
		t.Fatal(err)
	}
	if got.Flags&FlagSnapshot == 0 || guest.CombineDigest(guest.ScanMemory(src).Sum(), ms) != guest.CombineDigest(guest.ScanMemory(dst).Sum(), rt.State) {
		t.Fatal("restored guest differs from the snapshot's source")
	}

	// A failed write leaves the old file and no temporary behind.
	old, _ := os.ReadFile(path)
	defer vfs.FPPublishBeforeRename.Enable(func() error { return errors.New("injected crash before rename") })()
	if err := WriteSnapshot(path, h, Options{}, pages[:1], ms, nil); err == nil {
		t.Fatal("injected failure not reported")
	}
	now, _ := os.ReadFile(path)
	entries, _ := os.ReadDir(dir)
	if !bytes.Equal(old, now) || len(entries) != 1 {
		t.Fatalf("old file changed %v, %d directory entries", !bytes.Equal(old, now), len(entries))
	}
}

// SkipCacheBelow keeps pages out of the delta cache and forgets what the
// cache held for them, so the next send of such a page goes whole; the
// stream still decodes to the pages sent, and pages at or above the
// index keep their deltas.
func TestSkipCacheBelow(t *testing.T) {
	for _, skip := range []bool{false, true} {
		var buf bytes.Buffer
		w, err := NewWriter(&buf, testHeader(), Options{Compression: CompressNone})
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(4, 4))
		a, b, c := make([]byte, guest.PageSize), make([]byte, guest.PageSize), make([]byte, guest.PageSize)
		fillRandom(rng, a)
		fillRandom(rng, c)
		w.SeedPage(5, a) // both ends hold a as page 5 (the target is seeded below)
		copy(b, a)
		b[100] ^= 1
		if skip {
			w.SkipCacheBelow(10)
		}
		if err := w.WritePages([]Page{{Index: 5, Data: b}, {Index: 20, Data: c}}); err != nil {
			t.Fatal(err)
		}
		first, err := w.EndEpoch(1)
		if err != nil {
			t.Fatal(err)
		}
		w.SkipCacheBelow(0)
		b2, c2 := bytes.Clone(b), bytes.Clone(c)
		b2[200] ^= 1
		c2[300] ^= 1
		if err := w.WritePages([]Page{{Index: 5, Data: b2}, {Index: 20, Data: c2}}); err != nil {
			t.Fatal(err)
		}
		second, err := w.EndEpoch(2)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.EndStream(); err != nil {
			t.Fatal(err)
		}
		// Page 5 was seeded, so its first send is a delta either way (the
		// skip saves the copy, not the lookup); afterwards only page 20
		// may be a delta when page 5 was skipped.
		wantSecond := uint64(2)
		if skip {
			wantSecond = 1
		}
		if first.Encodings.XOR != 1 || second.Encodings.XOR != wantSecond {
			t.Fatalf("skip %v: XOR pages %d then %d, want 1 then %d", skip, first.Encodings.XOR, second.Encodings.XOR, wantSecond)
		}
		tgt := NewMemTarget()
		if err := tgt.StorePage(5, a); err != nil {
			t.Fatal(err)
		}
		_ = tgt.EndEpoch(EpochEnd{}) // commits the seeded page
		if _, err := Restore(bytes.NewReader(buf.Bytes()), Limits{}, tgt); err != nil {
			t.Fatalf("skip %v: restore: %v", skip, err)
		}
		if !bytes.Equal(tgt.Page(5), b2) || !bytes.Equal(tgt.Page(20), c2) {
			t.Fatalf("skip %v: restored pages differ from the pages sent", skip)
		}
	}
}

// xorDeltaRef is appendXORDelta's encoding written the plain way (a byte
// at a time, the limit checked after each run): the fast scan must give
// the same bytes, and refuse the same pages.
func xorDeltaRef(page, base []byte) ([]byte, bool) {
	dst := []byte{0, 0}
	nruns, pos, last, n := 0, 0, 0, len(page)
	for pos < n {
		for pos < n && page[pos] == base[pos] {
			pos++
		}
		if pos >= n {
			break
		}
		runStart, end := pos, pos+1
		for end < n {
			if page[end] != base[end] {
				end++
				continue
			}
			gap := end
			for gap < n && gap-end < 4 && page[gap] == base[gap] {
				gap++
			}
			if gap < n && gap-end < 4 {
				end = gap
				continue
			}
			break
		}
		dst = binary.AppendUvarint(dst, uint64(runStart-last))
		dst = binary.AppendUvarint(dst, uint64(end-runStart))
		for i := runStart; i < end; i++ {
			dst = append(dst, page[i]^base[i])
		}
		nruns++
		last, pos = end, end
		if len(dst) > maxDeltaLen {
			return nil, false
		}
	}
	dst[0], dst[1] = byte(nruns)|0x80, byte(nruns>>7)
	return dst, true
}

func TestXORDeltaMatchesPlainScan(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	for i := 0; i < 8000; i++ {
		base := make([]byte, guest.PageSize)
		if rng.IntN(4) > 0 {
			fillRandom(rng, base)
		}
		page := bytes.Clone(base)
		switch rng.IntN(5) {
		case 0: // whole page rewritten
			fillRandom(rng, page)
		case 1: // one long stretch, anywhere, up to the end
			at := rng.IntN(guest.PageSize)
			fillRandom(rng, page[at:min(guest.PageSize, at+rng.IntN(3000))])
		case 2: // many short changes with short equal gaps between them
			for at := rng.IntN(64); at < guest.PageSize; at += 1 + rng.IntN(9) {
				page[at] ^= byte(1 + rng.IntN(255))
			}
		default: // a few scattered changes
			for k := 0; k < rng.IntN(60); k++ {
				at := rng.IntN(guest.PageSize)
				for j := at; j < min(at+1+rng.IntN(40), guest.PageSize); j++ {
					page[j] = byte(rng.Uint32())
				}
			}
		}
		want, wantOK := xorDeltaRef(page, base)
		got, ok := appendXORDelta([]byte{0xEE}, page, base)
		if ok != wantOK {
			t.Fatalf("case %d: accepted %v, the plain scan %v", i, ok, wantOK)
		}
		if ok && !bytes.Equal(got[1:], want) {
			t.Fatalf("case %d: %d bytes differ from the plain scan's %d", i, len(got)-1, len(want))
		}
		if ok && got[0] != 0xEE {
			t.Fatalf("case %d: the bytes before dst's end were changed", i)
		}
	}
}
