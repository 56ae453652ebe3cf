package checkpoint

import (
	"bytes"
	"encoding/binary"
	"math/bits"

	"github.com/tandemvm/tandem/guest"
)

// Page is one guest page to ship: its index (GPA >> guest.PageShift) and
// its guest.PageSize bytes.
type Page struct {
	Index uint64
	Data  []byte
}

// Page encodings inside a RAM section.
const (
	encZero   = 0 // a run of all-zero pages: count
	encRaw    = 1 // the page, in the (compressed) entry stream
	encStored = 2 // the page, in the section's uncompressed tail
	encXOR    = 3 // XOR against the receiver's copy: runs of non-zero XOR bytes
	encRun    = 4 // a run of identical non-zero pages: count, then the page
	numEnc    = 5
)

var encNames = [numEnc]string{"zero", "raw", "stored", "xor", "run"}

var zeroPage [guest.PageSize]byte

// isZeroPage is the zero-page test on the encode path. bytes.Equal against a
// static zero page runs the runtime's vectorised memequal, which is several
// times faster than a Go word loop; the zero page stays in L1 so the cost
// is one streaming read of p.
func isZeroPage(p []byte) bool { return guest.IsZeroPage(p) }

// maxDeltaLen is the largest XOR encoding we send instead of the page: past
// half a page the delta rarely beats raw after compression and costs more
// to apply.
const maxDeltaLen = guest.PageSize / 2

// appendXORDelta appends the XOR of page against base as runs: uvarint skip
// (bytes equal), uvarint length, then length XOR bytes. It returns the
// extended buffer and false if the encoding would exceed maxDeltaLen (the
// caller then sends the page another way and truncates dst itself).
//
// The scan skips equal blocks of xorBlock bytes with the runtime's
// vectorised compare, then goes eight bytes at a time and only drops to
// bytes at the edges of a change. A changed run grows a word at a time
// while every byte of the word differs, and the scan gives up as soon as
// the encoding so far plus the run would pass maxDeltaLen: a page
// rewritten with fresh data costs about half a page of word compares, not
// a byte loop over all of it (BenchmarkXORDelta).
func appendXORDelta(dst, page, base []byte) ([]byte, bool) {
	start := len(dst)
	var nruns int
	dst = append(dst, 0, 0) // room for a 2-byte run count (uvarint, <= 2048 runs)
	pos, last := 0, 0       // scan position, end of the previous run
	n := len(page)
	for pos < n {
		// Skip equal blocks, then equal words.
		for pos+xorBlock <= n && bytes.Equal(page[pos:pos+xorBlock], base[pos:pos+xorBlock]) {
			pos += xorBlock
		}
		for pos+8 <= n && binary.LittleEndian.Uint64(page[pos:]) == binary.LittleEndian.Uint64(base[pos:]) {
			pos += 8
		}
		if pos >= n {
			break
		}
		if pos+8 <= n {
			x := binary.LittleEndian.Uint64(page[pos:]) ^ binary.LittleEndian.Uint64(base[pos:])
			pos += bits.TrailingZeros64(x) >> 3
		} else {
			for pos < n && page[pos] == base[pos] {
				pos++
			}
			if pos >= n {
				break
			}
		}
		// A changed run: extend while bytes differ, tolerating up to 3
		// equal bytes inside it (a new run costs at least 2 header bytes).
		runStart := pos
		end := pos + 1
		for end < n {
			if len(dst)-start+end-runStart > maxDeltaLen {
				return dst, false // the run's bytes alone pass the limit
			}
			if end+8 <= n && !hasZeroByte(binary.LittleEndian.Uint64(page[end:])^binary.LittleEndian.Uint64(base[end:])) {
				end += 8 // eight bytes that all differ
				continue
			}
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
		if len(dst)-start+end-runStart > maxDeltaLen {
			return dst, false
		}
		dst = binary.AppendUvarint(dst, uint64(runStart-last))
		dst = binary.AppendUvarint(dst, uint64(end-runStart))
		i := runStart
		for ; i+8 <= end; i += 8 {
			dst = binary.LittleEndian.AppendUint64(dst, binary.LittleEndian.Uint64(page[i:])^binary.LittleEndian.Uint64(base[i:]))
		}
		for ; i < end; i++ {
			dst = append(dst, page[i]^base[i])
		}
		nruns++
		last, pos = end, end
		if len(dst)-start > maxDeltaLen {
			return dst, false
		}
	}
	// Fixed two-byte uvarint for the run count keeps the scan single-pass.
	dst[start] = byte(nruns) | 0x80
	dst[start+1] = byte(nruns >> 7)
	return dst, true
}

// xorBlock is the stretch appendXORDelta compares at once when skipping
// equal bytes.
const xorBlock = 256

// hasZeroByte says whether any of x's eight bytes is zero.
func hasZeroByte(x uint64) bool {
	const lo, hi = 0x0101010101010101, 0x8080808080808080
	return (x-lo)&^x&hi != 0
}

// applyXORDelta decodes a delta made by appendXORDelta into out, which
// holds the base on entry. It returns the bytes consumed, or -1 if the
// delta is malformed (runs past the page, zero-length run, short input).
func applyXORDelta(out, delta []byte) int {
	if len(delta) < 2 || delta[0]&0x80 == 0 || delta[1]&0x80 != 0 {
		return -1
	}
	nruns := int(delta[0]&0x7f) | int(delta[1])<<7
	p := 2
	pos := 0
	for i := 0; i < nruns; i++ {
		skip, n := binary.Uvarint(delta[p:])
		if n <= 0 || skip > uint64(len(out)-pos) {
			return -1
		}
		p += n
		pos += int(skip)
		l, n := binary.Uvarint(delta[p:])
		if n <= 0 || l == 0 || l > uint64(len(out)-pos) || l > uint64(len(delta)-p-n) {
			return -1
		}
		p += n
		xorBytes(out[pos:pos+int(l)], delta[p:p+int(l)])
		p += int(l)
		pos += int(l)
	}
	return p
}

func xorBytes(dst, src []byte) {
	for len(dst) >= 8 {
		binary.LittleEndian.PutUint64(dst, binary.LittleEndian.Uint64(dst)^binary.LittleEndian.Uint64(src))
		dst, src = dst[8:], src[8:]
	}
	for i := range dst {
		dst[i] ^= src[i]
	}
}

// looksIncompressible samples 256 bytes spread over the page and counts
// distinct values. Uniform random bytes give about 162 distinct values in
// 256 draws; text, code, page tables and structs give far fewer. Pages over
// the threshold skip zstd and travel in the stored tail, so incompressible
// memory moves at copy speed instead of at zstd's speed.
func looksIncompressible(p []byte) bool {
	var seen [4]uint64
	for i := 0; i < len(p); i += 16 {
		b := p[i+(i>>4)&15]
		seen[b>>6] |= 1 << (b & 63)
	}
	n := bits.OnesCount64(seen[0]) + bits.OnesCount64(seen[1]) + bits.OnesCount64(seen[2]) + bits.OnesCount64(seen[3])
	return n >= 128
}
