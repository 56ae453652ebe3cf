/*
 * The micro-guest's network stack (see net.h). Every field is read from a
 * frame only after the frame's own length was checked to hold it, in the
 * order guest/netframe checks them, so a malformed frame is dropped under
 * the same reason on both guests.
 */
#include "net.h"

#define ETH_HLEN  14
#define ARP_LEN   28
#define IP_HLEN   20
#define UDP_HLEN  8
#define ETH_ARP   0x0806
#define ETH_IPV4  0x0800
#define PROTO_UDP 17
#define ARP_REQUEST 1
#define ARP_REPLY   2

static const u8 broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }

static void put16(u8 *p, u32 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

static int eq(const u8 *a, const u8 *b, u32 n)
{
	for (u32 i = 0; i < n; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

static void cpy(u8 *d, const u8 *s, u32 n)
{
	for (u32 i = 0; i < n; i++)
		d[i] = s[i];
}

/* sum adds b to an unfolded RFC 1071 sum (an odd last byte is the high
 * half of a word). */
static u64 sum(u64 s, const u8 *b, u32 n)
{
	for (; n >= 2; n -= 2, b += 2)
		s += get16(b);
	if (n)
		s += (u64)b[0] << 8;
	return s;
}

/* fold is the checksum of an unfolded sum: 0 over data that includes a
 * correct checksum field. */
static u16 fold(u64 s)
{
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}

/* pseudo is the unfolded sum of UDP's IPv4 pseudo-header. */
static u64 pseudo(const u8 *src, const u8 *dst, u32 n)
{
	return sum(sum(0, src, 4), dst, 4) + PROTO_UDP + n;
}

static u32 drop(struct netdev *nd, u32 reason)
{
	nd->dropped[reason]++;
	return 0;
}

/* pad zero-fills a frame of n bytes to the minimum and returns its length. */
static u32 pad(u8 *f, u32 n)
{
	for (; n < NET_MINFRAME; n++)
		f[n] = 0;
	return n;
}

static void eth_header(u8 *f, const u8 *dst, const u8 *src, u32 type)
{
	cpy(f, dst, 6);
	cpy(f + 6, src, 6);
	put16(f + 12, type);
}

/* arp_reply answers a request (p, already checked) for our address. */
static u32 arp_reply(struct netdev *nd, const u8 *p, u8 *out)
{
	u8 *a = out + ETH_HLEN;
	eth_header(out, p + 8, nd->mac, ETH_ARP);
	put16(a, 1);
	put16(a + 2, ETH_IPV4);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, ARP_REPLY);
	cpy(a + 8, nd->mac, 6);
	cpy(a + 14, nd->ip, 4);
	cpy(a + 18, p + 8, 6);  /* target: the asker's MAC */
	cpy(a + 24, p + 14, 4); /* and IP */
	nd->arp_replies++;
	nd->sent++;
	return pad(out, ETH_HLEN + ARP_LEN);
}

static u32 arp_input(struct netdev *nd, const u8 *p, u32 n, u8 *out)
{
	if (n < ARP_LEN)
		return drop(nd, NET_DROP_SHORT);
	if (get16(p) != 1 || get16(p + 2) != ETH_IPV4 || p[4] != 6 || p[5] != 4)
		return drop(nd, NET_DROP_UNSUPPORTED);
	u32 op = get16(p + 6);
	if (op != ARP_REQUEST && op != ARP_REPLY)
		return drop(nd, NET_DROP_UNSUPPORTED);
	if (op != ARP_REQUEST || !eq(p + 24, nd->ip, 4))
		return drop(nd, NET_DROP_NOT_OURS);
	return arp_reply(nd, p, out);
}

/* udp_reply wraps the dlen bytes of data already at out + 42 in a
 * datagram from our address and port to (mac, ip, port). */
static u32 udp_reply(struct netdev *nd, u8 *out, const u8 *mac, const u8 *ip, u32 port, u32 dlen)
{
	u8 *h = out + ETH_HLEN, *u = h + IP_HLEN;
	u32 ulen = UDP_HLEN + dlen;
	eth_header(out, mac, nd->mac, ETH_IPV4);
	h[0] = 0x45;
	h[1] = 0;
	put16(h + 2, IP_HLEN + ulen);
	put16(h + 4, ++nd->next_id);
	put16(h + 6, 0x4000); /* don't fragment */
	h[8] = 64;
	h[9] = PROTO_UDP;
	put16(h + 10, 0);
	cpy(h + 12, nd->ip, 4);
	cpy(h + 16, ip, 4);
	put16(h + 10, fold(sum(0, h, IP_HLEN)));
	put16(u, nd->port);
	put16(u + 2, port);
	put16(u + 4, ulen);
	put16(u + 6, 0);
	u16 c = fold(sum(pseudo(nd->ip, ip, ulen), u, ulen));
	put16(u + 6, c ? c : 0xffff); /* 0 would mean "no checksum" */
	nd->sent++;
	return pad(out, ETH_HLEN + IP_HLEN + ulen);
}

/* udp_input serves a datagram (u, n bytes: the IPv4 payload) as one kv
 * request; a trailing newline (and a carriage return before it) is
 * optional, and an empty request gets no reply. */
static u32 udp_input(struct netdev *nd, const u8 *eth, const u8 *ip, const u8 *u, u32 n, u8 *out)
{
	if (n < UDP_HLEN)
		return drop(nd, NET_DROP_SHORT);
	u32 ulen = get16(u + 4);
	if (ulen < UDP_HLEN || ulen > n)
		return drop(nd, NET_DROP_BAD_LENGTH);
	if (get16(u + 6) != 0 && fold(sum(pseudo(ip + 12, ip + 16, ulen), u, ulen)) != 0)
		return drop(nd, NET_DROP_BAD_CHECKSUM);
	if (get16(u + 2) != nd->port)
		return drop(nd, NET_DROP_NOT_OURS);
	nd->datagrams++;
	const u8 *data = u + UDP_HLEN;
	u32 dlen = ulen - UDP_HLEN;
	if (dlen > 0 && data[dlen - 1] == '\n')
		dlen--;
	if (dlen > 0 && data[dlen - 1] == '\r')
		dlen--;
	if (dlen == 0)
		return 0;
	u32 rlen = net_serve((const char *)data, dlen, (char *)out + ETH_HLEN + IP_HLEN + UDP_HLEN, NET_MAXDATA);
	if (rlen > NET_MAXDATA)
		rlen = NET_MAXDATA;
	return udp_reply(nd, out, eth + 6, ip + 12, get16(u), rlen);
}

static u32 ip_input(struct netdev *nd, const u8 *eth, const u8 *p, u32 n, u8 *out)
{
	if (n < IP_HLEN)
		return drop(nd, NET_DROP_SHORT);
	if (p[0] >> 4 != 4)
		return drop(nd, NET_DROP_UNSUPPORTED);
	u32 ihl = (u32)(p[0] & 0x0f) * 4;
	if (ihl < IP_HLEN || ihl > n)
		return drop(nd, NET_DROP_BAD_LENGTH);
	u32 total = get16(p + 2);
	if (total < ihl || total > n)
		return drop(nd, NET_DROP_BAD_LENGTH);
	if (fold(sum(0, p, ihl)) != 0)
		return drop(nd, NET_DROP_BAD_CHECKSUM);
	if (get16(p + 6) & 0x3fff) /* more fragments, or an offset */
		return drop(nd, NET_DROP_FRAGMENT);
	if (p[9] != PROTO_UDP)
		return drop(nd, NET_DROP_UNSUPPORTED);
	if (!eq(p + 16, nd->ip, 4))
		return drop(nd, NET_DROP_NOT_OURS);
	return udp_input(nd, eth, p, p + ihl, total - ihl, out);
}

u32 net_input(struct netdev *nd, const u8 *f, u32 len, u8 *out)
{
	nd->received++;
	if (len < ETH_HLEN)
		return drop(nd, NET_DROP_SHORT);
	if (len > NET_MAXFRAME)
		return drop(nd, NET_DROP_TOO_LONG);
	u32 type = get16(f + 12);
	if (type < 0x0600) /* an 802.3 length field, not a type */
		return drop(nd, NET_DROP_UNSUPPORTED);
	if (!eq(f, nd->mac, 6) && !eq(f, broadcast, 6))
		return drop(nd, NET_DROP_NOT_OURS);
	if (type == ETH_ARP)
		return arp_input(nd, f + ETH_HLEN, len - ETH_HLEN, out);
	if (type == ETH_IPV4)
		return ip_input(nd, f, f + ETH_HLEN, len - ETH_HLEN, out);
	return drop(nd, NET_DROP_UNSUPPORTED);
}

/*
 * net_poll's ring rules: the VMM fills RX slots only during the guest's
 * console poll (an exit on vCPU 0), so the indices it wrote cannot change
 * while this runs; the guest takes a frame (rx_cons++) only after its
 * reply is in the TX ring, so a guest saved and restored between any two
 * instructions neither loses nor repeats one. The VMM sends the TX ring
 * synchronously at the doorbell and advances tx_cons before the guest
 * runs again; if it did not, the ring stays full and the remaining
 * frames wait for the next poll.
 */
u32 net_poll(struct netdev *nd, const u8 *rx, u8 *tx)
{
	volatile struct netdev *v = nd; /* the VMM's fields change across exits */
	u32 taken = 0;
	if (nd->magic != NET_MAGIC)
		return 0;
	while (nd->rx_cons != v->rx_prod) {
		if (nd->tx_prod - v->tx_cons >= NET_SLOTS) {
			net_doorbell(nd->tx_prod);
			if (nd->tx_prod - v->tx_cons >= NET_SLOTS)
				break;
		}
		u32 r = nd->rx_cons % NET_SLOTS, t = nd->tx_prod % NET_SLOTS;
		u32 n = net_input(nd, rx + r * NET_BUF, v->rx_len[r], tx + t * NET_BUF);
		if (n) {
			nd->tx_len[t] = n;
			__asm__ volatile("" ::: "memory"); /* the frame before its index */
			nd->tx_prod++;
		}
		nd->rx_cons++;
		taken++;
	}
	if (nd->tx_prod != v->tx_cons)
		net_doorbell(nd->tx_prod);
	return taken;
}
