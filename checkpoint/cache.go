package checkpoint

import "github.com/tandemvm/tandem/guest"

// DefaultCacheBytes is the default size of the writer's XOR base cache,
// QEMU's xbzrle default.
const DefaultCacheBytes = 64 << 20

// pageCache holds the last version of pages shipped in this stream (or
// seeded by the caller), which is what the receiver holds for them. It is
// direct-mapped by page index, like xbzrle's cache: O(1), no allocation
// after construction, and deterministic (the same input sequence always
// leaves the same contents, so encoding is reproducible). Consecutive
// indices map to consecutive slots, so a working set smaller than the
// cache never collides with itself.
//
// Invariant: a slot tagged with index i holds exactly the bytes the
// receiver has for page i once it applies everything written so far.
type pageCache struct {
	tags  []uint64 // index+1; 0 means empty
	data  []byte   // len(tags) pages; allocated once, touched lazily by the OS
	slots uint64
}

func newPageCache(bytes int64, huge bool) *pageCache {
	if bytes < guest.PageSize {
		return nil
	}
	n := uint64(bytes) / guest.PageSize
	c := &pageCache{tags: make([]uint64, n), slots: n}
	if huge && n*guest.PageSize <= maxHugeCache {
		c.data = hugeCacheMemory(c, n*guest.PageSize)
	}
	if c.data == nil {
		c.data = make([]byte, n*guest.PageSize)
	}
	return c
}

func (c *pageCache) slot(index uint64) uint64 { return index % c.slots }

// get returns the cached copy of page index, or nil.
func (c *pageCache) get(index uint64) []byte {
	if c == nil {
		return nil
	}
	s := c.slot(index)
	if c.tags[s] != index+1 {
		return nil
	}
	return c.data[s*guest.PageSize : (s+1)*guest.PageSize]
}

// put records data as the receiver's copy of page index.
func (c *pageCache) put(index uint64, data []byte) {
	if c == nil {
		return
	}
	s := c.slot(index)
	c.tags[s] = index + 1
	copy(c.data[s*guest.PageSize:(s+1)*guest.PageSize], data)
}

// invalidate forgets page index (the next send of it goes without delta).
func (c *pageCache) invalidate(index uint64) {
	if c == nil {
		return
	}
	if s := c.slot(index); c.tags[s] == index+1 {
		c.tags[s] = 0
	}
}

func (c *pageCache) invalidateAll() {
	if c == nil {
		return
	}
	clear(c.tags)
}
