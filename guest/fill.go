package guest

import (
	"encoding/binary"
	"fmt"
	"os"
	"strings"
)

// Content and write profiles: what the dirty workload puts in the pages it
// touches (Workload.Fill) and what one dirtying write stores
// (Workload.WriteBytes, Workload.WriteData).
//
// The generators below are a specification shared by both backends: the
// KVM micro-guest implements them in C (guest/kvm/microguest/main.c,
// fill_page and write_data) and a test in guest/kvm checks that a page it
// filled equals FillPage's. Everything is a pure function of the seed, the
// page index within the touched range and, for writes, the vCPU's write
// counter, so the same seed gives the same memory in both guests.

// Fill profiles.
const (
	FillZero   = "zero"   // one 8-byte store per page (page index + 1): the old behaviour
	FillRandom = "random" // incompressible
	FillText   = "text"   // word salad that zstd compresses about 3:1
	FillMixed  = "mixed"  // zero, sparse, text and random pages in the shares measured on a Linux guest (below)
	// FillFilePrefix + PATH repeats the file over the touched range (page
	// i of the range holds the file's bytes from offset i*4096, modulo
	// its length), so a memory image can be replayed. The file is read by
	// the host when the guest boots; a receiving side never reads it.
	FillFilePrefix = "file:"
)

// The mixed profile's page classes in percent, measured: the memory of
// Debian 12's kernel (6.1.0-57) booted under QEMU 7.2 (TCG) in a 1 GiB
// guest with a busybox initramfs holding 251 MiB of real files (this
// machine's /usr/share/doc, /usr/share/man and 36 MiB of /usr/lib
// libraries, each read once), dumped with pmemsave once idle and
// classified page by page with zstd at Tandem's level
// (docs/linux-memory-histogram.sh, TestMemoryHistogram): 46.7 % zero,
// 22.7 % compressing 8:1 or better (mostly-zero pages: modelled as a page
// with one word set, the zero fill's page), 23.8 % compressing between
// 1.1:1 and 8:1 (modelled as text, about 3:1), 6.8 % incompressible
// (random). See docs/PERFORMANCE.md for the full histogram.
const (
	MixedEmptyPct  = 47 // all zero: nothing written
	MixedSparsePct = 23 // one 8-byte word set (page index + 1)
	MixedTextPct   = 23
	// the rest, 7 %, random
)

// Page classes of the mixed profile.
const (
	ClassEmpty  = 0
	ClassSparse = 1
	ClassText   = 2
	ClassRandom = 3
)

// Write-data profiles.
const (
	WriteCounter = "counter" // the vCPU's write counter in every 8-byte word: the old behaviour
	WriteRandom  = "random"
	WriteText    = "text"
)

// Write sizes.
const (
	MinWriteBytes     = 8
	MaxWriteBytes     = PageSize
	DefaultWriteBytes = 8
)

// Fill kinds as numbers (the micro-guest's boot block carries these).
const (
	FillKindZero   = 0
	FillKindRandom = 1
	FillKindText   = 2
	FillKindMixed  = 3
	FillKindFile   = 4 // the host filled the range before boot
)

// Write-data kinds as numbers.
const (
	WriteKindCounter = 0
	WriteKindRandom  = 1
	WriteKindText    = 2
)

// FillKind is the number of a fill profile; -1 for an unknown one.
func FillKind(fill string) int {
	switch {
	case fill == "" || fill == FillZero:
		return FillKindZero
	case fill == FillRandom:
		return FillKindRandom
	case fill == FillText:
		return FillKindText
	case fill == FillMixed:
		return FillKindMixed
	case strings.HasPrefix(fill, FillFilePrefix):
		// "file:" alone is a file fill whose path a receiver dropped
		// (replica's localConfig); CheckFillFile refuses it on a sender.
		return FillKindFile
	}
	return -1
}

// WriteKind is the number of a write-data profile; -1 for an unknown one.
func WriteKind(data string) int {
	switch data {
	case "", WriteCounter:
		return WriteKindCounter
	case WriteRandom:
		return WriteKindRandom
	case WriteText:
		return WriteKindText
	}
	return -1
}

const fillForms = "zero, random, text, mixed or file:PATH"

// FillFile returns the path of a file: fill, or "" (not a file fill, or
// one whose path was dropped).
func FillFile(fill string) string {
	if FillKind(fill) != FillKindFile {
		return ""
	}
	return strings.TrimPrefix(fill, FillFilePrefix)
}

// CheckFillFile checks that a file: fill names a readable, non-empty
// file (the sending side's flag check; a receiver never needs the file).
func CheckFillFile(fill string) error {
	if FillKind(fill) != FillKindFile {
		return nil
	}
	path := FillFile(fill)
	st, err := os.Stat(path)
	switch {
	case err != nil:
		return fmt.Errorf("%w: --fill %s: %v: want %s with a readable, non-empty file", ErrConfig, fill, err, fillForms)
	case !st.Mode().IsRegular() || st.Size() == 0:
		return fmt.Errorf("%w: --fill %s: not a non-empty regular file: want %s with a readable, non-empty file", ErrConfig, fill, fillForms)
	}
	return nil
}

