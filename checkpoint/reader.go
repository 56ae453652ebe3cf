package checkpoint

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/tandemvm/tandem/guest"
)

// Target receives what a Reader decodes. The Reader calls it from the
// goroutine that calls Next, only with sections that passed every check
// (CRC, limits, decoding, page indices inside the layout). Content belongs
// to the current epoch until EndEpoch; a Target that must never expose a
// partial epoch (the replica) stages it and makes it visible in EndEpoch.
// If the stream fails before EPOCH-END, EndEpoch is not called and the
// Target should discard what it staged.
//
// Slices passed to the Target are valid only during the call.
type Target interface {
	// PageBase returns the receiver's current copy of page index (staged
	// in this epoch if it was, committed otherwise), the base of an XOR
	// delta. nil means all zero. The Reader only reads the slice.
	PageBase(index uint64) ([]byte, error)
	// StorePage sets page index to data (guest.PageSize bytes).
	StorePage(index uint64, data []byte) error
	// StoreDevices sets the vCPU and device state.
	StoreDevices(ms guest.MachineState) error
	// StoreDisk applies disk writes, in order.
	StoreDisk(ws []guest.DiskWrite) error
	// EndEpoch commits the epoch; e has been verified against what the
	// Target was given since the previous EndEpoch.
	EndEpoch(e EpochEnd) error
}

// HashedTarget is a Target that takes each page with the XXH64 of its
// content, which the Reader computes anyway for the epoch digest, so the
// Target need not hash the page a second time (the replica keeps a
// digest of its memory page by page). The Reader then calls
// StorePageHashed instead of StorePage: zero says the page is all zero
// (data is then a zero page and sum is 0); otherwise sum is
// xxhash.Sum64(data).
type HashedTarget interface {
	Target
	StorePageHashed(index uint64, data []byte, sum uint64, zero bool) error
}

// Prefaulter is a Target that prepares memory for the pages a RAM
// section is about to store: the Reader calls Prefault once for each run
// of consecutive page indices, in the section's order, before it stores
// any of them, so that memory the host has not populated yet is
// populated in one call per run rather than by a page fault per page
// (guest.PrefaultWrite). A hint: it may do nothing.
type Prefaulter interface {
	Prefault(first, n uint64)
}

// PageBatcher is a Target that writes a section's pages all at once: the
// Reader calls BatchPages before it stores a RAM section's pages and
// FlushPages after them (also when a store fails), before anything it
// handed over is reused. Between the two, and only then, the Target may
// keep the page slices StorePage (or StorePageHashed) gives it.
type PageBatcher interface {
	BatchPages()
	FlushPages()
}

// Section describes one section the Reader read.
type Section struct {
	Type     SectionType `json:"-"`
	TypeName string      `json:"type"`
	Offset   int64       `json:"offset"`    // of the frame in the stream
	WireSize int64       `json:"wire_size"` // frame plus payload
	// RawSize is the content the section carries once decoded: pages
	// times the page size for RAM, the decoded body otherwise.
	RawSize    int64      `json:"raw_size"`
	Codec      string     `json:"codec,omitempty"`
	Pages      PageCounts `json:"pages"`
	Devices    int        `json:"devices,omitempty"`
	DiskWrites int        `json:"disk_writes,omitempty"`
	DiskBytes  int64      `json:"disk_bytes,omitempty"`
	Epoch      *EpochEnd  `json:"epoch_end,omitempty"`
	Skipped    bool       `json:"skipped,omitempty"` // unknown skippable type
}

// zstdDecoder is shared: DecodeAll is safe for concurrent use, and with
// the cap limit it never writes past cap(dst), which the Reader sets from
// a length it has already bounded.
var zstdDecoder = sync.OnceValue(func() *zstd.Decoder {
	d, err := zstd.NewReader(nil, zstd.WithDecodeAllCapLimit(true), zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderMaxMemory(1<<30))
	if err != nil {
		panic(err) // static options: cannot fail
	}
	return d
})

// Reader decodes a stream. It is not safe for concurrent use. After an
// error the Reader is broken and returns the same error from every call.
type Reader struct {
	r    io.Reader
	lim  Limits
	h    Header
	feat features
	lay  *layout
	off  int64

	payload []byte
	body    []byte
	ents    []decEntry
	pool    [][]byte          // XOR result pages, reused
	overlay map[uint64][]byte // pages set earlier in the same RAM section
	digest  *epochDigest

	cur       EpochEnd // what has been applied in the open epoch
	epochs    uint64
	lastEpoch uint64
	done      bool
	err       error
}

