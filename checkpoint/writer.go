package checkpoint

import (
	"encoding/binary"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/tandemvm/tandem/guest"
)

// Compression selects how section bodies are compressed.
type Compression int

const (
	// CompressDefault is zstd's fastest level: epochs are latency bound.
	CompressDefault Compression = iota
	// CompressNone sends bodies as they are (a baseline, or for links
	// faster than the encoder).
	CompressNone
	CompressFastest
	CompressBetter
	CompressBest
)

var compressionNames = []string{"default", "none", "fastest", "better", "best"}

func (c Compression) String() string {
	if c >= 0 && int(c) < len(compressionNames) {
		return compressionNames[c]
	}
	return fmt.Sprintf("compression(%d)", int(c))
}

// ParseCompression reads a level name: none, fastest, default, better, best.
func ParseCompression(s string) (Compression, error) {
	for i, n := range compressionNames {
		if s == n {
			return Compression(i), nil
		}
	}
	return 0, fmt.Errorf("bad compression %q: want one of %s", s, strings.Join(compressionNames, ", "))
}

func (c Compression) zstdLevel() (zstd.EncoderLevel, bool) {
	switch c {
	case CompressDefault, CompressFastest:
		return zstd.SpeedFastest, true
	case CompressBetter:
		return zstd.SpeedBetterCompression, true
	case CompressBest:
		return zstd.SpeedBestCompression, true
	}
	return 0, false
}

// Body codecs in a section envelope.
const (
	codecNone = 0
	codecZstd = 1
)

// DefaultBatchPages is how many pages go in one RAM section by default.
const DefaultBatchPages = 1024

// Options configure a Writer. The zero value writes the current version
// with zstd's fastest level, a 64 MiB delta cache and 1024-page batches.
type Options struct {
	// Version to write; 0 means Current. Must lie in [MinWritable, Current].
	Version FormatVersion
	// Compression of section bodies.
	Compression Compression
	// CacheBytes bounds the XOR base cache (last shipped version of each
	// page); 0 means DefaultCacheBytes, negative disables XOR deltas.
	CacheBytes int64
	// HugeCache backs a cache of at most DefaultCacheBytes with huge
	// pages (cache_mem.go): for a writer that fills its cache, such as a
	// migration source's round 0 (one fault per 2 MiB instead of 512),
	// not for one that puts a few pages and ends, which would zero a
	// whole 2 MiB for each.
	HugeCache bool
	// BatchPages is the most pages per RAM section; 0 means
	// DefaultBatchPages. At most DefaultLimits().MaxPagesPerBatch.
	BatchPages int
	// Encoders is how many goroutines encode RAM sections (page hashes,
	// compression, CRC) at once; 0 or 1 means the caller's goroutine
	// alone. They run only within a WritePages call that spans more than
	// one section, so pass Encoders*BatchPages pages or more per call.
	// The stream is the same whatever the number (one connection,
	// sections in order); at most MaxEncoders.
	Encoders int
}

// MaxEncoders bounds Options.Encoders.
const MaxEncoders = 64

// PageCounts counts pages by how they travelled.
type PageCounts struct {
	Zero   uint64 `json:"zero"`
	Raw    uint64 `json:"raw"`
	Stored uint64 `json:"stored"`
	XOR    uint64 `json:"xor"`
	Run    uint64 `json:"run"`
}

// Total is the number of pages counted.
func (c PageCounts) Total() uint64 { return c.Zero + c.Raw + c.Stored + c.XOR + c.Run }

func (c *PageCounts) add(enc uint8, n uint64) {
	switch enc {
	case encZero:
		c.Zero += n
	case encRaw:
		c.Raw += n
	case encStored:
		c.Stored += n
	case encXOR:
		c.XOR += n
	case encRun:
		c.Run += n
	}
}

// Plus returns the sum of two counts.
func (c PageCounts) Plus(o PageCounts) PageCounts {
	return PageCounts{c.Zero + o.Zero, c.Raw + o.Raw, c.Stored + o.Stored, c.XOR + o.XOR, c.Run + o.Run}
}

