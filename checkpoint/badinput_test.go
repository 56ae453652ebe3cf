package checkpoint

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"testing"

	"github.com/tandemvm/tandem/guest"
)

// recordingTarget counts every call on top of a MemTarget.
type recordingTarget struct {
	*MemTarget
	pages, devices, disks, epochs int
}

func newRecordingTarget() *recordingTarget { return &recordingTarget{MemTarget: NewMemTarget()} }

func (r *recordingTarget) StorePage(i uint64, d []byte) error {
	r.pages++
	return r.MemTarget.StorePage(i, d)
}
func (r *recordingTarget) StoreDevices(ms guest.MachineState) error {
	r.devices++
	return r.MemTarget.StoreDevices(ms)
}
func (r *recordingTarget) StoreDisk(ws []guest.DiskWrite) error {
	r.disks++
	return r.MemTarget.StoreDisk(ws)
}
func (r *recordingTarget) EndEpoch(e EpochEnd) error {
	r.epochs++
	return r.MemTarget.EndEpoch(e)
}

func (r *recordingTarget) untouched() bool {
	return r.pages == 0 && r.devices == 0 && r.disks == 0 && r.epochs == 0 && len(r.PageIndices()) == 0
}

// oneEpoch is a short stream of one epoch, uncompressed so tests can edit
// bodies in place.
func oneEpoch(t *testing.T, opts Options) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := NewWriter(&buf, testHeader(), opts)
	if err != nil {
		t.Fatal(err)
	}
	g := newFakeGuest(5)
	if err := w.WritePages(g.mutate(40)); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteDevices(g.state(1)); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteDisk([]guest.DiskWrite{{Offset: 4096, Data: []byte("disk block")}}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.EndEpoch(1); err != nil {
		t.Fatal(err)
	}
	if err := w.EndStream(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// headerLen returns the length of the stream's header.
func headerLen(s []byte) int { return headerFixedLen + int(binary.LittleEndian.Uint32(s[16:])) + 4 }

// frames returns the offsets of the stream's sections.
func frames(s []byte) []int {
	var offs []int
	for off := headerLen(s); off+frameLen <= len(s); off += frameLen + int(binary.LittleEndian.Uint32(s[off+1:])) {
		offs = append(offs, off)
	}
	return offs
}

// fixCRC recomputes the CRC of the section at off, so a test can plant
// damage that only validation (not the checksum) can catch.
func fixCRC(s []byte, off int) {
	n := int(binary.LittleEndian.Uint32(s[off+1:]))
	crc := crc32.Update(crc32.Checksum(s[off:off+5], castagnoli), castagnoli, s[off+frameLen:off+frameLen+n])
	binary.LittleEndian.PutUint32(s[off+5:], crc)
}

func fixHeaderCRC(s []byte) {
	n := headerLen(s)
	binary.LittleEndian.PutUint32(s[n-4:], crc32.Checksum(s[:n-4], castagnoli))
}

func restoreInto(s []byte, lim Limits) (*recordingTarget, error) {
	tgt := newRecordingTarget()
	_, err := Restore(bytes.NewReader(s), lim, tgt)
	return tgt, err
}

func TestTruncated(t *testing.T) {
	s := oneEpoch(t, Options{})
	epochEnd := frames(s)[3]
	for cut := 0; cut < len(s); cut++ {
		tgt, err := restoreInto(s[:cut], Limits{})
		if !errors.Is(err, ErrTruncated) {
			t.Fatalf("cut at %d of %d: err %v, want ErrTruncated", cut, len(s), err)
		}
		if tgt.epochs != 0 && cut < len(s)-frameLen-streamEndLen {
			t.Fatalf("cut at %d: epoch committed", cut)
		}
		if cut <= frames(s)[0]+frameLen && !tgt.untouched() {
			t.Fatalf("cut at %d inside the first section: target touched", cut)
		}
		if cut < epochEnd && len(tgt.PageIndices()) != 0 {
			t.Fatalf("cut at %d: pages committed without EPOCH-END", cut)
		}
	}
}

func TestBitFlipped(t *testing.T) {
	s := oneEpoch(t, Options{})
	offs := frames(s)
	// Inside the first RAM section's payload: the CRC must catch it.
	for _, at := range []int{offs[0] + frameLen, offs[0] + frameLen + 100, offs[1] - 1} {
		bad := bytes.Clone(s)
		bad[at] ^= 0x10
		tgt, err := restoreInto(bad, Limits{})
		if !errors.Is(err, ErrChecksum) {
			t.Fatalf("flip at %d: err %v, want ErrChecksum", at, err)
		}
		if !tgt.untouched() {
			t.Fatalf("flip at %d: target touched", at)
		}
	}
	// In the header: its CRC catches it.
	bad := bytes.Clone(s)
	bad[headerFixedLen+1] ^= 1
	if _, err := restoreInto(bad, Limits{}); !errors.Is(err, ErrChecksum) {
		t.Fatalf("flip in header: err %v, want ErrChecksum", err)
	}
	// Every single-bit flip anywhere yields a typed error and no commit.
	for at := 0; at < len(s); at += 7 {
		bad := bytes.Clone(s)
		bad[at] ^= 1 << (at % 8)
		tgt, err := restoreInto(bad, Limits{})
		if err == nil || !anyTyped(err) {
			t.Fatalf("flip at %d: err %v, want a typed error", at, err)
		}
		if tgt.epochs != 0 && at < offs[3] {
			t.Fatalf("flip at %d: damaged epoch committed", at)
		}
	}
}

func anyTyped(err error) bool {
	for _, e := range []error{ErrBadMagic, ErrVersion, ErrChecksum, ErrTruncated, ErrTooLarge, ErrCorrupt} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// Damage behind a valid CRC is caught by validation: ErrCorrupt.
func TestCorruptBehindValidCRC(t *testing.T) {
	s := oneEpoch(t, Options{Compression: CompressNone})
	offs := frames(s)
	// The first entry's encoding byte follows the envelope (codec, raw_len,
	// body_len), the entry count and the entry's index delta: make it an
	// encoding that does not exist.
	bad := bytes.Clone(s)
	d := decoder{b: bad[offs[0]+frameLen+1:]}
	d.uvarint()
	d.uvarint()
	d.uvarint()
	d.varint()
	bad[len(bad)-len(d.b)] = 9
	fixCRC(bad, offs[0])
	tgt, err := restoreInto(bad, Limits{})
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("err %v, want ErrCorrupt", err)
	}
	if !tgt.untouched() {
		t.Fatal("target touched")
	}

	// EPOCH-END counts that disagree with the content: ErrCorrupt, and the
	// epoch is not committed.
	bad = bytes.Clone(s)
	binary.LittleEndian.PutUint64(bad[offs[3]+frameLen+16:], 999) // pages
	fixCRC(bad, offs[3])
	tgt, err = restoreInto(bad, Limits{})
	if !errors.Is(err, ErrCorrupt) || tgt.epochs != 0 || len(tgt.PageIndices()) != 0 {
		t.Fatalf("bad counts: err %v, epochs committed %d", err, tgt.epochs)
	}

	// A digest that disagrees: ErrChecksum, not committed.
	bad = bytes.Clone(s)
	bad[offs[3]+frameLen+64] ^= 1
	fixCRC(bad, offs[3])
	tgt, err = restoreInto(bad, Limits{})
	if !errors.Is(err, ErrChecksum) || tgt.epochs != 0 || len(tgt.PageIndices()) != 0 {
		t.Fatalf("bad digest: err %v, epochs committed %d", err, tgt.epochs)
	}
}

func TestOversized(t *testing.T) {
	s := oneEpoch(t, Options{})
	offs := frames(s)
	// A section claiming 4 GiB.
	bad := bytes.Clone(s)
	binary.LittleEndian.PutUint32(bad[offs[0]+1:], 0xffffffff)
	tgt, err := restoreInto(bad, Limits{})
	if !errors.Is(err, ErrTooLarge) || !tgt.untouched() {
		t.Fatalf("huge section: err %v untouched %v", err, tgt.untouched())
	}
	// Sections over a tighter limit.
	tgt, err = restoreInto(s, Limits{MaxSectionSize: 1024})
	if !errors.Is(err, ErrTooLarge) || !tgt.untouched() {
		t.Fatalf("over MaxSectionSize: err %v untouched %v", err, tgt.untouched())
	}
	// More pages than the batch limit.
	tgt, err = restoreInto(s, Limits{MaxPagesPerBatch: 8})
	if !errors.Is(err, ErrTooLarge) || !tgt.untouched() {
		t.Fatalf("over MaxPagesPerBatch: err %v untouched %v", err, tgt.untouched())
	}
	// A header claiming more regions than allowed.
	tgt, err = restoreInto(s, Limits{MaxRegions: 1})
	if !errors.Is(err, ErrTooLarge) || !tgt.untouched() {
		t.Fatalf("over MaxRegions: err %v", err)
	}
}

func TestWrongVersion(t *testing.T) {
	s := oneEpoch(t, Options{})
	for _, v := range []struct{ version, minReader uint16 }{{99, 99}, {0, 0}, {2, 2}} {
		bad := bytes.Clone(s)
		binary.LittleEndian.PutUint16(bad[8:], v.version)
		binary.LittleEndian.PutUint16(bad[10:], v.minReader)
		fixHeaderCRC(bad)
		tgt, err := restoreInto(bad, Limits{})
		if !errors.Is(err, ErrVersion) || !tgt.untouched() {
			t.Fatalf("version %d/%d: err %v", v.version, v.minReader, err)
		}
	}
	// A newer stream that promises version-1 readers can read it loads.
	newer := bytes.Clone(s)
	binary.LittleEndian.PutUint16(newer[8:], 7)
	binary.LittleEndian.PutUint16(newer[10:], 1)
	fixHeaderCRC(newer)
	if _, err := restoreInto(newer, Limits{}); err != nil {
		t.Fatalf("forward-compatible stream: %v", err)
	}
	// An unknown mandatory flag is refused; an advisory one is not.
	bad := bytes.Clone(s)
	binary.LittleEndian.PutUint32(bad[12:], 1)
	fixHeaderCRC(bad)
	if _, err := restoreInto(bad, Limits{}); !errors.Is(err, ErrVersion) {
		t.Fatalf("unknown mandatory flag: err %v", err)
	}
	// An unknown mandatory section type is refused; a skippable one is skipped.
	offs := frames(s)
	bad = bytes.Clone(s)
	bad[offs[1]] = 0x33
	fixCRC(bad, offs[1])
	if _, err := restoreInto(bad, Limits{}); !errors.Is(err, ErrVersion) {
		t.Fatalf("unknown section: err %v", err)
	}
	skip := bytes.Clone(s[:offs[3]])
	skip = append(skip, byte(SectionSkippable|0x10), 3, 0, 0, 0, 0, 0, 0, 0, 'a', 'b', 'c')
	fixCRC(skip, offs[3])
	skip = append(skip, s[offs[3]:]...)
	// EPOCH-END counts every section, skippable ones included.
	ee := offs[3] + frameLen + 3
	binary.LittleEndian.PutUint64(skip[ee+frameLen+8:], 4)
	fixCRC(skip, ee)
	if _, err := restoreInto(skip, Limits{}); err != nil {
		t.Fatalf("skippable section: %v", err)
	}
}

func TestWrongMagic(t *testing.T) {
	s := oneEpoch(t, Options{})
	for _, bad := range [][]byte{
		append([]byte("TNDMCKPX"), s[8:]...),
		[]byte("GET / HTTP/1.1\r\n\r\n"),
		[]byte("x"),
	} {
		tgt, err := restoreInto(bad, Limits{})
		if !errors.Is(err, ErrBadMagic) || !tgt.untouched() {
			t.Fatalf("%q: err %v", bad[:min(len(bad), 8)], err)
		}
	}
	if _, err := restoreInto(nil, Limits{}); !errors.Is(err, ErrTruncated) {
		t.Fatalf("empty input: err %v, want ErrTruncated", err)
	}
}

// A Reader that failed keeps failing and never applies more.
func TestReaderStaysBroken(t *testing.T) {
	s := oneEpoch(t, Options{})
	bad := bytes.Clone(s)
	bad[frames(s)[1]+frameLen] ^= 1
	r, err := NewReader(bytes.NewReader(bad), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	tgt := newRecordingTarget()
	if _, err := r.Next(tgt); err != nil {
		t.Fatal(err)
	}
	_, err1 := r.Next(tgt)
	_, err2 := r.Next(tgt)
	if !errors.Is(err1, ErrChecksum) || err1 != err2 || tgt.devices != 0 {
		t.Fatalf("errors %v / %v, devices %d", err1, err2, tgt.devices)
	}
	if _, err := r.ReadEpoch(tgt); err != err1 {
		t.Fatal("ReadEpoch after failure did not return the same error")
	}
	_ = io.EOF
}