type decEntry struct {
	index, count uint64
	enc          uint8
	data         []byte
}

// NewReader reads and validates the header. Zero fields of lim take their
// defaults.
func NewReader(r io.Reader, lim Limits) (*Reader, error) {
	lim = lim.withDefaults()
	h, feat, n, err := readHeader(r, lim)
	if err != nil {
		return nil, err
	}
	return &Reader{r: r, lim: lim, h: h, feat: feat, lay: newLayout(h.Regions), off: n,
		overlay: make(map[uint64][]byte), digest: newEpochDigest()}, nil
}

// Header returns the stream's header.
func (r *Reader) Header() Header { return r.h }

// Offset is the number of stream bytes consumed so far.
func (r *Reader) Offset() int64 { return r.off }

// Next reads one section, validates it completely and then applies it to
// t. After the STREAM-END section it returns io.EOF. A nil t validates
// and describes sections without applying them; XOR deltas are then
// checked for form only and epoch digests are not verified.
func (r *Reader) Next(t Target) (Section, error) {
	if r.err != nil {
		return Section{}, r.err
	}
	if r.done {
		return Section{}, io.EOF
	}
	s, err := r.next(t)
	if err != nil {
		r.err = err
	}
	return s, err
}

// ReadEpoch applies sections to t up to and including the next EPOCH-END
// and returns it. It returns io.EOF at the end of the stream.
func (r *Reader) ReadEpoch(t Target) (EpochEnd, error) {
	for {
		s, err := r.Next(t)
		if err != nil {
			return EpochEnd{}, err
		}
		if s.Epoch != nil {
			return *s.Epoch, nil
		}
	}
}

func (r *Reader) next(t Target) (Section, error) {
	s := Section{Offset: r.off}
	var frame [frameLen]byte
	if n, err := io.ReadFull(r.r, frame[:]); err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			return s, fmt.Errorf("%w: no STREAM-END at offset %d", ErrTruncated, r.off)
		}
		return s, r.readErr("section frame", err)
	}
	s.Type = SectionType(frame[0])
	s.TypeName = s.Type.String()
	size := binary.LittleEndian.Uint32(frame[1:])
	if size > r.lim.MaxSectionSize {
		return s, fmt.Errorf("%w: %v section of %d bytes at offset %d (limit %d)", ErrTooLarge, s.Type, size, r.off, r.lim.MaxSectionSize)
	}
	if err := r.readPayload(int(size)); err != nil {
		return s, err
	}
	crc := crc32.Update(crc32.Checksum(frame[:5], castagnoli), castagnoli, r.payload)
	if want := binary.LittleEndian.Uint32(frame[5:]); crc != want {
		return s, fmt.Errorf("%w: %v section at offset %d: crc32c %08x, want %08x", ErrChecksum, s.Type, r.off, crc, want)
	}
	s.WireSize = int64(frameLen) + int64(size)
	var err error
	switch s.Type {
	case SectionRAM:
		err = r.ram(t, &s)
	case SectionDevice:
		err = r.device(t, &s)
	case SectionDisk:
		err = r.disk(t, &s)
	case SectionEpochEnd:
		err = r.epochEnd(t, &s)
	case SectionStreamEnd:
		err = r.streamEnd(&s)
	default:
		if s.Type&SectionSkippable == 0 {
			return s, fmt.Errorf("%w: unknown section type %d at offset %d", ErrVersion, uint8(s.Type), r.off)
		}
		// Counted like any other section: a newer writer counts the
		// skippable sections it writes into EPOCH-END too.
		s.Skipped = true
		r.cur.Sections++
	}
	if err != nil {
		return s, fmt.Errorf("%v section at offset %d: %w", s.Type, r.off, err)
	}
	r.off += s.WireSize
	return s, nil
}

func (r *Reader) readErr(what string, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: %s at offset %d", ErrTruncated, what, r.off)
	}
	return fmt.Errorf("checkpoint: read %s at offset %d: %w", what, r.off, err)
}

// readPayload reads n bytes, growing the buffer as data actually arrives
// so a length field alone cannot make the Reader allocate it.
func (r *Reader) readPayload(n int) error {
	const chunk = 1 << 20
	buf := r.payload[:0]
	for len(buf) < n {
		m := min(n-len(buf), chunk)
		if cap(buf)-len(buf) < m {
			nb := make([]byte, len(buf), min(n, max(len(buf)+m, 2*cap(buf))))
			copy(nb, buf)
			buf = nb
		}
		if _, err := io.ReadFull(r.r, buf[len(buf):len(buf)+m]); err != nil {
			r.payload = buf
			return r.readErr("section payload", err)
		}
		buf = buf[:len(buf)+m]
	}
	r.payload = buf
	return nil
}

