package checkpoint

import (
	"bytes"
	"testing"

	"github.com/tandemvm/tandem/guest"
)

// populatedIn counts the pages of mem the host holds (guest.Populated).
func populatedIn(mem []byte) uint64 {
	var n uint64
	_ = guest.Populated(guest.Region{Mem: mem}, func(_, k uint64) error { n += k; return nil })
	return n
}

// TestPageCachePopulatesBlocks: the first put into a block of the cache
// populates the whole block, once; a later put into it keeps what the
// block holds; a block never written stays unpopulated.
func TestPageCachePopulatesBlocks(t *testing.T) {
	if !guest.ResidencyKnown() || !guest.PrefaultSupported() {
		t.Skip("no pagemap or no MADV_POPULATE_WRITE here")
	}
	c := newPageCache(8*cacheBlock*guest.PageSize + 5*guest.PageSize) // 8 whole blocks and a short one
	block := func(b uint64) []byte {
		lo := b * cacheBlock * guest.PageSize
		return c.data[lo:min(lo+cacheBlock*guest.PageSize, uint64(len(c.data)))]
	}
	if populatedIn(block(2)) != 0 {
		t.Skip("the runtime handed out memory already touched")
	}
	a := bytes.Repeat([]byte{1}, guest.PageSize)
	b := bytes.Repeat([]byte{2}, guest.PageSize)
	c.put(2*cacheBlock+7, a)
	if got := populatedIn(block(2)); got != cacheBlock {
		t.Errorf("after the first put into block 2, %d of its %d pages are populated", got, cacheBlock)
	}
	c.put(2*cacheBlock+8, b)
	if !bytes.Equal(c.get(2*cacheBlock+7), a) || !bytes.Equal(c.get(2*cacheBlock+8), b) {
		t.Error("a put into a populated block lost a page already cached")
	}
	if got := populatedIn(block(5)); got != 0 {
		t.Errorf("block 5, never written, has %d pages populated", got)
	}
	c.put(8*cacheBlock+4, a) // the short last block
	if !c.ready[8] || !bytes.Equal(c.get(8*cacheBlock+4), a) {
		t.Error("the short last block was not populated or lost its page")
	}
	if c.ready[5] {
		t.Error("block 5 marked ready without a put")
	}
}
