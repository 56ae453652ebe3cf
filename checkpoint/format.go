package checkpoint

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sort"

	"github.com/tandemvm/tandem/guest"
)

// Errors returned by the Reader (and by Analyze). Every error a Reader
// returns for bad input wraps exactly one of them; check with errors.Is.
var (
	// ErrBadMagic: the input does not start with a Tandem stream header.
	ErrBadMagic = errors.New("checkpoint: not a tandem stream (bad magic)")
	// ErrVersion: the stream needs a reader newer than this one, or was
	// written in a version this reader no longer reads, or uses a
	// mandatory feature (section type, header flag) this reader lacks.
	ErrVersion = errors.New("checkpoint: unsupported stream version")
	// ErrChecksum: a CRC32C or an epoch digest does not match.
	ErrChecksum = errors.New("checkpoint: checksum mismatch")
	// ErrTruncated: the input ended before the STREAM-END section.
	ErrTruncated = errors.New("checkpoint: stream truncated")
	// ErrTooLarge: a length exceeds the reader's Limits.
	ErrTooLarge = errors.New("checkpoint: size exceeds limit")
	// ErrCorrupt: the bytes pass their checksum but do not decode to a
	// valid section (bad encoding, page outside the memory layout, counts
	// that disagree with the EPOCH-END summary, ...).
	ErrCorrupt = errors.New("checkpoint: corrupt stream")
)

// Errors returned by the Writer for misuse by its caller.
var (
	// ErrWriterState: a call out of order (after EndStream or Close, or
	// EndStream inside an open epoch) or after an earlier write failed.
	ErrWriterState = errors.New("checkpoint: writer in wrong state")
	// ErrBadInput: a page of the wrong size or outside the memory layout,
	// a version this build cannot write, an epoch number that does not
	// increase, or input over the format's limits.
	ErrBadInput = errors.New("checkpoint: bad writer input")
)

// FormatVersion numbers the wire format. Numbers are never reused: a
// retired version keeps its row in the versions table.
type FormatVersion uint16

const (
	// Version1 is the first format: RAM (zero, raw, stored, XOR delta,
	// run), DEVICE (msgpack), DISK, EPOCH-END (SHA-256), STREAM-END.
	Version1 FormatVersion = 1

	// MinReadable is the oldest version this build reads.
	MinReadable = Version1
	// MinWritable is the oldest version this build can write on request
	// (Options.Version); the previous release's version once v2 exists.
	MinWritable = Version1
	// Current is the version written by default.
	Current = Version1
)

// versionInfo is one row of the version table.
type versionInfo struct {
	v       FormatVersion
	retired bool   // placeholder: never written, never read
	note    string // what the version introduced
	feat    features
}

// features are the version-dependent choices the writer and reader make.
// A new version adds a field here and a row below instead of scattering
// version comparisons through the code.
type features struct {
	storedPages bool // RAM sections may carry an uncompressed tail of pages
	runPages    bool // RAM entries may encode a run of identical pages
}

// versions is indexed by FormatVersion. Row 0 stays retired: a zeroed
// header must never read as a valid version.
var versions = []versionInfo{
	{v: 0, retired: true, note: "reserved: zero is never a version"},
	{v: Version1, note: "initial format", feat: features{storedPages: true, runPages: true}},
}

func lookupVersion(v FormatVersion) (versionInfo, bool) {
	if int(v) >= len(versions) || versions[v].retired {
		return versionInfo{}, false
	}
	return versions[v], true
}

// Magic starts every stream.
const Magic = "TNDMCKPT"

// SectionType identifies a section. Types with the SectionSkippable bit set
// may be ignored by a reader that does not know them; any other unknown
// type is an ErrVersion.
type SectionType uint8

const (
	SectionRAM       SectionType = 1
	SectionDevice    SectionType = 2
	SectionDisk      SectionType = 3
	SectionEpochEnd  SectionType = 4
	SectionStreamEnd SectionType = 5

	// SectionSkippable marks section types an older reader may skip.
	SectionSkippable SectionType = 0x80
)

