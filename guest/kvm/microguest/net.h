/*
 * The micro-guest's network card, guest side: the rings it shares with the
 * VMM and a minimal stack (Ethernet II, ARP for its own address, IPv4
 * without options or fragments, UDP) serving the kv protocol.
 * guest/netframe is its reference: the same frame gives the same reply
 * and the same drop reason (guest/kvm/netfuzz checks it on the host).
 *
 * net.c touches nothing outside the struct netdev and the buffers it is
 * given, so the host's fuzz harness compiles the same file against its own
 * memory; what the guest's other code supplies is net_serve and
 * net_doorbell.
 */
#ifndef TANDEM_NET_H
#define TANDEM_NET_H

#include "layout.h"

/* Drop reasons, in guest/netframe's order (DropShort...DropNotOurs), so
 * the counters read the same on both guests. */
enum {
	NET_DROP_SHORT,
	NET_DROP_TOO_LONG,
	NET_DROP_BAD_LENGTH,
	NET_DROP_BAD_CHECKSUM,
	NET_DROP_FRAGMENT,
	NET_DROP_UNSUPPORTED,
	NET_DROP_NOT_OURS,
	NET_DROP_REASONS
};

#define NET_MAXFRAME 1514 /* a 1500-byte MTU plus the Ethernet header */
#define NET_MINFRAME 60   /* shorter frames are padded when built */
#define NET_MAXDATA  (NET_MAXFRAME - 14 - 20 - 8)

/*
 * The card's page at NET_GPA (guest/kvm/nic.go mirrors the offsets).
 * Who writes what: the VMM writes the address at boot and rx_prod, rx_len,
 * tx_cons during the guest's port exits (on vCPU 0's thread, so never
 * while the guest runs); the guest writes everything else. Indices run
 * free (slot = index % NET_SLOTS). Each side bounds what it reads from
 * the other.
 */
struct netdev {
	u64 magic;    /* NET_MAGIC: a card is configured (0: none) */
	u8 mac[6];
	u8 ip[4];     /* network order */
	u16 port;     /* the kv service's UDP port */
	u16 next_id;  /* IPv4 ID of the last datagram sent */
	u16 pad;
	u32 rx_prod;  /* VMM: frames put in the RX ring */
	u32 rx_cons;  /* guest: frames taken from it */
	u32 tx_prod;  /* guest: frames put in the TX ring */
	u32 tx_cons;  /* VMM: frames sent from it */
	u32 rx_len[NET_SLOTS]; /* wire length; over NET_MAXFRAME nothing was copied */
	u32 tx_len[NET_SLOTS];
	u64 received, arp_replies, datagrams, sent; /* netframe.Counters */
	u64 dropped[NET_DROP_REASONS];
};

_Static_assert(__builtin_offsetof(struct netdev, rx_prod) == 24, "netdev layout");
_Static_assert(__builtin_offsetof(struct netdev, rx_len) == 40, "netdev layout");
_Static_assert(__builtin_offsetof(struct netdev, received) == 296, "netdev layout");
_Static_assert(sizeof(struct netdev) == 384, "netdev layout");

/* Supplied by the code around net.c. net_serve serves one kv request and
 * writes at most cap bytes of reply, returning their count; net_doorbell
 * asks the VMM to send the TX ring's frames up to prod. */
u32 net_serve(const char *req, u32 n, char *reply, u32 cap);
void net_doorbell(u32 prod);

/* net_input runs one received frame of len bytes through the stack and
 * builds its reply (an ARP reply, a kv reply datagram) in out, which holds
 * NET_BUF bytes; it returns the reply's length, 0 for none. It never
 * reads beyond len bytes of frame, nor any byte of a frame longer than
 * NET_MAXFRAME. */
u32 net_input(struct netdev *nd, const u8 *frame, u32 len, u8 *out);

/* net_poll serves every frame in the RX ring (rx and tx are the rings'
 * buffers) and rings the doorbell once for the replies; it returns how
 * many frames it took, 0 without a card. */
u32 net_poll(struct netdev *nd, const u8 *rx, u8 *tx);

#endif
