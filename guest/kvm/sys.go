package kvm

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl request numbers, built like <linux/kvm.h>'s _IO/_IOR/_IOW/_IOWR
// (x/sys/unix has no KVM constants). The values the notes verified on this
// host are checked in sys_test.go.
const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2
	kvmio    = 0xAE
)

func ioc(dir, nr, size uintptr) uintptr { return dir<<30 | size<<16 | kvmio<<8 | nr }

var (
	kvmGetAPIVersion       = ioc(iocNone, 0x00, 0)
	kvmCreateVM            = ioc(iocNone, 0x01, 0)
	kvmGetMSRIndexList     = ioc(iocRead|iocWrite, 0x02, 4)
	kvmCheckExtension      = ioc(iocNone, 0x03, 0)
	kvmGetVCPUMmapSize     = ioc(iocNone, 0x04, 0)
	kvmGetSupportedCPUID   = ioc(iocRead|iocWrite, 0x05, 8)
	kvmCreateVCPU          = ioc(iocNone, 0x41, 0)
	kvmGetDirtyLog         = ioc(iocWrite, 0x42, 16)
	kvmSetUserMemoryRegion = ioc(iocWrite, 0x46, 32)
	kvmSetTSSAddr          = ioc(iocNone, 0x47, 0)
	kvmSetClock            = ioc(iocWrite, 0x7b, 48)
	kvmGetClock            = ioc(iocRead, 0x7c, 48)
	kvmRun                 = ioc(iocNone, 0x80, 0)
	kvmGetRegs             = ioc(iocRead, 0x81, 144)
	kvmSetRegs             = ioc(iocWrite, 0x82, 144)
	kvmGetSregs            = ioc(iocRead, 0x83, 312)
	kvmSetSregs            = ioc(iocWrite, 0x84, 312)
	kvmGetMSRs             = ioc(iocRead|iocWrite, 0x88, 8)
	kvmSetMSRs             = ioc(iocWrite, 0x89, 8)
	kvmSetCPUID2           = ioc(iocWrite, 0x90, 8)
	kvmGetCPUID2           = ioc(iocRead|iocWrite, 0x91, 8)
	kvmGetMPState          = ioc(iocRead, 0x98, 4)
	kvmSetMPState          = ioc(iocWrite, 0x99, 4)
	kvmGetVCPUEvents       = ioc(iocRead, 0x9f, 64)
	kvmSetVCPUEvents       = ioc(iocWrite, 0xa0, 64)
	kvmGetDebugRegs        = ioc(iocRead, 0xa1, 128)
	kvmSetDebugRegs        = ioc(iocWrite, 0xa2, 128)
	kvmGetTSCKHz           = ioc(iocNone, 0xa3, 0)
	kvmEnableCap           = ioc(iocWrite, 0xa3, 104)
	kvmGetXSAVE            = ioc(iocRead, 0xa4, 4096)
	kvmSetXSAVE            = ioc(iocWrite, 0xa5, 4096)
	kvmGetXCRs             = ioc(iocRead, 0xa6, 392)
	kvmSetXCRs             = ioc(iocWrite, 0xa7, 392)
	kvmKVMClockCtrl        = ioc(iocNone, 0xad, 0)
	kvmClearDirtyLog       = ioc(iocRead|iocWrite, 0xc0, 24)
	kvmGetXSAVE2           = ioc(iocRead, 0xcf, 4096)
	kvmResetDirtyRings     = ioc(iocNone, 0xc7, 0)
)

// Capabilities (KVM_CAP_*).
const (
	capNrVCPUs                = 9
	capMaxVCPUs               = 66
	capSyncRegs               = 74
	capImmediateExit          = 136
	capManualDirtyLogProtect2 = 168
	capXSAVE2                 = 208
	capXCRs                   = 56
	capDebugRegs              = 50
	capVCPUEvents             = 41
	capAdjustClock            = 39
	capDirtyLogRing           = 192
	capDirtyLogRingAcqRel     = 223
)

// Exit reasons (KVM_EXIT_*).
const (
	exitUnknown       = 0
	exitException     = 1
	exitIO            = 2
	exitHypercall     = 3
	exitDebug         = 4
	exitHLT           = 5
	exitMMIO          = 6
	exitShutdown      = 8
	exitFailEntry     = 9
	exitIntr          = 10
	exitInternalError = 17
	exitSystemEvent   = 24
	exitDirtyRingFull = 31
)

