package failover

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
)

// TestVerifySliceLeavesHolesUnread: the verification slice hashes pages
// the host never populated as zero pages without reading them (a read
// would populate them: 14 to 18 us each and a page of RAM on hosts
// without a shared zero page), and hashes every written page from its
// contents, at its own index.
func TestVerifySliceLeavesHolesUnread(t *testing.T) {
	const pages = 2048
	mem, err := unix.Mmap(-1, 0, pages*guest.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		t.Skipf("map: %v", err)
	}
	defer unix.Munmap(mem)
	_ = unix.Madvise(mem, unix.MADV_NOHUGEPAGE)
	written := []uint64{0, 3, 600, 601, 1500, pages - 1}
	for _, p := range written {
		mem[p*guest.PageSize+9] = byte(p) | 1
	}
	r := guest.Region{GPA: 1 << 20, Mem: mem}
	var vs verifySlice
	hashSlice(&vs, r, 2, 1800) // pages 2 to 1801 of the region
	if len(vs.index) != 1800 {
		t.Fatalf("%d pages hashed, want 1800", len(vs.index))
	}
	// Only the written pages are mapped (mincore counts a read hole too,
	// where the kernel maps its zero page): the slice read none of the
	// others.
	vec := make([]byte, pages)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&mem[0])), uintptr(len(mem)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatalf("mincore: %v", errno)
	}
	var mapped int
	for _, v := range vec {
		mapped += int(v & 1)
	}
	if mapped > len(written) {
		t.Errorf("%d pages mapped after the slice, want %d (the written ones): it read holes", mapped, len(written))
	}
	// Then the hashes (reading every page now, holes included).
	for i, idx := range vs.index {
		p := idx - r.FirstPage()
		if p != uint64(i)+2 {
			t.Fatalf("entry %d is page %d, want %d", i, p, i+2)
		}
		want := guest.PageHash(idx, mem[p*guest.PageSize:(p+1)*guest.PageSize])
		if vs.hash[i] != want {
			t.Errorf("page %d: hash %x, want %x", p, vs.hash[i], want)
		}
	}
}
