/* The host harness around net.c (see harness.c). */
#ifndef TANDEM_NETFUZZ_HARNESS_H
#define TANDEM_NETFUZZ_HARNESS_H

#include "net.h"

#define HARNESS_MAX_SENT 128

struct harness {
	struct netdev *nd;
	const u8 *tx;
	int consume;
	u32 doorbells;
	u32 nsent;
	u32 sent_len[HARNESS_MAX_SENT];
	u8 sent[HARNESS_MAX_SENT * NET_BUF];
};

extern struct harness harness;

#endif
