package kvm

import (
	"encoding/binary"
	"fmt"

	"github.com/tandemvm/tandem/guest"
)

// Guest-physical layout and ports, mirrored from microguest/layout.h. A
// change on one side must be made on the other and bootVersion bumped.
const (
	gdtGPA      = 0x1000
	tssGPA      = 0x20000 // vCPU i's TSS (with an I/O bitmap) at tssGPA + tssStride*i
	tssStride   = 0x3000
	tssLimit    = 104 + 8192 // header, then a bitmap granting every port, then 0xff
	idtGPA      = 0x2000
	excStackGPA = 0x3000 // 512-byte CPL0 stack per vCPU
	bootGPA     = 0x5000
	statsGPA    = 0x6000 // the dirty workload's page writes, a u64 per vCPU, 64 bytes apart
	pml4GPA     = 0x10000
	pdptGPA     = 0x11000
	pdGPA       = 0x60000 // one page directory per GiB of address space
	maxPDs      = 64      // pdGPA + 64 pages stays below 1 MiB
	ustackGPA   = 0x100000
	ustackSize  = 0x10000
	imageGPA    = 0x200000
	kvGPA       = 0x400000
	consRxGPA   = 0xB00000 // console bulk input buffer
	consTxGPA   = 0xB01000 // console bulk output buffer
	consBuf     = 4096
	diskReqGPA  = 0xC00000
	netGPA      = 0xD00000 // struct netdev (microguest/net.h)
	netRxGPA    = 0xD10000 // receive buffers, netSlots x netBuf
	netTxGPA    = 0xD20000 // transmit buffers
	netSlots    = 32
	netBuf      = 2048
	netMagic    = 0x3143494e4d444e54 // "TNDMNIC1"
	dataGPA     = 0x1000000          // the dirty workload's touched range starts here

	maxVCPUs = 16

	portUART         = 0x3f8
	portExc          = 0x500
	portPanic        = 0x501
	portIdle         = 0x502
	portProgress     = 0x503
	portConsRx       = 0x504
	portConsTx       = 0x505
	portDiskSubmit   = 0x510
	portDiskDone     = 0x511
	portNetTx        = 0x520
	bootMagic        = 0x544f4f424d444e54 // "TNDMBOOT"
	bootVersion      = 2
	imageMagic       = 0x3154534755474d54 // "TMGUGST1"
	imageHeaderBytes = 48

	wlKV    = 1
	wlDirty = 2

	diskOpWrite = 1
	diskOpFlush = 2

	// diskBytes is the part of the disk the micro-guest writes to.
	diskBytes = 16 << 20
)

// Memory above lowRAMEnd moves to highRAMBase, leaving the 32-bit hole
// [3 GiB, 4 GiB) free of RAM as on a PC (the TSS that VMX needs sits there).
const (
	lowRAMEnd   = 3 << 30
	highRAMBase = 4 << 30
	tssAddr     = 0xfffbd000
)

// MinMemory is the smallest guest the micro-guest runs in: its tables,
// stacks, image, kv table and disk buffers fill the first 16 MiB and the
// dirty workload's data starts there.
const MinMemory = 32 << 20

// MaxMemory is the largest guest the identity map (64 page directories of
// 2 MiB pages, hole included) covers.
const MaxMemory = maxPDs<<30 - (highRAMBase - lowRAMEnd)

// Segment selectors: GDT entries 1-4, then one 16-byte TSS descriptor per vCPU.
const (
	selKernelCode = 0x08
	selUserCode   = 0x18 | 3
	selUserData   = 0x20 | 3
	selTSS0       = 0x28
)

// topGPA is the end of guest RAM in guest-physical space.
func topGPA(mem uint64) uint64 {
	if mem <= lowRAMEnd {
		return mem
	}
	return highRAMBase + mem - lowRAMEnd
}

// ramRanges lists the RAM ranges of a guest of mem bytes.
func ramRanges(mem uint64) [][2]uint64 {
	if mem <= lowRAMEnd {
		return [][2]uint64{{0, mem}}
	}
	return [][2]uint64{{0, lowRAMEnd}, {highRAMBase, mem - lowRAMEnd}}
}

// bootBlock mirrors struct bootblock.
type bootBlock struct {
	Magic      uint64
	Version    uint32
	NVCPUs     uint32
	MemBytes   uint64
	LowEnd     uint64
	HighBase   uint64
	Workload   uint32
	Pattern    uint32
	TouchBytes uint64
	DirtyRate  uint64
	Seed       uint64
	TSCKHz     uint64
	DiskBytes  uint64
	FaultTest  uint32
	Fill       uint32 // guest.FillKind*
	WriteBytes uint32
	WriteData  uint32 // guest.WriteKind*
}