func (t SectionType) String() string {
	switch t {
	case SectionRAM:
		return "RAM"
	case SectionDevice:
		return "DEVICE"
	case SectionDisk:
		return "DISK"
	case SectionEpochEnd:
		return "EPOCH-END"
	case SectionStreamEnd:
		return "STREAM-END"
	}
	return fmt.Sprintf("UNKNOWN(%d)", uint8(t))
}

// Header flags. The low 16 bits are mandatory: a reader that does not know
// a set bit refuses the stream (ErrVersion). The high 16 are advisory.
const (
	// FlagSnapshot: the stream is a complete image (a file to restore),
	// not a sequence of incremental epochs over a base the receiver has.
	FlagSnapshot uint32 = 1 << 16
	// FlagMigration: the stream is a one-shot live migration.
	FlagMigration uint32 = 1 << 17
	// FlagMicroCheckpoint: the stream is a sequence of FT epochs.
	FlagMicroCheckpoint uint32 = 1 << 18

	knownMandatoryFlags uint32 = 0
	mandatoryFlagMask   uint32 = 0xffff
)

// MemRegion is one range of guest-physical memory in the stream's layout.
type MemRegion struct {
	GPA  uint64 `json:"gpa"`
	Size uint64 `json:"size"`
}

// Header opens every stream.
type Header struct {
	// Version and MinReader are set by NewWriter from Options.Version;
	// a Reader reports what it read.
	Version   FormatVersion `json:"version"`
	MinReader FormatVersion `json:"min_reader"`
	Build     string        `json:"build"`      // writer's build string
	Kind      string        `json:"guest_kind"` // guest backend ("synth", "kvm")
	PageSize  uint32        `json:"page_size"`  // must be guest.PageSize
	Regions   []MemRegion   `json:"regions"`    // ascending, page aligned, disjoint
	Flags     uint32        `json:"flags"`
}

// RegionsOf converts a guest's regions to the header's layout.
func RegionsOf(rs []guest.Region) []MemRegion {
	out := make([]MemRegion, len(rs))
	for i, r := range rs {
		out[i] = MemRegion{GPA: r.GPA, Size: uint64(len(r.Mem))}
	}
	return out
}

// Limits bound what a Reader allocates for one section. The zero value of
// a field means its default (DefaultLimits).
type Limits struct {
	MaxSectionSize   uint32 // bytes of one section's payload on the wire
	MaxPagesPerBatch int    // pages in one RAM section
	MaxDevices       int    // devices in one DEVICE section
	MaxDeviceBytes   int    // decoded bytes of one DEVICE section
	MaxDiskWrites    int    // writes in one DISK section
	MaxDiskWriteSize int    // bytes of one disk write
	// MaxDiskSectionBytes bounds the decoded body of one DISK section
	// (the Writer never makes one larger than maxDiskSectionBytes), so a
	// small compressed section cannot make the Reader decode and hand
	// over more. What a whole epoch may stage is the Target's to bound
	// (replica.Image.SetBudget).
	MaxDiskSectionBytes int
	MaxRegions          int // regions in the header
	MaxStringLen        int // build and kind strings in the header
}

// DefaultLimits are generous for Tandem's own streams and small enough that
// a hostile stream cannot exhaust a receiver.
func DefaultLimits() Limits {
	return Limits{
		MaxSectionSize:   64 << 20,
		MaxPagesPerBatch: 4096,
		MaxDevices:       4096,
		MaxDeviceBytes:   16 << 20,
		MaxDiskWrites:    65536,
		MaxDiskWriteSize: 4 << 20,
		// The Writer's bound plus room for the varints it counts loosely.
		MaxDiskSectionBytes: maxDiskSectionBytes + 64<<10,
		MaxRegions:          1024,
		MaxStringLen:        1024,
	}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.MaxSectionSize == 0 {
		l.MaxSectionSize = d.MaxSectionSize
	}
	if l.MaxPagesPerBatch <= 0 {
		l.MaxPagesPerBatch = d.MaxPagesPerBatch
	}
	if l.MaxDevices <= 0 {
		l.MaxDevices = d.MaxDevices
	}
	if l.MaxDeviceBytes <= 0 {
		l.MaxDeviceBytes = d.MaxDeviceBytes
	}
	if l.MaxDiskWrites <= 0 {
		l.MaxDiskWrites = d.MaxDiskWrites
	}
	if l.MaxDiskWriteSize <= 0 {
		l.MaxDiskWriteSize = d.MaxDiskWriteSize
	}
	if l.MaxDiskSectionBytes <= 0 {
		l.MaxDiskSectionBytes = d.MaxDiskSectionBytes
	}
	if l.MaxRegions <= 0 {
		l.MaxRegions = d.MaxRegions
	}
	if l.MaxStringLen <= 0 {
		l.MaxStringLen = d.MaxStringLen
	}
	return l
}

