/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Types shared by the sockmap data plane's BPF programs and, through
 * bpf2go's generated Go types, by the agent. Keep every field 64-bit and
 * naturally aligned: Go reads these structs with a plain byte copy.
 */
#ifndef WSPLICE_SOCKMAP_H
#define WSPLICE_SOCKMAP_H

#include <linux/types.h>

/*
 * sock_state is the value of the socks map, keyed by socket cookie. The
 * agent writes it once (peer set, counters zero) before the socket joins the
 * verdict map and never again; the verdict program only adds to it. That way
 * no userspace write can clobber a counter the program is incrementing.
 */
struct sock_state {
	__u64 peer;      /* cookie of the socket this one's bytes go to */
	__u64 bytes;     /* payload bytes redirected to peer */
	__u64 segs;      /* skbs redirected to peer */
	__u64 last_ns;   /* CLOCK_MONOTONIC ns of the last redirect */
	__u64 fails;     /* skbs dropped because the redirect failed */
	__u64 notify_at; /* bytes value at which the next activity event is sent */
};

/* Indexes into the totals array. */
enum total_index {
	TOTAL_REDIRECT_FAILS = 0, /* all redirect failures, including unknown sockets */
	TOTAL_NO_STATE = 1,       /* skbs from a socket without a socks entry */
	TOTAL_MAX = 2,
};

/* Values of the demote map: the agent writes PENDING, the iterator answers. */
enum demote_state {
	DEMOTE_PENDING = 1, /* agent asks: take this cookie out of the verdict map */
	DEMOTE_DONE = 2,    /* deleted under the socket lock */
	DEMOTE_ABSENT = 3,  /* socket visited but not in the verdict map */
};

#endif