const (
	memLogDirtyPages = 1
	manualProtect    = 1 // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
	// dirtyLogPageOffset is KVM_DIRTY_LOG_PAGE_OFFSET on x86: the page
	// of the vCPU fd where its dirty ring is mapped.
	dirtyLogPageOffset = 64
)

type userspaceMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

type dirtyLog struct {
	Slot   uint32
	_      uint32
	Bitmap uintptr
}

type clearDirtyLog struct {
	Slot      uint32
	NumPages  uint32
	FirstPage uint64
	Bitmap    uintptr
}

type enableCap struct {
	Cap   uint32
	Flags uint32
	Args  [4]uint64
	_     [64]byte
}

// Regs mirrors struct kvm_regs.
type Regs struct {
	RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11, R12, R13, R14, R15   uint64
	RIP, RFLAGS                            uint64
}

// Segment mirrors struct kvm_segment.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	Padding  uint8
}

// DTable mirrors struct kvm_dtable.
type DTable struct {
	Base    uint64
	Limit   uint16
	Padding [3]uint16
}

// Sregs mirrors struct kvm_sregs.
type Sregs struct {
	CS, DS, ES, FS, GS, SS, TR, LDT Segment
	GDT, IDT                        DTable
	CR0, CR2, CR3, CR4, CR8         uint64
	EFER, APICBase                  uint64
	InterruptBitmap                 [4]uint64
}

// DebugRegs mirrors struct kvm_debugregs.
type DebugRegs struct {
	DB       [4]uint64
	DR6, DR7 uint64
	Flags    uint64
	Reserved [9]uint64
}

// XCR is one entry of struct kvm_xcrs.
type XCR struct {
	Index    uint32
	Reserved uint32
	Value    uint64
}

type xcrs struct {
	NrXCRs  uint32
	Flags   uint32
	XCRs    [16]XCR
	Padding [16]uint64
}

// VCPUEvents mirrors struct kvm_vcpu_events as raw bytes: the kernel
// interprets it by its flags, and Tandem only carries it across.
type VCPUEvents [64]byte

// ClockData mirrors struct kvm_clock_data.
type ClockData struct {
	Clock    uint64
	Flags    uint32
	Pad0     uint32
	Realtime uint64
	HostTSC  uint64
	Pad      [4]uint32
}

// MSR is one struct kvm_msr_entry.
type MSR struct {
	Index    uint32
	Reserved uint32
	Data     uint64
}

type cpuidEntry struct {
	Function, Index, Flags, EAX, EBX, ECX, EDX uint32
	Padding                                    [3]uint32
}

func init() {
	// The layouts must match <linux/kvm.h> byte for byte.
	for _, c := range []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"kvm_regs", unsafe.Sizeof(Regs{}), 144},
		{"kvm_sregs", unsafe.Sizeof(Sregs{}), 312},
		{"kvm_debugregs", unsafe.Sizeof(DebugRegs{}), 128},
		{"kvm_xcrs", unsafe.Sizeof(xcrs{}), 392},
		{"kvm_clock_data", unsafe.Sizeof(ClockData{}), 48},
		{"kvm_userspace_memory_region", unsafe.Sizeof(userspaceMemoryRegion{}), 32},
		{"kvm_clear_dirty_log", unsafe.Sizeof(clearDirtyLog{}), 24},
		{"kvm_enable_cap", unsafe.Sizeof(enableCap{}), 104},
		{"kvm_dirty_gfn", unsafe.Sizeof(dirtyGFN{}), 16},
		{"kvm_cpuid_entry2", unsafe.Sizeof(cpuidEntry{}), 40},
		{"kvm_msr_entry", unsafe.Sizeof(MSR{}), 16},
	} {
		if c.got != c.want {
			panic(fmt.Sprintf("kvm: %s is %d bytes, want %d", c.name, c.got, c.want))
		}
	}
}

// ioctl issues a KVM ioctl and retries it on EINTR except for KVM_RUN,
// whose EINTR is how a kick arrives.
func ioctl(fd int, req uintptr, arg uintptr) (uintptr, error) {
	for {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
		if errno == unix.EINTR && req != kvmRun {
			continue
		}
		if errno != 0 {
			return r, errno
		}
		return r, nil
	}
}

// ioctlPtr passes a pointer; the conversion sits in the Syscall call
// expression so the object stays live and in place for the call.
func ioctlPtr[T any](fd int, req uintptr, p *T) (int, error) {
	for {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(p)))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return int(r), errno
		}
		return int(r), nil
	}
}

func checkExtension(fd int, cap uintptr) int {
	r, err := ioctl(fd, kvmCheckExtension, cap)
	if err != nil {
		return 0
	}
	return int(r)
}
