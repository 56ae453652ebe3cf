package guest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"runtime"
	"sync"

	"github.com/cespare/xxhash/v2"
)

// Digest is a guest's memory and machine state reduced to 32 bytes. Two
// guests with equal digests hold the same memory at the same page indices
// and the same device state.
type Digest [32]byte

func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// MemHash is an order-free digest of guest memory that can be kept up to
// date page by page: every non-zero page contributes a 64-bit hash of its
// index and content, and the contributions are folded twice, by XOR and by
// addition, into 128 bits. A page that changes is taken out (its old hash
// XORed and subtracted away) and put back with its new content, so a
// replica that applies an epoch's pages rehashes only those pages, and a
// full scan of memory gives the same value as the incremental one.
//
// xxhash (github.com/cespare/xxhash/v2) rather than SHA-256 per page: it
// runs at memory speed, so a full scan of a 1 GiB guest takes tens of
// milliseconds, not half a second. The digest proves replication, it is
// not a defence against an adversary who can write guest memory.
//
// Each page's contribution is kept in a table of chunks of
// hashChunkPages entries, made when a chunk first holds a non-zero page:
// an epoch's pages update it at array speed, where a map of every
// non-zero page of a guest (131,072 entries for 512 MiB in use) took a
// cache miss per page and 7 % of a secondary's CPU at 100,000 pages/s. A
// chunk covers 2 MiB of guest memory and costs 4 KiB, so a guest pays
// for the chunks it uses: at most 1/512 of its memory when every chunk
// holds a page, about the map's price when its pages are dense, and 4 KiB
// per page in the worst scatter (one page per 2 MiB; a map costs tens of
// bytes). The chunk pointers cost 8 bytes per 2 MiB up to the highest
// page used (4 MiB for 1 TiB). Indices past maxHashChunks chunks (16 TiB)
// go to a map.
//
// A MemHash is not safe for concurrent use.
type MemHash struct {
	chunks  []*[hashChunkPages]uint64 // page index -> hash, by chunk; 0: zero or never recorded
	far     map[uint64]uint64         // indices beyond the chunks, non-zero only
	xor     uint64
	sum     uint64
	scratch [8]byte
}

const (
	hashChunkShift = 9
	hashChunkPages = 1 << hashChunkShift
	maxHashChunks  = 1 << 23
)

// NewMemHash returns the digest of all-zero memory.
func NewMemHash() *MemHash { return &MemHash{} }

// PageHash is one page's contribution; 0 for an all-zero page.
func PageHash(index uint64, page []byte) uint64 {
	if IsZeroPage(page) {
		return 0
	}
	return PageHashOf(index, xxhash.Sum64(page))
}

// PageHashOf is PageHash of a non-zero page whose XXH64 is sum, for a
// caller that has hashed the page already (a receiver verifying an epoch
// digest does: checkpoint.HashedTarget).
func PageHashOf(index, sum uint64) uint64 {
	// Mix the index in so that equal pages at different places differ.
	x := sum ^ (index * 0x9e3779b97f4a7c15)
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	if x == 0 {
		x = 1
	}
	return x
}

// Update records that page index now holds page.
func (m *MemHash) Update(index uint64, page []byte) {
	m.set(index, PageHash(index, page))
}

// UpdateHashed is Update for a page whose content is known by its XXH64
// (sum) or known to be all zero (zero; sum is then ignored).
func (m *MemHash) UpdateHashed(index, sum uint64, zero bool) {
	if zero {
		m.set(index, 0)
		return
	}
	m.set(index, PageHashOf(index, sum))
}

func (m *MemHash) set(index, h uint64) {
	var old uint64
	if index>>hashChunkShift >= maxHashChunks {
		old = m.far[index]
		if h != 0 {
			if m.far == nil {
				m.far = map[uint64]uint64{}
			}
			m.far[index] = h
		} else {
			delete(m.far, index)
		}
	} else {
		slot := m.slot(index, h != 0)
		if slot == nil { // never recorded, and h is zero: nothing changes
			return
		}
		old, *slot = *slot, h
	}
	m.xor ^= old ^ h
	m.sum += h - old
}

// slot is page index's entry in the chunks (index below maxHashChunks
// chunks), made with its chunk if create; nil if there is none and
// create is false.
func (m *MemHash) slot(index uint64, create bool) *uint64 {
	c := index >> hashChunkShift
	if c >= uint64(len(m.chunks)) {
		if !create {
			return nil
		}
		m.chunks = append(m.chunks, make([]*[hashChunkPages]uint64, c+1-uint64(len(m.chunks)))...)
	}
	ch := m.chunks[c]
	if ch == nil {
		if !create {
			return nil
		}
		ch = new([hashChunkPages]uint64)
		m.chunks[c] = ch
	}
	return &ch[index&(hashChunkPages-1)]
}

// Page returns page index's recorded contribution (0: all zero or never
// recorded), for a check that memory still holds what was recorded.
func (m *MemHash) Page(index uint64) uint64 {
	if index>>hashChunkShift >= maxHashChunks {
		return m.far[index]
	}
	if slot := m.slot(index, false); slot != nil {
		return *slot
	}
	return 0
}

