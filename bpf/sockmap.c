// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The sockmap data plane: a stream verdict program that redirects every
 * segment of a proxied connection to its peer socket, and an iter/tcp
 * program that takes sockets off that path under their socket lock.
 *
 * The numbered facts are those of DESIGN.md ("What the kernel does to the
 * sockmap path"); each one loses data if ignored.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "sockmap.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/*
 * Bytes a socket may redirect between two activity events. The agent polls
 * a connection fast only after an event, so this bounds how much a quiet
 * connection can park before the agent looks at it. Set at load time.
 */
volatile const __u64 notify_step = 1 << 20;

/*
 * Fact 12: two sockhashes. The verdict program is attached to verdict_map
 * only; redirects look peers up in target_map, which has no program. A
 * socket leaves verdict_map to stop being read by the program and leaves
 * target_map only after everything redirected to it has been queued, because
 * leaving its last map discards what is parked for it. Keys are socket
 * cookies. max_entries is set by the agent at load time.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} verdict_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} target_map SEC(".maps");

/* Peer wiring and per-direction counters, keyed by socket cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct sock_state);
} socks SEC(".maps");

/* Cookies the agent wants out of verdict_map; see wsplice_demote. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} demote SEC(".maps");

/* Activity events: the cookie of a socket that crossed notify_at. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* Plane-wide counters that have no socket to belong to. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TOTAL_MAX);
	__type(key, __u32);
	__type(value, __u64);
} totals SEC(".maps");

static __always_inline void count_total(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&totals, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

/*
 * Fact 1: verdict only, no stream parser.
 */
SEC("sk_skb/stream_verdict")
int wsplice_verdict(struct __sk_buff *skb)
{
	struct sock_state *st;
	__u64 cookie, peer, len = skb->len, bytes;

	/*
	 * Fact 2: a bare FIN reaches the program as a 0-byte skb. Redirecting
	 * it makes the peer's sender fail with EPIPE. The agent forwards FIN
	 * itself, after the data (fact 4).
	 */
	if (len == 0)
		return SK_DROP;

	cookie = bpf_get_socket_cookie(skb);
	st = bpf_map_lookup_elem(&socks, &cookie);
	if (!st) {
		/* The agent writes socks before verdict_map (fact 3 order),
		 * so this is a socket it is tearing down. */
		count_total(TOTAL_NO_STATE);
		count_total(TOTAL_REDIRECT_FAILS);
		return SK_DROP;
	}

	/*
	 * Fact 11: never SK_PASS data. It would land on the psock's
	 * ingress_msg, uncapped and sometimes duplicated. If the peer is
	 * missing the skb is dropped and counted; the stream can no longer be
	 * exact and the agent resets the connection when it sees fails > 0.
	 */
	peer = st->peer;
	if (bpf_sk_redirect_hash(skb, &target_map, &peer, 0) != SK_PASS) {
		__sync_fetch_and_add(&st->fails, 1);
		count_total(TOTAL_REDIRECT_FAILS);
		return SK_DROP;
	}

	/*
	 * Counted before the skb is queued to the peer (that happens after
	 * this program returns), so redirected - queued never under-counts
	 * what is parked.
	 */
	__sync_fetch_and_add(&st->bytes, len);
	__sync_fetch_and_add(&st->segs, 1);
	st->last_ns = bpf_ktime_get_ns();

	/*
	 * A socket's skbs are verdicted under its lock, so this read-compare-
	 * write does not race with itself; a lost or duplicate event would be
	 * harmless anyway (the agent also scans periodically).
	 */
	bytes = st->bytes;
	if (bytes >= st->notify_at) {
		st->notify_at = bytes + notify_step;
		bpf_ringbuf_output(&events, &cookie, sizeof(cookie), 0);
	}
	return SK_PASS;
}

/*
 * Minimal kernel types for the iterator context, relocated against the
 * running kernel's BTF (CO-RE), so no vmlinux.h is needed.
 */
struct sock_common {
} __attribute__((preserve_access_index));

struct bpf_iter__tcp {
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));

/*
 * Fact 15: deleting a socket from verdict_map with the bpf(2) syscall races
 * with softirq on another CPU (the verdict is cleared without the socket
 * lock while tcp_read_skb holds a dequeued skb, which is then dropped and
 * counted as read). The tcp iterator visits each socket with its lock held,
 * so a delete from here cannot overlap a verdict. It visits every TCP socket
 * of the network namespace, so the agent batches demotions into one pass.
 * (The sockmap iterator would visit fewer sockets but does not lock them.)
 */
SEC("iter/tcp")
int wsplice_demote(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	__u32 *state;
	__u64 cookie;

	if (!skc)
		return 0;
	cookie = bpf_get_socket_cookie(skc);
	state = bpf_map_lookup_elem(&demote, &cookie);
	if (!state || *state != DEMOTE_PENDING)
		return 0;
	if (bpf_map_delete_elem(&verdict_map, &cookie) == 0)
		*state = DEMOTE_DONE;
	else
		*state = DEMOTE_ABSENT;
	return 0;
}