// writeMachine lays out everything the micro-guest expects in memory
// before its first instruction: GDT, TSSs, IDT, page tables, boot block and
// the image. It returns the pages it wrote (the caller marks them dirty).
func (g *Guest) writeMachine(img *image, bb bootBlock) ([][2]uint64, error) {
	m := g.lowMem()
	le := binary.LittleEndian
	// GDT: flat 64-bit code and data for CPL0 and CPL3.
	gdt := []uint64{0, 0x00af9b000000ffff, 0x00cf93000000ffff, 0x00affb000000ffff, 0x00cff3000000ffff}
	for i, d := range gdt {
		le.PutUint64(m[gdtGPA+8*i:], d)
	}
	for i := 0; i < g.cfg.VCPUs; i++ {
		base := uint64(tssGPA + tssStride*i)
		lo, hi := systemDescriptor(base, tssLimit, 0x9)
		off := gdtGPA + 8*len(gdt) + 16*i
		le.PutUint64(m[off:], lo)
		le.PutUint64(m[off+8:], hi)
		// 64-bit TSS: RSP0 at 4, I/O map base at 102. IOPL=3 should
		// grant the ports, but kvm-pvm does not honour IOPL at CPL3 and
		// checks the bitmap, so the bitmap (all zero: every port allowed)
		// is what lets the guest's port I/O exit to Tandem.
		t := m[base : base+tssLimit+1]
		le.PutUint64(t[4:], uint64(excStackGPA+512*(i+1)))
		le.PutUint16(t[102:], 104)
		t[tssLimit] = 0xff
	}
	// IDT: vectors 0-31 go to the image's stubs through CPL0 interrupt gates.
	for v := uint64(0); v < uint64(img.nstubs); v++ {
		off := img.stubs + v*uint64(img.stride)
		lo := off&0xffff | selKernelCode<<16 | 0xE<<40 | 1<<47 | (off>>16&0xffff)<<48
		le.PutUint64(m[idtGPA+16*v:], lo)
		le.PutUint64(m[idtGPA+16*v+8:], off>>32)
	}
	// Identity map with 2 MiB user pages, Accessed and Dirty preset so the
	// CPU never writes the tables (they stay out of the dirty log).
	top := topGPA(g.cfg.Memory)
	npd := (top + 1<<30 - 1) >> 30
	if npd > maxPDs {
		return nil, fmt.Errorf("%w: --memory %s: the micro-guest maps at most %s", guest.ErrConfig, guest.FormatSize(g.cfg.Memory), guest.FormatSize(MaxMemory))
	}
	const tableFlags = 0x7 | 0x20 // P, RW, U, A
	le.PutUint64(m[pml4GPA:], pdptGPA|tableFlags)
	for i := uint64(0); i < npd; i++ {
		le.PutUint64(m[pdptGPA+8*i:], (pdGPA+i*4096)|tableFlags)
		for j := uint64(0); j < 512; j++ {
			gpa := i<<30 | j<<21
			if !g.isRAM(gpa) {
				continue
			}
			le.PutUint64(m[pdGPA+i*4096+8*j:], gpa|0x7|0x20|0x40|0x80) // P RW U A D PS
		}
	}
	// Boot block.
	var buf [112]byte
	fields := []any{bb.Magic, bb.Version, bb.NVCPUs, bb.MemBytes, bb.LowEnd, bb.HighBase, bb.Workload, bb.Pattern,
		bb.TouchBytes, bb.DirtyRate, bb.Seed, bb.TSCKHz, bb.DiskBytes, bb.FaultTest, bb.Fill, bb.WriteBytes, bb.WriteData}
	off := 0
	for _, f := range fields {
		switch v := f.(type) {
		case uint64:
			le.PutUint64(buf[off:], v)
			off += 8
		case uint32:
			le.PutUint32(buf[off:], v)
			off += 4
		}
	}
	copy(m[bootGPA:], buf[:off])
	copy(m[imageGPA:], img.data)
	return [][2]uint64{{gdtGPA >> 12, (bootGPA-gdtGPA)>>12 + 1}, {tssGPA >> 12, tssStride * uint64(g.cfg.VCPUs) >> 12},
		{pml4GPA >> 12, 2}, {pdGPA >> 12, npd},
		{imageGPA >> 12, (uint64(len(img.data)) + 4095) >> 12}}, nil
}

// systemDescriptor encodes a 16-byte system segment descriptor (TSS).
func systemDescriptor(base uint64, limit uint32, typ uint64) (lo, hi uint64) {
	lo = uint64(limit&0xffff) | (base&0xffffff)<<16 | typ<<40 | 1<<47 |
		uint64(limit>>16&0xf)<<48 | (base>>24&0xff)<<56
	return lo, base >> 32
}

func (g *Guest) isRAM(gpa uint64) bool {
	for _, r := range ramRanges(g.cfg.Memory) {
		if gpa >= r[0] && gpa < r[0]+r[1] {
			return true
		}
	}
	return false
}

func (g *Guest) lowMem() []byte { return g.regions[0].Mem }
