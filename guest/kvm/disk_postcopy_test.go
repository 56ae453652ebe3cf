package kvm

import (
	"encoding/binary"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/uffd"
)

// On a post-copy destination the disk's submit faults a request's buffer
// in before its lock, but only for a valid write: a request of another
// op, or a length beyond the disk, is rejected without touching the
// memory its fields name (before, a junk flush could populate a whole
// region, and every page of it owed would wait for the source). No KVM
// needed: the guest's memory is plain anonymous memory here.
func TestDiskPrefetchOnlyValidWrites(t *testing.T) {
	const pages = 64
	for _, c := range []struct {
		name string
		op   uint32
		n    uint32
		want bool // the buffer faulted in
	}{
		{"junk op", 7, 32 * guest.PageSize, false},
		{"flush with a length", diskOpFlush, 32 * guest.PageSize, false},
		{"write past the disk", diskOpWrite, diskBytes + guest.PageSize, false},
		{"valid write", diskOpWrite, 8 * guest.PageSize, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			mem, err := unix.Mmap(-1, 0, (pages+4096)*guest.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Munmap(mem)
			g := &Guest{regions: []guest.Region{{GPA: 0, Mem: mem}}}
			g.SetPostcopy(true)
			le := binary.LittleEndian
			le.PutUint32(mem[0:], c.op)
			le.PutUint32(mem[4:], c.n)
			le.PutUint64(mem[8:], 0)
			le.PutUint64(mem[16:], 8*guest.PageSize) // buf
			d := newPVDisk(g, nil)
			// Keep a request that would be issued (a flush, the valid
			// write) off the device: the in-flight list is full.
			d.inflight = make([]*diskReq, maxDiskInflight)
			d.submit(0)
			if d.rejected != 1 {
				t.Errorf("rejected %d, want the request rejected", d.rejected)
			}
			in, err := uffd.Resident(mem[8*guest.PageSize : 16*guest.PageSize])
			if err != nil {
				t.Fatal(err)
			}
			if in != c.want {
				t.Errorf("the buffer named by a %s faulted in: %v, want %v", c.name, in, c.want)
			}
		})
	}
}