// Fixed sizes on the wire.
const (
	headerFixedLen = 8 + 2 + 2 + 4 + 4 // magic, version, min reader, flags, rest length
	frameLen       = 1 + 4 + 4         // type, payload length, crc32c
	maxHeaderRest  = 1 << 20
	epochEndLen    = 8*8 + 32
	streamEndLen   = 8
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// encodeHeader returns the header's bytes, including its trailing CRC32C.
func encodeHeader(h Header) []byte {
	var rest []byte
	rest = binary.LittleEndian.AppendUint32(rest, h.PageSize)
	rest = appendString(rest, h.Build)
	rest = appendString(rest, h.Kind)
	rest = binary.AppendUvarint(rest, uint64(len(h.Regions)))
	for _, r := range h.Regions {
		rest = binary.LittleEndian.AppendUint64(rest, r.GPA)
		rest = binary.LittleEndian.AppendUint64(rest, r.Size)
	}
	b := make([]byte, 0, headerFixedLen+len(rest)+4)
	b = append(b, Magic...)
	b = binary.LittleEndian.AppendUint16(b, uint16(h.Version))
	b = binary.LittleEndian.AppendUint16(b, uint16(h.MinReader))
	b = binary.LittleEndian.AppendUint32(b, h.Flags)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(rest)))
	b = append(b, rest...)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// readHeader reads and validates a header. It returns the header, the