// EpochEnd is the EPOCH-END section: the epoch's number, what it
// contained, and the SHA-256 of its content (see epochDigest). The Reader
// checks every field against what it applied before calling
// Target.EndEpoch.
type EpochEnd struct {
	Epoch          uint64   `json:"epoch"`
	Sections       uint64   `json:"sections"` // sections in the epoch before EPOCH-END
	Pages          uint64   `json:"pages"`
	ZeroPages      uint64   `json:"zero_pages"`
	DeltaPages     uint64   `json:"delta_pages"`
	DeviceSections uint64   `json:"device_sections"`
	DiskWrites     uint64   `json:"disk_writes"`
	DiskBytes      uint64   `json:"disk_bytes"`
	Digest         [32]byte `json:"-"`
}

func (e EpochEnd) encode() []byte {
	b := make([]byte, 0, epochEndLen)
	for _, v := range []uint64{e.Epoch, e.Sections, e.Pages, e.ZeroPages, e.DeltaPages, e.DeviceSections, e.DiskWrites, e.DiskBytes} {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	return append(b, e.Digest[:]...)
}

// EpochSummary is what Writer.EndEpoch reports about the epoch it closed.
type EpochSummary struct {
	EpochEnd
	Encodings PageCounts `json:"encodings"`
	// WireBytes is what the epoch cost on the wire, frames included.
	WireBytes uint64 `json:"wire_bytes"`
	// InputBytes is the content the epoch carried: pages times the page
	// size plus device state and disk bytes.
	InputBytes uint64 `json:"input_bytes"`
}

// Writer encodes a stream. It is not safe for concurrent use; one
// goroutine owns it (with Options.Encoders, WritePages runs helpers that
// end before it returns). After any write error the Writer is broken and every
// later call returns that error (the receiver will see a truncated stream).
type Writer struct {
	w      io.Writer
	h      Header
	feat   features
	lay    *layout
	enc    *zstd.Encoder // nil for CompressNone
	cache  *pageCache
	batch  int
	digest *epochDigest

	// Per-epoch state, reset by EndEpoch.
	cur  EpochSummary
	open bool // a section was written since the last EPOCH-END

	epochs    uint64
	lastEpoch uint64
	err       error // sticky
	ended     bool  // STREAM-END written or Close called

	// encoders is how many goroutines finish RAM sections (Options.Encoders).
	encoders int
	// noCacheBelow: pages below this index stay out of the cache
	// (SkipCacheBelow).
	noCacheBelow uint64
	// onPageHash sees every page as its section is written (OnPageHash).
	onPageHash func(index, sum uint64, zero bool)
	// deltaTried and deltaWon count pages with a base and those sent as
	// deltas in the current window; bypass is how many more non-zero
	// pages skip the cache (cache_bypass.go).
	deltaTried, deltaWon int
	bypass               int
	bypasses             uint64
	bypassFrom           time.Time
	// Reused buffers.
	secs []*ramSection
	body []byte
	out  []byte
}

// entry is one RAM entry being encoded.
type entry struct {
	index, count uint64
	enc          uint8
	data         []byte // raw, stored, run: the page (caller's memory)
	dOff, dEnd   int    // xor: the delta in Writer.deltas
	page         int    // stored: the page's position in its section
}

// NewWriter writes h (with Version and MinReader filled in from opts) and
// returns a Writer for the sections that follow.
func NewWriter(w io.Writer, h Header, opts Options) (*Writer, error) {
	v := opts.Version
	if v == 0 {
		v = Current
	}
	info, ok := lookupVersion(v)
	if !ok || v < MinWritable || v > Current {
		return nil, fmt.Errorf("%w: cannot write format version %d (this build writes %d to %d)", ErrBadInput, v, MinWritable, Current)
	}
	if h.PageSize == 0 {
		h.PageSize = guest.PageSize
	}
	if err := validateLayout(h); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadInput, err)
	}
	lim := DefaultLimits()
	if len(h.Regions) > lim.MaxRegions || len(h.Build) > lim.MaxStringLen || len(h.Kind) > lim.MaxStringLen {
		return nil, fmt.Errorf("%w: header over the default reader limits", ErrBadInput)
	}
	if h.Flags&mandatoryFlagMask&^knownMandatoryFlags != 0 {
		return nil, fmt.Errorf("%w: unknown mandatory flags %#x", ErrBadInput, h.Flags&mandatoryFlagMask)
	}
	h.Version = v
	// Every version so far can only be read by a reader that knows it.
	h.MinReader = v
	batch := opts.BatchPages
	if batch <= 0 {
		batch = DefaultBatchPages
	}
	if batch > lim.MaxPagesPerBatch {
		return nil, fmt.Errorf("%w: BatchPages %d over the limit %d", ErrBadInput, batch, lim.MaxPagesPerBatch)
	}
	cacheBytes := opts.CacheBytes
	if cacheBytes == 0 {
		cacheBytes = DefaultCacheBytes
	}
	if opts.Encoders < 0 || opts.Encoders > MaxEncoders {
		return nil, fmt.Errorf("%w: %d encoders (want 0 to %d)", ErrBadInput, opts.Encoders, MaxEncoders)
	}
	wr := &Writer{w: w, h: h, feat: info.feat, lay: newLayout(h.Regions), batch: batch, digest: newEpochDigest(),
		encoders: max(1, opts.Encoders)}
	if cacheBytes > 0 {
		wr.cache = newPageCache(cacheBytes, opts.HugeCache)
	}
	if level, ok := opts.Compression.zstdLevel(); ok {
		// EncodeAll runs on the calling goroutine; concurrency is how
		// many may call it at once (one per encoder), so the Writer
		// owns no goroutines of zstd's. CRC off: every section has CRC32C.
		enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(wr.encoders),
			zstd.WithEncoderCRC(false), zstd.WithZeroFrames(true))
		if err != nil {
			return nil, fmt.Errorf("checkpoint: zstd encoder: %w", err)
		}
		wr.enc = enc
	} else if opts.Compression != CompressNone {
		return nil, fmt.Errorf("%w: unknown compression %d", ErrBadInput, int(opts.Compression))
	}
	if _, err := w.Write(encodeHeader(h)); err != nil {
		wr.release()
		return nil, fmt.Errorf("checkpoint: write header: %w", err)
	}
	return wr, nil
}