// LoadFillFile reads a file: fill's file for a booting guest.
func LoadFillFile(fill string) ([]byte, error) {
	if err := CheckFillFile(fill); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(FillFile(fill))
	if err != nil {
		return nil, fmt.Errorf("%w: --fill %s: %v", ErrConfig, fill, err)
	}
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: --fill %s: the file is empty: want %s with a readable, non-empty file", ErrConfig, fill, fillForms)
	}
	return b, nil
}

// FillFromFile writes page (relative to the touched range) of a file fill
// into dst (one page).
func FillFromFile(dst, file []byte, page uint64) {
	off := page * PageSize % uint64(len(file))
	for n := 0; n < len(dst); {
		c := copy(dst[n:], file[off:])
		n += c
		off = 0
	}
}

// Mix is splitmix64's finaliser.
func Mix(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// next is splitmix64.
func next(s *uint64) uint64 {
	*s += 0x9e3779b97f4a7c15
	return Mix(*s)
}

// streamSeed starts the generator for one (seed, a, b, purpose).
func streamSeed(seed, a, b, purpose uint64) uint64 {
	return Mix(seed+purpose*0x9e3779b97f4a7c15) ^ Mix(a^0xa0761d6478bd642f) ^ Mix(b^0xe7037ed1a0b428db)
}

// MixedClass is the class (Class*) of page in a mixed fill.
func MixedClass(seed, page uint64) int {
	switch r := Mix(streamSeed(seed, page, 0, 3)) % 100; {
	case r < MixedEmptyPct:
		return ClassEmpty
	case r < MixedEmptyPct+MixedSparsePct:
		return ClassSparse
	case r < MixedEmptyPct+MixedSparsePct+MixedTextPct:
		return ClassText
	}
	return ClassRandom
}

// FillPage writes page (relative to the touched range) of a generated
// fill into dst, one page. kind is FillKindZero, Random, Text or Mixed.
// A mixed fill's empty pages are left as they are (all zero).
func FillPage(dst []byte, kind int, seed, page uint64) {
	switch kind {
	case FillKindRandom:
		s := streamSeed(seed, page, 0, 1)
		randomBytes(dst, &s)
	case FillKindText:
		s := streamSeed(seed, page, 0, 2)
		textBytes(dst, &s)
	case FillKindMixed:
		switch MixedClass(seed, page) {
		case ClassSparse:
			FillPage(dst, FillKindZero, seed, page)
		case ClassText:
			FillPage(dst, FillKindText, seed, page)
		case ClassRandom:
			FillPage(dst, FillKindRandom, seed, page)
		}
	default:
		binary.LittleEndian.PutUint64(dst, page+1)
	}
}

// WriteOffset is where a write of n bytes with counter c lands in page p:
// 8-aligned, the whole page for n = 4096. For n = 8 it is the synth
// guest's old slot choice.
func WriteOffset(n int, c, p uint64) uint64 {
	if n >= PageSize {
		return 0
	}
	slots := uint64(PageSize-n)/8 + 1
	return Mix(c^p) % slots * 8
}

// WriteData fills dst (the n bytes of one write) with the write-data
// profile kind for write counter c to page p.
func WriteData(dst []byte, kind int, seed, c, p uint64) {
	switch kind {
	case WriteKindRandom:
		s := streamSeed(seed, p, c, 4)
		randomBytes(dst, &s)
	case WriteKindText:
		s := streamSeed(seed, p, c, 5)
		textBytes(dst, &s)
	default:
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], c)
		for i := 0; i < len(dst); i += 8 {
			copy(dst[i:], w[:])
		}
	}
}

func randomBytes(dst []byte, s *uint64) {
	i := 0
	for ; i+8 <= len(dst); i += 8 {
		binary.LittleEndian.PutUint64(dst[i:], next(s))
	}
	if i < len(dst) {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], next(s))
		copy(dst[i:], w[:])
	}
}

// textVocabulary is how many distinct words the text generator uses.
const textVocabulary = 256

// textBytes fills dst with lower-case words separated by spaces, a
// newline after about one word in sixteen. Words come from a vocabulary of
// textVocabulary made-up words (1 to 8 letters, spelled by a hash of the
// word's number), picked with a skew towards the first ones, as in prose;
// the last word is cut at the end of dst.
func textBytes(dst []byte, s *uint64) {
	for i := 0; i < len(dst); {
		r := next(s)
		// Product of two uniform numbers: small word numbers are common.
		w := (r & 0xff) * ((r >> 8) & 0xff) >> 8
		h := Mix(w + 0x51ed2701)
		n := int(h%8) + 1
		for j := 0; j < n && i < len(dst); j++ {
			dst[i] = byte('a' + (h>>(8+5*uint(j)))%26)
			i++
		}
		if i < len(dst) {
			if (r>>16)%16 == 0 {
				dst[i] = '\n'
			} else {
				dst[i] = ' '
			}
			i++
		}
	}
}
