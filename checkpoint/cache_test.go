package checkpoint

import (
	"bytes"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/smaps"
)

// vmaOf is smaps.Mapping for a test: skipped where smaps is missing.
func vmaOf(t *testing.T, addr uintptr) (flags string, hugeKB int, found bool) {
	t.Helper()
	flags, hugeKB, found, err := smaps.Mapping(addr)
	if err != nil {
		t.Skipf("no smaps: %v", err)
	}
	return flags, hugeKB, found
}

// TestPageCacheHugeMemory: a cache of the default size asked for huge
// pages lives in its own 2 MiB-aligned mapping advised as huge pages,
// holds what is put into it, and is unmapped once unreachable; a larger
// one (a capped link's, which may mirror a sparse guest), or one not
// asked, stays in ordinary memory.
func TestPageCacheHugeMemory(t *testing.T) {
	if _, err := os.Stat("/sys/kernel/mm/transparent_hugepage"); err != nil {
		t.Skip("this kernel has no transparent huge pages")
	}
	c := newPageCache(DefaultCacheBytes, true)
	addr := uintptr(unsafe.Pointer(unsafe.SliceData(c.data)))
	if addr%hugeBlock != 0 {
		t.Fatalf("cache memory at %#x, not 2 MiB aligned", addr)
	}
	flags, _, found := vmaOf(t, addr)
	if !found || !strings.Contains(flags, " hg") {
		t.Fatalf("cache memory's mapping (found %v) is not advised huge: flags %q", found, flags)
	}
	a := bytes.Repeat([]byte{1}, guest.PageSize)
	b := bytes.Repeat([]byte{2}, guest.PageSize)
	last := c.slots - 1
	c.put(7, a)
	c.put(last, b)
	c.put(c.slots+8, a) // slot 8
	if !bytes.Equal(c.get(7), a) || !bytes.Equal(c.get(last), b) || !bytes.Equal(c.get(c.slots+8), a) || c.get(8) != nil {
		t.Error("the cache does not hold what was put")
	}
	_, kb, _ := vmaOf(t, addr)
	t.Logf("after three puts: %d KiB in huge pages", kb)

	big := newPageCache(2*DefaultCacheBytes, true)
	bigAddr := uintptr(unsafe.Pointer(unsafe.SliceData(big.data)))
	if flags, _, _ := vmaOf(t, bigAddr); strings.Contains(flags, " hg") {
		t.Errorf("a cache over %d bytes is advised huge", maxHugeCache)
	}
	runtime.KeepAlive(big)
	plain := newPageCache(DefaultCacheBytes, false)
	if flags, _, _ := vmaOf(t, uintptr(unsafe.Pointer(unsafe.SliceData(plain.data)))); strings.Contains(flags, " hg") {
		t.Error("a cache not asked for huge pages is advised huge")
	}
	runtime.KeepAlive(plain)

	c = nil
	deadline := time.Now().Add(5 * time.Second)
	for {
		runtime.GC()
		// Gone, or the range reused by a mapping of the runtime's (never
		// advised huge).
		if flags, _, found := vmaOf(t, addr); !found || !strings.Contains(flags, " hg") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the cache's mapping is still there 5 s after it became unreachable")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
