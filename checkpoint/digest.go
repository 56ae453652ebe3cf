package checkpoint

import (
	"crypto/sha256"
	"encoding/binary"
	"hash"

	"github.com/cespare/xxhash/v2"
	"github.com/tandemvm/tandem/guest"
)

// epochDigest is the SHA-256 both ends compute over an epoch's content in
// stream order, so EPOCH-END proves the receiver holds exactly what the
// writer meant, whatever the encoding. Records:
//
//	'Z' index                 an all-zero page (canonical: any page whose bytes are all zero)
//	'P' index xxh64(data)     any other page
//	'D' StateDigest           a DEVICE section
//	'W' offset len xxh64(data) a disk write
//	'E' epoch                 closes the epoch
//
// All integers are uint64 little endian. Page and disk data enter through
// their XXH64 (about 10x SHA-256's speed here; SHA-256 over every byte
// capped the encoder at 750 MB/s), so the digest proves equality up to a
// 2^-64 chance per page of an accidental collision: it guards against
// bugs and corruption, not against a malicious writer (the writer is the
// trusted primary; the CRC32C and validation guard the transport).
// Records are batched in a small buffer so each costs one hash call per
// 4 KiB of records.
type epochDigest struct {
	h   hash.Hash
	buf []byte
}

func newEpochDigest() *epochDigest {
	return &epochDigest{h: sha256.New(), buf: make([]byte, 0, 4096)}
}

func (d *epochDigest) flush() {
	if len(d.buf) > 0 {
		d.h.Write(d.buf)
		d.buf = d.buf[:0]
	}
}

func (d *epochDigest) record(tag byte, v uint64) {
	if len(d.buf)+32 > cap(d.buf) {
		d.flush()
	}
	d.buf = append(d.buf, tag)
	d.buf = binary.LittleEndian.AppendUint64(d.buf, v)
}

func (d *epochDigest) zero(index uint64) { d.record('Z', index) }

// pageHash records a page by its XXH64 (the sender and the reader both
// have it already).
func (d *epochDigest) pageHash(index, hash uint64) {
	d.record('P', index)
	d.buf = binary.LittleEndian.AppendUint64(d.buf, hash)
}

func (d *epochDigest) devices(ms guest.MachineState) {
	sd := guest.StateDigest(ms)
	d.flush()
	d.h.Write([]byte{'D'})
	d.h.Write(sd[:])
}

func (d *epochDigest) disk(w guest.DiskWrite) {
	d.record('W', w.Offset)
	d.buf = binary.LittleEndian.AppendUint64(d.buf, uint64(len(w.Data)))
	d.buf = binary.LittleEndian.AppendUint64(d.buf, xxhash.Sum64(w.Data))
}

// sum closes the epoch and resets the digest for the next one.
func (d *epochDigest) sum(epoch uint64) [32]byte {
	d.record('E', epoch)
	d.flush()
	var out [32]byte
	d.h.Sum(out[:0])
	d.h.Reset()
	return out
}

func (d *epochDigest) reset() {
	d.buf = d.buf[:0]
	d.h.Reset()
}
