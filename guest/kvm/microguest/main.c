/*
 * Tandem's micro-guest. It runs entirely at CPL3 (on kvm-pvm hosts CPL0
 * code is emulated ~450x slower): the VMM builds its page tables and
 * descriptor tables and enters every vCPU at _start. All of its state is
 * in guest memory and registers, so it can be saved and restored at any
 * instruction.
 *
 * Workloads (the same as guest/synth's):
 *   kv    - vCPU 0 serves the kv line protocol on the UART at 0x3f8
 *           (through its bulk ports, see uart_write); the per-client
 *           records live at KV_GPA, the table, sized by guest memory,
 *           from DATA_GPA. Other vCPUs idle; with a dirty rate they
 *           dirty the top touch_bytes of the data range as the dirty
 *           workload does (the table takes the memory below it): a
 *           service that dirties memory while it answers. With a network card
 *           (the VMM wrote struct netdev at NET_GPA, see net.h), vCPU 0
 *           also serves the same protocol over UDP, one request per
 *           datagram, with the same table and <client>:<seq> records:
 *           each console poll (one IN from PORT_CONS_RX) also moves
 *           received frames into the RX ring, and the replies leave
 *           through the TX ring with one OUT to PORT_NET_TX per batch.
 *   dirty - every vCPU fills its share of touch_bytes from DATA_GPA with
 *           the fill profile, then writes its share of dirty_rate pages
 *           per second in the chosen pattern (hot: 10% of the pages take
 *           90% of the writes) with the write profile, timed by the TSC;
 *           with a disk, every 64th page write of vCPU 0 also writes that
 *           page to the paravirtual disk.
 *
 * The fill and write generators (fill_page, write_data) implement
 * guest/fill.go's specification bit for bit, so both guests hold the same
 * bytes for the same seed; guest/kvm's TestFillMatchesSynth checks it.
 */
#include "layout.h"
#include "net.h"