// features to decode the rest with, and the bytes consumed.
func readHeader(r io.Reader, lim Limits) (Header, features, int64, error) {
	var h Header
	var fixed [headerFixedLen]byte
	n, err := io.ReadFull(r, fixed[:])
	if m := min(n, len(Magic)); string(fixed[:m]) != Magic[:m] {
		return h, features{}, 0, fmt.Errorf("%w: starts with %q", ErrBadMagic, fixed[:m])
	}
	if err != nil {
		return h, features{}, 0, fmt.Errorf("%w: header: %d of %d bytes", ErrTruncated, n, headerFixedLen)
	}
	if string(fixed[:8]) != Magic {
		return h, features{}, 0, fmt.Errorf("%w: starts with %q", ErrBadMagic, fixed[:8])
	}
	h.Version = FormatVersion(binary.LittleEndian.Uint16(fixed[8:]))
	h.MinReader = FormatVersion(binary.LittleEndian.Uint16(fixed[10:]))
	h.Flags = binary.LittleEndian.Uint32(fixed[12:])
	restLen := binary.LittleEndian.Uint32(fixed[16:])
	if restLen > maxHeaderRest {
		return h, features{}, 0, fmt.Errorf("%w: header of %d bytes (limit %d)", ErrTooLarge, restLen, maxHeaderRest)
	}
	buf := make([]byte, headerFixedLen+int(restLen)+4)
	copy(buf, fixed[:])
	if n, err := io.ReadFull(r, buf[headerFixedLen:]); err != nil {
		return h, features{}, 0, fmt.Errorf("%w: header: %d of %d bytes", ErrTruncated, headerFixedLen+n, len(buf))
	}
	body := buf[:len(buf)-4]
	if got, want := crc32.Checksum(body, castagnoli), binary.LittleEndian.Uint32(buf[len(buf)-4:]); got != want {
		return h, features{}, 0, fmt.Errorf("%w: header crc32c %08x, want %08x", ErrChecksum, got, want)
	}
	// The version check comes after the CRC so that a flipped version bit
	// reads as damage, not as a stream from the future.
	var feat features
	if info, ok := lookupVersion(h.Version); ok && h.Version >= MinReadable {
		feat = info.feat
	} else if h.Version > Current && h.MinReader >= MinReadable && h.MinReader <= Current {
		// A newer writer promises that readers of MinReader can read it.
		feat = versions[Current].feat
	} else {
		return h, features{}, 0, fmt.Errorf("%w: stream version %d needs a reader of version %d or later; this reader reads %d to %d",
			ErrVersion, h.Version, h.MinReader, MinReadable, Current)
	}
	if unknown := h.Flags & mandatoryFlagMask &^ knownMandatoryFlags; unknown != 0 {
		return h, features{}, 0, fmt.Errorf("%w: unknown mandatory header flags %#x", ErrVersion, unknown)
	}
	d := decoder{b: buf[headerFixedLen : len(buf)-4]}
	h.PageSize = d.u32()
	h.Build = d.str(lim.MaxStringLen)
	h.Kind = d.str(lim.MaxStringLen)
	nreg := d.uvarint()
	if d.err == nil && nreg > uint64(lim.MaxRegions) {
		return h, features{}, 0, fmt.Errorf("%w: %d memory regions (limit %d)", ErrTooLarge, nreg, lim.MaxRegions)
	}
	if d.err == nil {
		h.Regions = make([]MemRegion, 0, nreg)
		for i := uint64(0); i < nreg && d.err == nil; i++ {
			h.Regions = append(h.Regions, MemRegion{GPA: d.u64(), Size: d.u64()})
		}
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d trailing header bytes", len(d.b))
	}
	if d.err != nil {
		return h, features{}, 0, fmt.Errorf("header: %w", d.err)
	}
	if err := validateLayout(h); err != nil {
		return h, features{}, 0, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return h, feat, int64(len(buf)), nil
}

// validateLayout checks the header's page size and memory layout; both
// writer and reader rely on it when they check page indices.
func validateLayout(h Header) error {
	if h.PageSize != guest.PageSize {
		return fmt.Errorf("page size %d, want %d", h.PageSize, guest.PageSize)
	}
	var end uint64
	for i, r := range h.Regions {
		if r.GPA%guest.PageSize != 0 || r.Size%guest.PageSize != 0 || r.Size == 0 {
			return fmt.Errorf("region %d (gpa %#x size %#x) not page aligned or empty", i, r.GPA, r.Size)
		}
		if r.GPA+r.Size < r.GPA {
			return fmt.Errorf("region %d (gpa %#x size %#x) wraps", i, r.GPA, r.Size)
		}
		if i > 0 && r.GPA < end {
			return fmt.Errorf("region %d (gpa %#x) overlaps or is out of order", i, r.GPA)
		}
		end = r.GPA + r.Size
	}
	return nil
}

// layout answers "is this page index inside guest memory" quickly.
type layout struct {
	first, end []uint64 // page index ranges [first, end), ascending
	last       int      // region of the previous hit: pages arrive in runs
}

func newLayout(rs []MemRegion) *layout {
	l := &layout{}
	for _, r := range rs {
		l.first = append(l.first, r.GPA>>guest.PageShift)
		l.end = append(l.end, (r.GPA+r.Size)>>guest.PageShift)
	}
	return l
}

// contains reports whether pages [index, index+n) lie in one region.
func (l *layout) contains(index, n uint64) bool {
	if index+n < index {
		return false
	}
	if l.last < len(l.first) && index >= l.first[l.last] && index+n <= l.end[l.last] {
		return true
	}
	i := sort.Search(len(l.end), func(i int) bool { return l.end[i] > index })
	if i < len(l.first) && index >= l.first[i] && index+n <= l.end[i] {
		l.last = i
		return true
	}
	return false
}

// decoder reads little-endian fields from a validated-length buffer and
// records the first failure instead of panicking; callers check err once.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, args...)...)
	}
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.b) {
		d.fail("field of %d bytes past the end (%d left)", n, len(d.b))
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) u8() uint8 {
	if v := d.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if v := d.take(4); v != nil {
		return binary.LittleEndian.Uint32(v)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if v := d.take(8); v != nil {
		return binary.LittleEndian.Uint64(v)
	}
	return 0
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("bad varint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail("bad varint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) str(limit int) string {
	n := d.uvarint()
	if d.err != nil {
		return ""
	}
	if n > uint64(limit) {
		d.err = fmt.Errorf("%w: string of %d bytes (limit %d)", ErrTooLarge, n, limit)
		return ""
	}
	return string(d.take(int(n)))
}
