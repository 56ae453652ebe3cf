/* What net.c needs from the code around it, for the host harness. */
#include "harness.h"

/* The harness's kv service: a reply that depends on every byte of the
 * request, so a request cut or shifted by the parser shows. */
u32 net_serve(const char *req, u32 n, char *reply, u32 cap)
{
	u32 o = 0;
	if (o < cap)
		reply[o++] = 'R';
	for (u32 i = 0; i < n && o < cap; i++)
		reply[o++] = req[i];
	if (o < cap)
		reply[o++] = '\n';
	return o;
}

/* The harness's VMM for net_poll (set by ring_poll in netfuzz.go): at the
 * doorbell it takes the TX ring's frames up to prod, as guest/kvm's
 * transmit does, into sent; with consume off it takes nothing (a VMM that
 * never answers). */
struct harness harness;

void net_doorbell(u32 prod)
{
	struct netdev *nd = harness.nd;
	harness.doorbells++;
	if (!harness.consume)
		return;
	for (; nd->tx_cons != prod; nd->tx_cons++) {
		u32 slot = nd->tx_cons % NET_SLOTS, n = nd->tx_len[slot];
		if (harness.nsent >= HARNESS_MAX_SENT || n > NET_BUF)
			continue;
		for (u32 i = 0; i < n; i++)
			harness.sent[harness.nsent * NET_BUF + i] = harness.tx[slot * NET_BUF + i];
		harness.sent_len[harness.nsent++] = n;
	}
}