/* gcc may emit calls to these even with -ffreestanding. */
void *memcpy(void *d, const void *s, unsigned long n)
{
	u8 *dp = d;
	const u8 *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

void *memset(void *d, int c, unsigned long n)
{
	u8 *dp = d;
	while (n--)
		*dp++ = (u8)c;
	return d;
}

int memcmp(const void *a, const void *b, unsigned long n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void outl(u16 port, u32 v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void pause_cpu(void) { __asm__ volatile("pause"); }

static void panic(u32 code)
{
	for (;;)
		outl(PORT_PANIC, code);
}

/* Wait in the VMM (not spinning on a host core) for at most us
 * microseconds, or until console input arrives or the VMM wants the vCPU. */
static void idle(u32 us) { outl(PORT_IDLE, us); }

/* ---------------------------------------------------------------- UART */


/*
 * Console output. The 8250 registers work (LSR polling, one byte per OUT),
 * but every port access is a VM exit, and on kvm-pvm an exit costs tens of
 * microseconds and string I/O is split into one exit per byte. So the
 * micro-guest uses Tandem's bulk extension of the same UART: replies are
 * gathered in CONS_TX_GPA and sent with one OUT to PORT_CONS_TX, input is
 * fetched with one IN from PORT_CONS_RX. Both go through the UART's queue
 * and output sink in the VMM, so ordering with the 8250 path is kept.
 */
static u32 tx_len;

static void tx_flush(void)
{
	if (tx_len) {
		outl(PORT_CONS_TX, tx_len);
		tx_len = 0;
	}
}

static void uart_write(const char *p, u64 n)
{
	if (tx_len + n > CONS_BUF)
		tx_flush();
	memcpy((char *)CONS_TX_GPA + tx_len, p, n);
	tx_len += (u32)n;
}

/* ------------------------------------------------------------------ kv */

#define KV_KEYMAX    64
#define KV_VALMAX    256
#define CLIENT_SLOTS 1024
#define CLIENT_MAX   32
#define REPLY_MAX    352
#define LINE_MAX     512
#define KV_LINEMAX   (CLIENT_MAX + 1 + 20 + 5 + KV_KEYMAX + 1 + KV_VALMAX)

struct kventry {
	u8 state; /* 0 empty, 1 used, 2 deleted */
	u8 klen;
	u16 vlen;
	char key[KV_KEYMAX];
	char val[KV_VALMAX];
};

struct client {
	u8 used;
	u8 clen;
	u16 rlen;
	char name[CLIENT_MAX];
	u64 seq;
	char reply[REPLY_MAX];
};

/* 12 entries of 324 bytes per page, so none spans a page (the data range
 * has the 32-bit hole in it). */
#define KV_PER_PAGE  (4096 / sizeof(struct kventry))

struct kvstate {
	u64 count;        /* used entries */
	u64 slots;        /* table size, a power of two; 0 until kv_loop sizes it */
	u64 clients;
	u32 linelen;
	u32 overflow;     /* the current line is too long: drop it */
	char line[LINE_MAX];
	char reply[REPLY_MAX + 16];
	struct client client[CLIENT_SLOTS];
};

_Static_assert(sizeof(struct kvstate) < CONS_RX_GPA - KV_GPA, "kv state overlaps the console buffers");

#define KV ((struct kvstate *)KV_GPA)

static const struct bootblock *boot; /* set by guest_main */

static u64 page_gpa(const struct bootblock *bb, u64 page)
{
	u64 a = DATA_GPA + page * 4096;
	if (a >= bb->low_end)
		a = a - bb->low_end + bb->high_base;
	return a;
}

static struct kventry *kv_entry(u64 s)
{
	return (struct kventry *)(page_gpa(boot, s / KV_PER_PAGE) + (s % KV_PER_PAGE) * sizeof(struct kventry));
}

/* kv_dirty_pages is how many of the data range's pages (the top ones) a
 * kv guest with a dirty rate dirties: touch_bytes, at most half. */
static u64 kv_dirty_pages(const struct bootblock *bb, u64 data_pages)
{
	if (!bb->dirty_rate || bb->nvcpus < 2)
		return 0;
	u64 n = bb->touch_bytes / 4096;
	return n < data_pages / 2 ? n : data_pages / 2;
}

/* kv_size picks the table size from guest memory: the largest power of two
 * whose pages fit in the data range (1 GiB: 2,097,152 slots in 683 MiB,
 * full at 1,572,864 keys). */
static void kv_size(const struct bootblock *bb)
{
	u64 pages = bb->mem_bytes > DATA_GPA ? (bb->mem_bytes - DATA_GPA) / 4096 : 0;
	pages -= kv_dirty_pages(bb, pages);
	u64 fit = pages * KV_PER_PAGE, slots = 1;
	while (slots * 2 <= fit)
		slots *= 2;
	KV->slots = slots;
}

static u64 fnv(const char *p, u64 n)
{
	u64 h = 1469598103934665603ULL;
	while (n--) {
		h ^= (u8)*p++;
		h *= 1099511628211ULL;
	}
	return h;
}

static int is_idchar(char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

static int is_keychar(char c) { return is_idchar(c) || c == '.'; }

static int is_valchar(char c) { return c > ' ' && c < 127; }

/* kv_find returns the slot holding key, or the free slot to insert it at
 * (state != 1), or -1 if the table is full. */
static long kv_find(const char *k, u64 kl)
{
	u64 h = fnv(k, kl), n = KV->slots;
	long firstfree = -1;
	for (u64 i = 0; i < n; i++) {
		long s = (long)((h + i) & (n - 1));
		struct kventry *e = kv_entry((u64)s);
		if (e->state == 0)
			return firstfree >= 0 ? firstfree : s;
		if (e->state == 2) {
			if (firstfree < 0)
				firstfree = s;
			continue;
		}
		if (e->klen == kl && memcmp(e->key, k, kl) == 0)
			return s;
	}
	return firstfree;
}

struct buf {
	char *p;
	u64 n;
};

static void put(struct buf *b, const char *s, u64 n)
{
	if (b->n + n > REPLY_MAX)
		n = REPLY_MAX - b->n;
	memcpy(b->p + b->n, s, n);
	b->n += n;
}

static void puts_(struct buf *b, const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	put(b, s, n);
}

static struct client *client_find(const char *c, u64 cl)
{
	u64 h = fnv(c, cl);
	for (u64 i = 0; i < CLIENT_SLOTS; i++) {
		struct client *r = &KV->client[(h + i) & (CLIENT_SLOTS - 1)];
		if (!r->used) {
			if (KV->clients >= CLIENT_SLOTS - 1)
				return 0;
			r->used = 1;
			r->clen = (u8)cl;
			memcpy(r->name, c, cl);
			r->seq = 0;
			r->rlen = 0;
			KV->clients++;
			return r;
		}
		if (r->clen == cl && memcmp(r->name, c, cl) == 0)
			return r;
	}
	return 0;
}

#define MAX_FIELDS 8

/* split cuts l at single spaces (empty fields included, as kvproto.Parse
 * does); it returns the number of fields, at most MAX_FIELDS + 1. */
static u64 split(const char *l, u64 n, const char **f, u64 *fl)
{
	u64 nf = 0, start = 0;
	for (u64 i = 0; i <= n; i++) {
		if (i == n || l[i] == ' ') {
			if (nf <= MAX_FIELDS) {
				f[nf] = l + start;
				fl[nf] = i - start;
			}
			nf++;
			start = i + 1;
		}
	}
	return nf > MAX_FIELDS ? MAX_FIELDS + 1 : nf;
}

/* Where kv replies go: the console, or, while net_serve serves a
 * datagram, that datagram's reply buffer. */
static struct {
	char *p;
	u32 n, cap;
} net_reply;

static void kv_out(const char *p, u64 n)
{
	if (!net_reply.p) {
		uart_write(p, n);
		return;
	}
	if (n > net_reply.cap - net_reply.n)
		n = net_reply.cap - net_reply.n;
	memcpy(net_reply.p + net_reply.n, p, n);
	net_reply.n += (u32)n;
}

static void reply_line(struct buf *b)
{
	b->p[b->n] = '\n';
	kv_out(b->p, b->n + 1);
}

static void err_noid(const char *reason)
{
	struct buf b = {KV->reply, 0};
	puts_(&b, "ERR ");
	puts_(&b, reason);
	reply_line(&b);
}

/* The reply texts and the checks follow guest/kvproto.Parse, so both
 * backends answer a malformed line alike. Malformed requests are answered
 * but not recorded; "table full" is recorded; "too many clients" cannot be. */
static void kv_line(const char *l, u64 n)
{
	struct buf b = {KV->reply, 0};
	const char *f[MAX_FIELDS + 1];
	u64 fl[MAX_FIELDS + 1];
	if (n > 0 && l[n - 1] == '\r')
		n--;
	if (n == 0) {
		err_noid("empty request");
		return;
	}
	if (n > KV_LINEMAX) {
		err_noid("line too long");
		return;
	}
	u64 nf = split(l, n, f, fl);
	u64 colon = 0;
	while (colon < fl[0] && f[0][colon] != ':')
		colon++;
	if (colon == fl[0]) {
		err_noid("missing <client>:<seq>");
		return;
	}
	u64 cl = colon;
	int ok = cl >= 1 && cl <= CLIENT_MAX;
	for (u64 i = 0; ok && i < cl; i++)
		ok = is_idchar(f[0][i]);
	if (!ok) {
		err_noid("bad client: want [A-Za-z0-9_-]{1,32}");
		return;
	}
	const char *sp = f[0] + colon + 1;
	u64 sl = fl[0] - colon - 1, seq = 0;
	ok = sl > 0;
	for (u64 i = 0; ok && i < sl; i++) {
		u64 d = (u64)(sp[i] - '0');
		ok = sp[i] >= '0' && sp[i] <= '9' && seq <= (~0ULL - d) / 10;
		seq = seq * 10 + d;
	}
	if (!ok) {
		err_noid("bad seq: want a decimal uint64");
		return;
	}
	put(&b, f[0], fl[0]);
	puts_(&b, " ");
	const char *reason = 0;
	int set = 0, get = 0, del = 0;
	if (nf < 2) {
		reason = "missing command: want SET, GET or DEL";
	} else {
		set = fl[1] == 3 && memcmp(f[1], "SET", 3) == 0;
		get = fl[1] == 3 && memcmp(f[1], "GET", 3) == 0;
		del = fl[1] == 3 && memcmp(f[1], "DEL", 3) == 0;
		if (!set && !get && !del)
			reason = "unknown command: want SET, GET or DEL";
		else if (set && nf != 4)
			reason = "SET takes 2 argument(s) separated by single spaces";
		else if (!set && nf != 3)
			reason = get ? "GET takes 1 argument(s) separated by single spaces"
				     : "DEL takes 1 argument(s) separated by single spaces";
	}
	if (!reason) {
		ok = fl[2] >= 1 && fl[2] <= KV_KEYMAX;
		for (u64 i = 0; ok && i < fl[2]; i++)
			ok = is_keychar(f[2][i]);
		if (!ok)
			reason = "bad key: want [A-Za-z0-9_.-]{1,64}";
	}
	if (!reason && set) {
		ok = fl[3] >= 1 && fl[3] <= KV_VALMAX;
		for (u64 i = 0; ok && i < fl[3]; i++)
			ok = is_valchar(f[3][i]);
		if (!ok)
			reason = "bad value: want 1 to 256 printable ASCII bytes without spaces";
	}
	if (reason) {
		puts_(&b, "ERR ");
		puts_(&b, reason);
		reply_line(&b);
		return;
	}
	struct client *c = client_find(f[0], cl);
	if (!c) {
		puts_(&b, "ERR too many clients");
		reply_line(&b);
		return;
	}
	if (c->rlen > 0 && seq <= c->seq) {
		/* A retry: answer from the record, do not apply again. */
		kv_out(c->reply, c->rlen);
		return;
	}
	const char *key = f[2], *val = set ? f[3] : 0;
	u64 kl = fl[2], vl = set ? fl[3] : 0;
	long s = kv_find(key, kl);
	struct kventry *e = s >= 0 ? kv_entry((u64)s) : 0;
	int found = e && e->state == 1;
	if (get) {
		if (found) {
			puts_(&b, "OK ");
			put(&b, e->val, e->vlen);
		} else {
			puts_(&b, "NOTFOUND");
		}
	} else if (del) {
		if (found) {
			e->state = 2;
			KV->count--;
			puts_(&b, "OK");
		} else {
			puts_(&b, "NOTFOUND");
		}
	} else if (!e || (!found && KV->count >= KV->slots / 4 * 3)) {
		puts_(&b, "ERR table full");
	} else {
		if (!found) {
			e->klen = (u8)kl;
			memcpy(e->key, key, kl);
			KV->count++;
		}
		e->vlen = (u16)vl;
		memcpy(e->val, val, vl);
		e->state = 1;
		puts_(&b, "OK");
	}
	/* Record before the reply leaves, so a retry is answered identically. */
	b.p[b.n] = '\n';
	c->seq = seq;
	c->rlen = (u16)(b.n + 1);
	memcpy(c->reply, b.p, b.n + 1);
	kv_out(b.p, b.n + 1);
}

static void kv_byte(char c)
{
	if (c == '\n') {
		if (KV->overflow)
			err_noid("line too long");
		else
			kv_line(KV->line, KV->linelen);
		KV->linelen = 0;
		KV->overflow = 0;
		return;
	}
	if (KV->linelen >= LINE_MAX) {
		KV->overflow = 1;
		return;
	}
	KV->line[KV->linelen++] = c;
}

/* net_serve serves one datagram's request (net.c): the console's
 * handler, its reply captured instead of sent to the UART. */
u32 net_serve(const char *req, u32 n, char *reply, u32 cap)
{
	net_reply.p = reply;
	net_reply.n = 0;
	net_reply.cap = cap;
	kv_line(req, n);
	net_reply.p = 0;
	return net_reply.n;
}

void net_doorbell(u32 prod) { outl(PORT_NET_TX, prod); }

/* The console poll is also the card's: the one IN that fetches console
 * input moves received frames into the RX ring too, so the console path
 * pays one memory read for the card and no extra exit. */
static void kv_loop(const struct bootblock *bb)
{
	if (bb->fault_test)
		__asm__ volatile("ud2");
	if (!KV->slots)
		kv_size(bb);
	for (;;) {
		u32 n = inl(PORT_CONS_RX);
		if (n > CONS_BUF)
			panic(3);
		for (u32 i = 0; i < n; i++)
			kv_byte(((volatile char *)CONS_RX_GPA)[i]);
		tx_flush();
		u32 frames = net_poll((struct netdev *)NET_GPA, (const u8 *)NET_RX_GPA, (u8 *)NET_TX_GPA);
		if (n == 0 && frames == 0)
			idle(100000);
	}
}

/* --------------------------------------------------------------- dirty */

/* Shared between vCPUs; in guest memory like everything else. */
static volatile u32 touch_done; /* vCPUs that finished their share */
static u64 disk_submitted;

static u64 xorshift(u64 *s)
{
	u64 x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

/* ------------------------------------------- fill and write profiles */

/* guest/fill.go, bit for bit: Mix, next (splitmix64), streamSeed. */
static u64 mix(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static u64 next(u64 *s)
{
	*s += 0x9e3779b97f4a7c15ULL;
	return mix(*s);
}

static u64 stream_seed(u64 seed, u64 a, u64 b, u64 purpose)
{
	return mix(seed + purpose * 0x9e3779b97f4a7c15ULL) ^ mix(a ^ 0xa0761d6478bd642fULL) ^ mix(b ^ 0xe7037ed1a0b428dbULL);
}

static void random_bytes(u8 *d, u64 n, u64 *s)
{
	u64 i = 0;
	for (; i + 8 <= n; i += 8)
		*(u64 *)(d + i) = next(s);
	if (i < n) {
		u64 w = next(s);
		for (; i < n; i++, w >>= 8)
			d[i] = (u8)w;
	}
}

/* textBytes: made-up words from a vocabulary of 256, skewed to the first
 * ones, separated by spaces, a newline after about one in sixteen. */
static void text_bytes(u8 *d, u64 n, u64 *s)
{
	for (u64 i = 0; i < n;) {
		u64 r = next(s);
		u64 w = ((r & 0xff) * ((r >> 8) & 0xff)) >> 8;
		u64 h = mix(w + 0x51ed2701ULL);
		u64 len = h % 8 + 1;
		for (u64 j = 0; j < len && i < n; j++)
			d[i++] = (u8)('a' + (h >> (8 + 5 * j)) % 26);
		if (i < n)
			d[i++] = (r >> 16) % 16 == 0 ? '\n' : ' ';
	}
}

static u32 mixed_class(u64 seed, u64 page)
{
	u64 r = mix(stream_seed(seed, page, 0, 3)) % 100;
	if (r < MIXED_EMPTY_PCT)
		return CLASS_EMPTY;
	if (r < MIXED_EMPTY_PCT + MIXED_SPARSE_PCT)
		return CLASS_SPARSE;
	if (r < MIXED_EMPTY_PCT + MIXED_SPARSE_PCT + MIXED_TEXT_PCT)
		return CLASS_TEXT;
	return CLASS_RANDOM;
}

/* fill_page is FillPage: page (relative to the touched range) at gpa. */
static void fill_page(u64 gpa, u32 kind, u64 seed, u64 page)
{
	u64 s;
	switch (kind) {
	case FILL_RANDOM:
		s = stream_seed(seed, page, 0, 1);
		random_bytes((u8 *)gpa, 4096, &s);
		break;
	case FILL_TEXT:
		s = stream_seed(seed, page, 0, 2);
		text_bytes((u8 *)gpa, 4096, &s);
		break;
	case FILL_MIXED:
		switch (mixed_class(seed, page)) {
		case CLASS_SPARSE:
			fill_page(gpa, FILL_ZERO, seed, page);
			break;
		case CLASS_TEXT:
			fill_page(gpa, FILL_TEXT, seed, page);
			break;
		case CLASS_RANDOM:
			fill_page(gpa, FILL_RANDOM, seed, page);
			break;
		}
		break;
	case FILL_FILE:
		break; /* the VMM filled it */
	default:
		*(volatile u64 *)gpa = page + 1;
	}
}

/* write_offset is WriteOffset. */
static u64 write_offset(u64 n, u64 c, u64 p)
{
	if (n >= 4096)
		return 0;
	return mix(c ^ p) % ((4096 - n) / 8 + 1) * 8;
}

/* write_data is WriteData, straight into the page. */
static void write_data(u8 *d, u64 n, u32 kind, u64 seed, u64 c, u64 p)
{
	u64 s;
	switch (kind) {
	case WRITE_RANDOM:
		s = stream_seed(seed, p, c, 4);
		random_bytes(d, n, &s);
		break;
	case WRITE_TEXT:
		s = stream_seed(seed, p, c, 5);
		text_bytes(d, n, &s);
		break;
	default:
		for (u64 i = 0; i < n; i++)
			d[i] = (u8)(c >> (8 * (i % 8)));
	}
}

static void disk_write(const struct bootblock *bb, u64 page)
{
	if (!bb->disk_bytes)
		return;
	u32 done = inl(PORT_DISK_DONE);
	if (disk_submitted - done >= 16)
		return; /* queue full: skip rather than wait */
	struct diskreq *r = (struct diskreq *)DISK_GPA;
	u64 blocks = bb->disk_bytes / 4096;
	r->op = DISK_OP_WRITE;
	r->len = 4096;
	r->offset = (disk_submitted % blocks) * 4096;
	r->buf = page_gpa(bb, page);
	disk_submitted++;
	outl(PORT_DISK_SUBMIT, (u32)DISK_GPA);
}

/* dirty_loop runs the dirty workload on vCPU cpu, share number share of
 * nshare dirtying vCPUs, over npages data pages from data page base. */
static void dirty_loop(const struct bootblock *bb, u32 cpu, u32 share, u32 nshare, u64 base, u64 npages)
{
	/* Each vCPU touches its share; the last one reports the phase. */
	for (u64 p = npages * share / nshare; p < npages * (share + 1) / nshare; p++)
		fill_page(page_gpa(bb, base + p), bb->fill, bb->seed, base + p);
	if (__atomic_add_fetch(&touch_done, 1, __ATOMIC_SEQ_CST) == nshare)
		outl(PORT_PROGRESS, 1);
	if (cpu == 0 && bb->fault_test)
		__asm__ volatile("ud2");
	u64 rate = bb->dirty_rate / nshare;
	if (share == 0)
		rate += bb->dirty_rate % nshare;
	if (rate == 0 || npages == 0)
		for (;;)
			idle(1000000);
	u64 hz = bb->tsc_khz * 1000;
	u64 seed = bb->seed * 0x9E3779B97F4A7C15ULL + cpu + 1;
	if (!seed)
		seed = 1;
	u64 wbytes = bb->write_bytes >= 8 && bb->write_bytes <= 4096 ? bb->write_bytes : 8;
	u64 hot = npages / 10 ? npages / 10 : 1; /* 10% of the pages take 90% of the writes */
	volatile u64 *stats = (volatile u64 *)(STATS_GPA + 64 * (u64)cpu);
	u64 next = share % npages, count = 0;
	u64 start = rdtsc(), written = 0;
	for (;;) {
		u64 now = rdtsc();
		u64 elapsed = now - start;
		if (elapsed >= hz) {
			/* Rebase every second so products stay in 64 bits; a guest
			 * that fell more than a second behind (paused) skips. */
			start += hz;
			elapsed -= hz;
			written = written > rate ? written - rate : 0;
			if (elapsed >= hz) {
				start = now;
				elapsed = 0;
				written = 0;
			}
		}
		u64 due = elapsed * rate / hz;
		/* A small backlog cap: time the vCPU did not run (throttled,
		 * host busy) earns at most 5 ms of catch-up writes. */
		u64 cap = rate / 200 + 1;
		if (due > written + cap)
			written = due - cap;
		if (due <= written) {
			/* Wait until about a millisecond of writes is due and
			 * write them in one go: waiting for each write alone
			 * (every 10 us at 100,000 pages/s) is below what an idle
			 * exit is worth, so the vCPU spun between writes and kept
			 * a host core busy (0.7 of one at 100,000 pages/s, for
			 * 0.1 of writing), a core the epoch loop and the
			 * secondary need on a small host. */
			u64 quantum = rate / 1000 ? rate / 1000 : 1;
			u64 wait_ticks = (written + quantum) * hz / rate - elapsed;
			u64 us = wait_ticks / (bb->tsc_khz / 1000 ? bb->tsc_khz / 1000 : 1);
			if (us > 50)
				idle((u32)(us > 1000000 ? 1000000 : us));
			continue;
		}
		u64 batch = due - written;
		if (batch > 65536)
			batch = 65536;
		u64 p = 0;
		for (u64 i = 0; i < batch; i++) {
			switch (bb->pattern) {
			case PAT_RANDOM:
				p = xorshift(&seed) % npages;
				break;
			case PAT_HOT: {
				u64 r = xorshift(&seed);
				p = (r % 10 != 0 || hot == npages) ? (r / 10) % hot : hot + (r / 10) % (npages - hot);
				break;
			}
			default:
				p = next;
				next = (next + nshare) % npages;
			}
			p += base;
			count++;
			u64 off = write_offset(wbytes, count, p);
			if (wbytes == 8 && bb->write_data == WRITE_COUNTER)
				*(volatile u64 *)(page_gpa(bb, p) + off) = count;
			else
				write_data((u8 *)(page_gpa(bb, p) + off), wbytes, bb->write_data, bb->seed, count, p);
		}
		/* With a disk, every 64th page write also writes that page to it. */
		if (cpu == 0 && (written >> 6) != ((written + batch) >> 6))
			disk_write(bb, p);
		written += batch;
		/* For the VMM's PageWrites: one store a batch (the page is
		 * dirtied once an epoch, like any other). */
		*stats = count;
	}
}

void guest_main(u64 cpu, const struct bootblock *bb)
{
	if (bb->magic != BOOT_MAGIC || bb->version != BOOT_VERSION)
		panic(1);
	boot = bb;
	switch (bb->workload) {
	case WL_KV: {
		if (cpu == 0)
			kv_loop(bb);
		u64 data = bb->mem_bytes > DATA_GPA ? (bb->mem_bytes - DATA_GPA) / 4096 : 0;
		u64 n = kv_dirty_pages(bb, data);
		if (n)
			dirty_loop(bb, (u32)cpu, (u32)cpu - 1, bb->nvcpus - 1, data - n, n);
		for (;;)
			idle(1000000);
	}
	case WL_DIRTY: {
		u64 avail = bb->mem_bytes > DATA_GPA ? bb->mem_bytes - DATA_GPA : 0;
		u64 touch = bb->touch_bytes < avail ? bb->touch_bytes : avail;
		dirty_loop(bb, (u32)cpu, (u32)cpu, bb->nvcpus, 0, touch / 4096);
	}
	}
	panic(2);
}