// Sum returns the 128-bit fold as 16 bytes.
func (m *MemHash) Sum() [16]byte {
	var s [16]byte
	binary.LittleEndian.PutUint64(s[:8], m.xor)
	binary.LittleEndian.PutUint64(s[8:], m.sum)
	return s
}

// ScanMemory hashes every page of regions from scratch, using up to
// GOMAXPROCS goroutines. Precondition: nothing writes regions meanwhile
// (the guest is paused) or the caller accepts a torn view.
func ScanMemory(regions []Region) *MemHash {
	jobs := scanJobs(regions)
	parts := make([][]uint64, len(jobs)) // a job's page hashes, by page
	forEachJob(jobs, func(i int, j scanJob) {
		hs := make([]uint64, j.n)
		for p := range hs {
			hs[p] = PageHash(j.first+uint64(p), j.mem[p<<PageShift:(p+1)<<PageShift])
		}
		parts[i] = hs
	})
	mh := NewMemHash()
	for i, hs := range parts {
		for p, h := range hs {
			mh.set(jobs[i].first+uint64(p), h)
		}
	}
	return mh
}

// MemorySum is ScanMemory(regions).Sum() without keeping each page's
// hash: a switch-over or activation check needs the fold alone (keeping
// them, in maps as ScanMemory then did, made the scan take 12 to 55 %
// longer: BenchmarkMemorySum). Same precondition.
func MemorySum(regions []Region) [16]byte {
	jobs := scanJobs(regions)
	xors, sums := make([]uint64, len(jobs)), make([]uint64, len(jobs))
	forEachJob(jobs, func(i int, j scanJob) {
		var x, s uint64
		for p := uint64(0); p < j.n; p++ {
			h := PageHash(j.first+p, j.mem[p<<PageShift:(p+1)<<PageShift])
			x ^= h
			s += h
		}
		xors[i], sums[i] = x, s
	})
	var m MemHash
	for i := range jobs {
		m.xor ^= xors[i]
		m.sum += sums[i]
	}
	return m.Sum()
}

// scanJob is a piece of a full scan: n pages from page index first.
type scanJob struct {
	first, n uint64
	mem      []byte
}

// scanJobs cuts the populated pages of regions into jobs of at most 4,096
// pages. Never-populated pages are zero and contribute nothing.
func scanJobs(regions []Region) []scanJob {
	var jobs []scanJob
	const chunkPages = 4096
	for _, r := range regions {
		_ = Populated(r, func(first, pages uint64) error {
			for p := first; p < first+pages; p += chunkPages {
				n := min(chunkPages, first+pages-p)
				jobs = append(jobs, scanJob{r.FirstPage() + p, n, r.Mem[p<<PageShift : (p+n)<<PageShift]})
			}
			return nil
		})
	}
	return jobs
}

// forEachJob runs fn on every job on up to GOMAXPROCS goroutines and
// returns once all have run.
func forEachJob(jobs []scanJob, fn func(int, scanJob)) {
	workers := min(runtime.GOMAXPROCS(0), max(1, len(jobs)))
	var wg sync.WaitGroup
	next := make(chan int, len(jobs))
	for i := range jobs {
		next <- i
	}
	close(next)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				fn(i, jobs[i])
			}
		}()
	}
	wg.Wait()
}

// StateDigest hashes a machine state in a canonical order (the order the
// backend saved its devices in, which backends keep stable).
func StateDigest(s MachineState) Digest {
	h := sha256.New()
	var n [8]byte
	u := func(v uint64) {
		binary.LittleEndian.PutUint64(n[:], v)
		h.Write(n[:])
	}
	str := func(v []byte) {
		u(uint64(len(v)))
		h.Write(v)
	}
	str([]byte(s.Kind))
	u(uint64(len(s.Devices)))
	for _, d := range s.Devices {
		str([]byte(d.Name))
		u(uint64(d.Instance))
		u(uint64(d.Version))
		str(d.Fields)
		u(uint64(len(d.Subsections)))
		for _, sub := range d.Subsections {
			str([]byte(sub.Name))
			u(uint64(sub.Version))
			str(sub.Fields)
		}
	}
	var d Digest
	h.Sum(d[:0])
	return d
}

// CombineDigest joins a memory hash and a state digest into the one figure
// both ends of a migration or an epoch report.
func CombineDigest(mem [16]byte, s MachineState) Digest {
	st := StateDigest(s)
	return sha256.Sum256(append(mem[:], st[:]...))
}

var zeroPage [PageSize]byte

// IsZeroPage reports whether p, a page or any shorter slice, is all zero
// bytes. Comparing against a zero page lets the runtime's vectorised
// memequal do the work: it scans at memory speed (checkpoint's
// BenchmarkEncodeZeroPages), faster than a hand-written word loop.
func IsZeroPage(p []byte) bool {
	for len(p) > PageSize {
		if !bytes.Equal(p[:PageSize], zeroPage[:]) {
			return false
		}
		p = p[PageSize:]
	}
	return bytes.Equal(p, zeroPage[:len(p)])
}
