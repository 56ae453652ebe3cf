package checkpoint

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/tandemvm/tandem/guest"
)

// A DISK section whose compressed body is small but decodes to more than
// MaxDiskSectionBytes is refused before it is decoded (a 60 MiB run of
// zeros compresses to a few KiB; a stream of them once made a secondary
// decode gigabytes).
func TestDiskSectionDecodedSizeIsBounded(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, testHeader(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	_ = w // it wrote the header
	const size = 60 << 20
	body := binary.AppendUvarint(nil, 1)
	body = binary.AppendUvarint(body, 0)
	body = binary.AppendUvarint(body, size)
	body = append(body, make([]byte, size)...)
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	z := enc.EncodeAll(body, nil)
	payload := []byte{codecZstd}
	payload = binary.AppendUvarint(payload, uint64(len(body)))
	payload = binary.AppendUvarint(payload, uint64(len(z)))
	payload = append(payload, z...)
	frame := make([]byte, frameLen)
	frame[0] = byte(SectionDisk)
	binary.LittleEndian.PutUint32(frame[1:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(frame[5:], crc32.Update(crc32.Checksum(frame[:5], castagnoli), castagnoli, payload))
	buf.Write(frame)
	buf.Write(payload)
	t.Logf("a %d MiB disk body in a %d-byte section", size>>20, len(payload))

	rd, err := NewReader(&buf, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	tg := newRecordingTarget()
	_, err = rd.Next(tg)
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Next: %v, want ErrTooLarge", err)
	}
	if tg.disks != 0 {
		t.Fatal("the target was handed disk writes from a refused section")
	}
	if DefaultLimits().MaxDiskSectionBytes < maxDiskSectionBytes {
		t.Fatal("the reader's limit is below what the writer produces")
	}
}

// The Writer's largest DISK sections pass the Reader's default limit.
func TestWriterDiskSectionsWithinReaderLimit(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, testHeader(), Options{Compression: CompressNone})
	if err != nil {
		t.Fatal(err)
	}
	var ws []guest.DiskWrite
	for i := range 40 {
		ws = append(ws, guest.DiskWrite{Offset: uint64(i) << 20, Data: bytes.Repeat([]byte{byte(i + 1)}, 1<<20-i)})
	}
	if err := w.WriteDisk(ws); err != nil {
		t.Fatal(err)
	}
	if _, err := w.EndEpoch(1); err != nil {
		t.Fatal(err)
	}
	if err := w.EndStream(); err != nil {
		t.Fatal(err)
	}
	if _, err := Restore(&buf, Limits{}, NewMemTarget()); err != nil {
		t.Fatalf("reading the writer's disk sections back: %v", err)
	}
}