// Encoders is how many goroutines encode RAM sections (Options.Encoders,
// at least 1): a caller passes this many sections' worth of pages per
// WritePages call to keep them busy.
func (w *Writer) Encoders() int { return w.encoders }

// Header returns the header as written.
func (w *Writer) Header() Header { return w.h }

// SeedPage records that the receiver holds data as page index, so the next
// change to it can travel as an XOR delta. Use it when both sides got the
// page by other means (a shared base image).
func (w *Writer) SeedPage(index uint64, data []byte) {
	if len(data) == guest.PageSize && w.lay.contains(index, 1) {
		w.cache.put(index, data)
	}
}

// InvalidatePage forgets the writer's copy of page index; call it when the
// receiver's copy may have changed other than by this stream. The next
// send of the page goes whole.
func (w *Writer) InvalidatePage(index uint64) { w.cache.invalidate(index) }

// InvalidateAll forgets every cached page.
func (w *Writer) InvalidateAll() { w.cache.invalidateAll() }

func (w *Writer) check() error {
	if w.err != nil {
		return w.err
	}
	if w.ended {
		return fmt.Errorf("%w: stream already ended", ErrWriterState)
	}
	return nil
}

// WritePages ships pages in RAM sections of at most BatchPages pages. Each
// Data must be guest.PageSize bytes; the Writer does not keep them after
// the call. The same index may appear more than once; the last one wins.
func (w *Writer) WritePages(pages []Page) error {
	if err := w.check(); err != nil {
		return err
	}
	for _, p := range pages {
		if len(p.Data) != guest.PageSize {
			return fmt.Errorf("%w: page %d has %d bytes, want %d", ErrBadInput, p.Index, len(p.Data), guest.PageSize)
		}
		if !w.lay.contains(p.Index, 1) {
			return fmt.Errorf("%w: page %d is outside the memory layout", ErrBadInput, p.Index)
		}
	}
	return w.writePages(pages)
}

// beginSection returns the output buffer with room for the frame.
func (w *Writer) beginSection() []byte {
	return append(w.out[:0], make([]byte, frameLen)...)
}