// envelope splits a payload into its decoded body and its tail.
func (r *Reader) envelope(maxRaw uint64, s *Section) (body, tail []byte, err error) {
	d := decoder{b: r.payload}
	codecID := d.u8()
	rawLen := d.uvarint()
	bodyLen := d.uvarint()
	if d.err != nil {
		return nil, nil, d.err
	}
	if rawLen > maxRaw {
		return nil, nil, fmt.Errorf("%w: decoded body of %d bytes (limit %d)", ErrTooLarge, rawLen, maxRaw)
	}
	if bodyLen > uint64(len(d.b)) {
		return nil, nil, fmt.Errorf("%w: body of %d bytes in a payload of %d", ErrCorrupt, bodyLen, len(d.b))
	}
	wire := d.take(int(bodyLen))
	tail = d.b
	switch codecID {
	case codecNone:
		s.Codec = "none"
		if rawLen != bodyLen {
			return nil, nil, fmt.Errorf("%w: stored body of %d bytes claims %d", ErrCorrupt, bodyLen, rawLen)
		}
		return wire, tail, nil
	case codecZstd:
		s.Codec = "zstd"
		if cap(r.body) < int(rawLen) {
			r.body = make([]byte, 0, rawLen)
		}
		out, err := zstdDecoder().DecodeAll(wire, r.body[:0:rawLen])
		if err != nil {
			return nil, nil, fmt.Errorf("%w: zstd: %v", ErrCorrupt, err)
		}
		if uint64(len(out)) != rawLen {
			return nil, nil, fmt.Errorf("%w: zstd body decodes to %d bytes, header says %d", ErrCorrupt, len(out), rawLen)
		}
		return out, tail, nil
	}
	return nil, nil, fmt.Errorf("%w: unknown body codec %d", ErrCorrupt, codecID)
}

func (r *Reader) page(i int) []byte {
	for len(r.pool) <= i {
		r.pool = append(r.pool, make([]byte, guest.PageSize))
	}
	return r.pool[i]
}

func (r *Reader) device(t Target, s *Section) error {
	body, tail, err := r.envelope(uint64(r.lim.MaxDeviceBytes), s)
	if err != nil {
		return err
	}
	if len(tail) != 0 {
		return fmt.Errorf("%w: %d bytes after the device state", ErrCorrupt, len(tail))
	}
	ms, err := decodeMachine(body, r.lim)
	if err != nil {
		return err
	}
	if ms.Kind != r.h.Kind {
		return fmt.Errorf("%w: device state of kind %q in a %q stream", ErrCorrupt, ms.Kind, r.h.Kind)
	}
	s.RawSize = int64(len(body))
	s.Devices = len(ms.Devices)
	r.cur.Sections++
	r.cur.DeviceSections++
	r.digest.devices(ms)
	if t != nil {
		if err := t.StoreDevices(ms); err != nil {
			return fmt.Errorf("store devices: %w", err)
		}
	}
	return nil
}

func (r *Reader) disk(t Target, s *Section) error {
	maxRaw := uint64(r.lim.MaxDiskSectionBytes)
	body, tail, err := r.envelope(maxRaw, s)
	if err != nil {
		return err
	}
	if len(tail) != 0 {
		return fmt.Errorf("%w: %d bytes after the disk writes", ErrCorrupt, len(tail))
	}
	d := decoder{b: body}
	n := d.uvarint()
	if d.err == nil && n > uint64(r.lim.MaxDiskWrites) {
		return fmt.Errorf("%w: %d disk writes (limit %d)", ErrTooLarge, n, r.lim.MaxDiskWrites)
	}
	// Each write takes at least two body bytes, so n is also bounded by
	// the body we already hold.
	if d.err == nil && n > uint64(len(d.b)/2) {
		return fmt.Errorf("%w: %d disk writes in %d bytes", ErrCorrupt, n, len(d.b))
	}
	var ws []guest.DiskWrite
	if d.err == nil {
		ws = make([]guest.DiskWrite, 0, n)
	}
	var bytesTotal uint64
	for i := uint64(0); i < n && d.err == nil; i++ {
		off := d.uvarint()
		l := d.uvarint()
		if d.err != nil {
			break
		}
		if l > uint64(r.lim.MaxDiskWriteSize) {
			return fmt.Errorf("%w: disk write of %d bytes (limit %d)", ErrTooLarge, l, r.lim.MaxDiskWriteSize)
		}
		if off+l < off {
			return fmt.Errorf("%w: disk write at %d of %d bytes wraps", ErrCorrupt, off, l)
		}
		data := d.take(int(l))
		ws = append(ws, guest.DiskWrite{Offset: off, Data: data})
		bytesTotal += l
	}
	if d.err != nil {
		return d.err
	}
	if len(d.b) != 0 {
		return fmt.Errorf("%w: %d trailing bytes after disk writes", ErrCorrupt, len(d.b))
	}
	s.RawSize = int64(len(body))
	s.DiskWrites = len(ws)
	s.DiskBytes = int64(bytesTotal)
	r.cur.Sections++
	r.cur.DiskWrites += uint64(len(ws))
	r.cur.DiskBytes += bytesTotal
	for _, w := range ws {
		r.digest.disk(w)
	}
	if t != nil {
		if err := t.StoreDisk(ws); err != nil {
			return fmt.Errorf("store disk writes: %w", err)
		}
	}
	return nil
}

