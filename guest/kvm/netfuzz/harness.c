/* What net.c needs from the code around it, for the host harness. */
#include "net.h"

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

/* net_poll is not driven here (the real-KVM tests cover the rings). */
void net_doorbell(u32 prod) { (void)prod; }