// appendEnvelope appends codec, raw length, body length and the body,
// compressed when that pays.
func (w *Writer) appendEnvelope(out, body []byte) []byte {
	if w.enc != nil && len(body) > 64 {
		start := len(out)
		out = append(out, codecZstd)
		out = binary.AppendUvarint(out, uint64(len(body)))
		// Compress straight into out after a generous length prefix slot:
		// encode to a temporary position and fix up the length.
		lenAt := len(out)
		out = append(out, 0, 0, 0, 0, 0)
		compAt := len(out)
		out = w.enc.EncodeAll(body, out)
		if clen := len(out) - compAt; clen < len(body) {
			// Rewrite the body length as a uvarint padded to 5 bytes, a
			// valid (non-minimal) uvarint, so no bytes have to move.
			putPaddedUvarint(out[lenAt:compAt], uint64(clen))
			return out
		}
		out = out[:start]
	}
	out = append(out, codecNone)
	out = binary.AppendUvarint(out, uint64(len(body)))
	out = binary.AppendUvarint(out, uint64(len(body)))
	return append(out, body...)
}

// putPaddedUvarint writes v as a uvarint of exactly len(b) bytes.
func putPaddedUvarint(b []byte, v uint64) {
	for i := range b {
		c := byte(v & 0x7f)
		v >>= 7
		if i < len(b)-1 {
			c |= 0x80
		}
		b[i] = c
	}
}

// endSection fills in the frame and writes the section.
func (w *Writer) endSection(t SectionType, out []byte) error {
	return w.writeSection(t, out, nil)
}

// directTail is the least tail of stored pages that writeSection writes
// from the caller's memory rather than copying it into the section.
const directTail = 64 << 10

// bufferedSink is a sink with a buffer (bufio.Writer): a write larger
// than the buffer goes straight through once the buffer is empty.
type bufferedSink interface {
	Buffered() int
	Available() int
	Flush() error
}

// writeSection fills in the frame of out, whose payload continues with
// the pages of tail, and writes the section.
func (w *Writer) writeSection(t SectionType, out []byte, tail [][]byte) error {
	out, tail, n := frameSection(t, out, tail, nil)
	w.out = out
	return w.sendSection(t, out, tail, n)
}

// sendSection writes a framed section: out, then the n bytes of tail in
// runs of adjacent pages, flushing the sink's buffer first when a run is
// larger than it, so those bytes are copied by the kernel only.
func (w *Writer) sendSection(t SectionType, out []byte, tail [][]byte, n int) error {
	_, err := w.w.Write(out)
	for len(tail) > 0 && err == nil {
		run := tail[0]
		tail = tail[1:]
		for len(tail) > 0 && adjacent(run, tail[0]) {
			run = run[:len(run)+len(tail[0])]
			tail = tail[1:]
		}
		if bs, ok := w.w.(bufferedSink); ok && bs.Buffered() > 0 && len(run) > bs.Buffered()+bs.Available() {
			if err = bs.Flush(); err != nil {
				break
			}
		}
		_, err = w.w.Write(run)
	}
	if err != nil {
		w.err = fmt.Errorf("checkpoint: write %v section: %w", t, err)
		return w.err
	}
	w.cur.WireBytes += uint64(len(out) + n)
	if t != SectionEpochEnd && t != SectionStreamEnd {
		w.cur.Sections++
		w.open = true
	}
	return nil
}

// adjacent says b starts where a ends, within a's capacity (so a can be
// extended over b without leaving a's array).
func adjacent(a, b []byte) bool {
	return len(b) > 0 && cap(a) > len(a) && &a[:len(a)+1][len(a)] == &b[0] && cap(a)-len(a) >= len(b)
}

// WriteDevices ships vCPU and device state as one DEVICE section.
func (w *Writer) WriteDevices(ms guest.MachineState) error {
	if err := w.check(); err != nil {
		return err
	}
	lim := DefaultLimits()
	if len(ms.Devices) > lim.MaxDevices {
		return fmt.Errorf("%w: %d devices (limit %d)", ErrBadInput, len(ms.Devices), lim.MaxDevices)
	}
	if ms.Kind != w.h.Kind {
		return fmt.Errorf("%w: device state of kind %q in a %q stream", ErrBadInput, ms.Kind, w.h.Kind)
	}
	for i, d := range ms.Devices {
		if d.Name == "" {
			return fmt.Errorf("%w: device %d has no name", ErrBadInput, i)
		}
	}
	body, err := encodeMachine(ms)
	if err != nil {
		return err
	}
	if len(body) > lim.MaxDeviceBytes {
		return fmt.Errorf("%w: device state of %d bytes (limit %d)", ErrBadInput, len(body), lim.MaxDeviceBytes)
	}
	out := w.appendEnvelope(w.beginSection(), body)
	if err := w.endSection(SectionDevice, out); err != nil {
		return err
	}
	w.digest.devices(ms)
	w.cur.DeviceSections++
	w.cur.InputBytes += uint64(len(body))
	return nil
}