func (r *Reader) epochEnd(t Target, s *Section) error {
	if len(r.payload) != epochEndLen {
		return fmt.Errorf("%w: EPOCH-END of %d bytes, want %d", ErrCorrupt, len(r.payload), epochEndLen)
	}
	d := decoder{b: r.payload}
	var e EpochEnd
	for _, p := range []*uint64{&e.Epoch, &e.Sections, &e.Pages, &e.ZeroPages, &e.DeltaPages, &e.DeviceSections, &e.DiskWrites, &e.DiskBytes} {
		*p = d.u64()
	}
	copy(e.Digest[:], d.take(32))
	s.Epoch = &e
	if r.epochs > 0 && e.Epoch <= r.lastEpoch {
		return fmt.Errorf("%w: epoch %d after epoch %d", ErrCorrupt, e.Epoch, r.lastEpoch)
	}
	got := r.cur
	got.Epoch = e.Epoch
	got.Digest = r.digest.sum(e.Epoch)
	r.cur = EpochEnd{}
	counts, claimed := got, e
	counts.Digest, claimed.Digest = [32]byte{}, [32]byte{}
	if counts != claimed {
		return fmt.Errorf("%w: epoch %d summary (sections %d, pages %d, zero %d, xor %d, device sections %d, disk writes %d, disk bytes %d) disagrees with its content (%d, %d, %d, %d, %d, %d, %d)",
			ErrCorrupt, e.Epoch, e.Sections, e.Pages, e.ZeroPages, e.DeltaPages, e.DeviceSections, e.DiskWrites, e.DiskBytes,
			got.Sections, got.Pages, got.ZeroPages, got.DeltaPages, got.DeviceSections, got.DiskWrites, got.DiskBytes)
	}
	// Without a target the XOR bases were unknown, so the digest cannot
	// be checked.
	if t != nil && got.Digest != e.Digest {
		return fmt.Errorf("%w: epoch %d digest %x, content hashes to %x", ErrChecksum, e.Epoch, e.Digest[:8], got.Digest[:8])
	}
	r.epochs++
	r.lastEpoch = e.Epoch
	if t != nil {
		if err := t.EndEpoch(e); err != nil {
			return fmt.Errorf("end epoch %d: %w", e.Epoch, err)
		}
	}
	return nil
}

func (r *Reader) streamEnd(s *Section) error {
	if len(r.payload) != streamEndLen {
		return fmt.Errorf("%w: STREAM-END of %d bytes, want %d", ErrCorrupt, len(r.payload), streamEndLen)
	}
	if n := binary.LittleEndian.Uint64(r.payload); n != r.epochs {
		return fmt.Errorf("%w: STREAM-END counts %d epochs, stream had %d", ErrCorrupt, n, r.epochs)
	}
	if r.cur != (EpochEnd{}) {
		return fmt.Errorf("%w: stream ends inside an epoch (%d sections not committed)", ErrCorrupt, r.cur.Sections)
	}
	r.done = true
	return nil
}

// Restore reads a whole stream into t and returns its header. It is the
// path for snapshot files: every epoch is applied and committed in turn.
func Restore(src io.Reader, lim Limits, t Target) (Header, error) {
	r, err := NewReader(src, lim)
	if err != nil {
		return Header{}, err
	}
	for {
		if _, err := r.Next(t); err == io.EOF {
			return r.Header(), nil
		} else if err != nil {
			return r.Header(), err
		}
	}
}
