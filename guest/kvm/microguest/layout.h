/*
 * Guest-physical memory layout and I/O ports shared by the micro-guest and
 * the VMM (guest/kvm/layout.go mirrors every value here; a change on one
 * side must be made on the other, and the boot block's version bumped).
 */
#ifndef TANDEM_LAYOUT_H
#define TANDEM_LAYOUT_H

#define GDT_GPA        0x1000ULL  /* null, kcode, kdata, ucode, udata, TSS[i] */
#define TSS_GPA        0x20000ULL /* TSS (+ I/O bitmap) of vCPU i at TSS_GPA + 0x3000*i */
#define IDT_GPA        0x2000ULL
#define EXC_STACK_GPA  0x3000ULL  /* CPL0 stacks, 512 bytes per vCPU */
#define BOOT_GPA       0x5000ULL  /* struct bootblock */
#define STATS_GPA      0x6000ULL  /* u64 page writes made by vCPU i at STATS_GPA + 64*i, for the VMM to read */
#define PML4_GPA       0x10000ULL /* PDPT at 0x11000, PDs from 0x60000 */
#define USTACK_GPA     0x100000ULL /* 64 KiB user stack per vCPU */
#define USTACK_SIZE    0x10000ULL
#define IMAGE_GPA      0x200000ULL /* link address of the image */
#define KV_GPA         0x400000ULL /* kv state and client records; the kv table is in the data range */
#define CONS_RX_GPA    0xB00000ULL /* console bulk input buffer (4 KiB) */
#define CONS_TX_GPA    0xB01000ULL /* console bulk output buffer (4 KiB) */
#define CONS_BUF       4096
#define DISK_GPA       0xC00000ULL /* disk request descriptor and buffer */
#define NET_GPA        0xD00000ULL /* struct netdev: the card's address, ring indices and lengths, counters */
#define NET_RX_GPA     0xD10000ULL /* receive ring buffers, NET_SLOTS x NET_BUF */
#define NET_TX_GPA     0xD20000ULL /* transmit ring buffers, NET_SLOTS x NET_BUF */
#define NET_SLOTS      32
#define NET_BUF        2048
#define NET_MAGIC      0x3143494e4d444e54ULL /* "TNDMNIC1": the VMM configured a card */
#define DATA_GPA       0x1000000ULL /* dirty workload's touched range; kv workload's table */

#define MAX_VCPUS      16

/* Ports. The UART is a standard 8250 at 0x3f8; the others are Tandem's. */
#define PORT_UART      0x3f8
#define PORT_EXC       0x500 /* outl: CPU exception vector (CPL0 handler) */
#define PORT_PANIC     0x501 /* outl: guest panic code */
#define PORT_IDLE      0x502 /* outl: wait up to N microseconds for input */
#define PORT_PROGRESS  0x503 /* outl: workload phase (1 = touch done) */
#define PORT_CONS_RX   0x504 /* inl: move queued console input to CONS_RX_GPA, return count; with a card, also queued frames into the RX ring */
#define PORT_CONS_TX   0x505 /* outl n: send n bytes at CONS_TX_GPA to the console */
#define PORT_DISK_SUBMIT 0x510 /* outl: GPA of a disk request */
#define PORT_DISK_DONE   0x511 /* inl: number of requests completed */
#define PORT_NET_TX      0x520 /* outl prod: send the TX ring's frames up to prod (the doorbell) */

#define BOOT_MAGIC     0x544f4f424d444e54ULL /* "TNDMBOOT" */
#define BOOT_VERSION   2
#define IMAGE_MAGIC    0x3154534755474d54ULL /* "TMGUGST1" */

#define WL_KV     1
#define WL_DIRTY  2
#define PAT_SEQ    0
#define PAT_RANDOM 1
#define PAT_HOT    2

/* Fill and write-data profiles: guest/fill.go's FillKind* and WriteKind*. */
#define FILL_ZERO   0
#define FILL_RANDOM 1
#define FILL_TEXT   2
#define FILL_MIXED  3
#define FILL_FILE   4 /* the VMM filled the touched range before boot */
#define WRITE_COUNTER 0
#define WRITE_RANDOM  1
#define WRITE_TEXT    2
/* guest/fill.go's mixed page classes and their shares in percent. */
#define MIXED_EMPTY_PCT  47
#define MIXED_SPARSE_PCT 23
#define MIXED_TEXT_PCT   23
#define CLASS_EMPTY  0
#define CLASS_SPARSE 1
#define CLASS_TEXT   2
#define CLASS_RANDOM 3

#define DISK_OP_WRITE 1
#define DISK_OP_FLUSH 2

#ifndef __ASSEMBLER__
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

/* Written by the VMM before the first instruction; read-only to the guest. */
struct bootblock {
	u64 magic;
	u32 version;
	u32 nvcpus;
	u64 mem_bytes;   /* RAM size */
	u64 low_end;     /* RAM is [0, low_end) and, if mem_bytes > low_end, */
	u64 high_base;   /* [high_base, high_base + mem_bytes - low_end) */
	u32 workload;
	u32 pattern;
	u64 touch_bytes;
	u64 dirty_rate;  /* pages per second, all vCPUs together */
	u64 seed;
	u64 tsc_khz;
	u64 disk_bytes;  /* 0: no disk */
	u32 fault_test;  /* test hook: 1 = raise #UD once the workload starts */
	u32 fill;        /* FILL_*: what the touch writes */
	u32 write_bytes; /* bytes one dirtying write rewrites, 8 to 4096 */
	u32 write_data;  /* WRITE_*: what it writes */
};

/* One disk request; the VMM copies the buffer when it is submitted. */
struct diskreq {
	u32 op;
	u32 len;
	u64 offset;
	u64 buf;         /* GPA */
};

/* The image starts with this header (see entry.S). */
struct imagehdr {
	u64 magic;
	u32 version;
	u32 hdr_size;
	u64 entry;       /* address of _start */
	u64 exc_stubs;   /* address of the first exception stub */
	u32 stub_stride; /* bytes between stubs */
	u32 nstubs;
	u64 image_end;   /* end of .bss: memory the image owns */
};
#endif
#endif