// maxDiskSectionBytes bounds the decoded size of one DISK section.
const maxDiskSectionBytes = 16 << 20

// WriteDisk ships disk writes, in order, in as many DISK sections as the
// limits need. Writes over the per-write limit are split; the receiver
// applies the pieces in order, which has the same effect.
func (w *Writer) WriteDisk(ws []guest.DiskWrite) error {
	if err := w.check(); err != nil {
		return err
	}
	lim := DefaultLimits()
	var pending []guest.DiskWrite
	size := 0
	flush := func() error {
		if len(pending) == 0 {
			return nil
		}
		err := w.writeDiskSection(pending)
		pending, size = pending[:0], 0
		return err
	}
	for _, dw := range ws {
		if dw.Offset+uint64(len(dw.Data)) < dw.Offset {
			return fmt.Errorf("%w: disk write at %d of %d bytes wraps", ErrBadInput, dw.Offset, len(dw.Data))
		}
		for first := true; first || len(dw.Data) > 0; first = false {
			piece := guest.DiskWrite{Offset: dw.Offset, Data: dw.Data[:min(len(dw.Data), lim.MaxDiskWriteSize)]}
			if len(pending) == lim.MaxDiskWrites || size+len(piece.Data)+32 > maxDiskSectionBytes {
				if err := flush(); err != nil {
					return err
				}
			}
			pending = append(pending, piece)
			size += len(piece.Data) + 32
			dw.Offset += uint64(len(piece.Data))
			dw.Data = dw.Data[len(piece.Data):]
		}
	}
	return flush()
}

func (w *Writer) writeDiskSection(ws []guest.DiskWrite) error {
	body := binary.AppendUvarint(w.body[:0], uint64(len(ws)))
	var n uint64
	for _, dw := range ws {
		body = binary.AppendUvarint(body, dw.Offset)
		body = binary.AppendUvarint(body, uint64(len(dw.Data)))
		body = append(body, dw.Data...)
		n += uint64(len(dw.Data))
	}
	w.body = body
	out := w.appendEnvelope(w.beginSection(), body)
	if err := w.endSection(SectionDisk, out); err != nil {
		return err
	}
	for _, dw := range ws {
		w.digest.disk(dw)
	}
	w.cur.DiskWrites += uint64(len(ws))
	w.cur.DiskBytes += n
	w.cur.InputBytes += n
	return nil
}

// EndEpoch closes the epoch with an EPOCH-END section and returns its
// summary. Epoch numbers must increase through the stream.
func (w *Writer) EndEpoch(epoch uint64) (EpochSummary, error) {
	if err := w.check(); err != nil {
		return EpochSummary{}, err
	}
	if w.epochs > 0 && epoch <= w.lastEpoch {
		return EpochSummary{}, fmt.Errorf("%w: epoch %d after epoch %d", ErrBadInput, epoch, w.lastEpoch)
	}
	w.cur.Epoch = epoch
	w.cur.Digest = w.digest.sum(epoch)
	out := append(w.beginSection(), w.cur.EpochEnd.encode()...)
	if err := w.endSection(SectionEpochEnd, out); err != nil {
		return EpochSummary{}, err
	}
	sum := w.cur
	w.cur = EpochSummary{}
	w.open = false
	w.epochs++
	w.lastEpoch = epoch
	return sum, nil
}

// EndStream writes STREAM-END and releases the encoder. The epoch must be
// closed: content after the last EndEpoch would never be committed.
func (w *Writer) EndStream() error {
	if err := w.check(); err != nil {
		return err
	}
	if w.open {
		return fmt.Errorf("%w: EndStream inside an open epoch (call EndEpoch first)", ErrWriterState)
	}
	out := binary.LittleEndian.AppendUint64(w.beginSection(), w.epochs)
	err := w.endSection(SectionStreamEnd, out)
	w.ended = true
	w.release()
	return err
}

// Close releases the Writer without ending the stream (a reader will see
// it as truncated). It is safe to call after EndStream and more than once.
func (w *Writer) Close() error {
	w.ended = true
	w.release()
	return nil
}

func (w *Writer) release() {
	if w.enc != nil {
		w.enc.Close()
		w.enc = nil
	}
	w.cache = nil
}
