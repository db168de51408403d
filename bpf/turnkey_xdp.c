// SPDX-License-Identifier: MIT OR GPL-2.0
/*
 * turnkey's kernel fast path (issue 26): ChannelData relayed in XDP.
 *
 * A cache of decisions the TURN core has already made, never a second
 * policy: user space (src/relay/xdp/) installs an entry only while the
 * allocation lives, the channel is bound, the permission for that peer
 * lives and the allocation is under its bandwidth budget, and removes it
 * when any of that stops being true. This program only looks entries up:
 *
 *   client -> ChannelData on a listen address  => UDP relayed addr -> peer
 *   peer   -> UDP to a relayed address         => ChannelData -> client
 *
 * Anything it is not sure of goes to the kernel's stack and so to the
 * user-space relay (XDP_PASS), counted per reason: a miss never drops.
 *
 * Addresses are kept as 16 bytes, IPv4 as v4-mapped IPv6 (::ffff:a.b.c.d),
 * ports in network order. The next hop comes from the kernel's FIB and
 * neighbour tables (bpf_fib_lookup), not from swapping the MAC addresses
 * of the packet that came in: the client and the peer need not sit behind
 * the same router (the helper answers only where forwarding is enabled on
 * the interface: net.ipv4.conf.IFACE.forwarding, net.ipv6.conf.IFACE.
 * forwarding; without it everything passes, counted). UDP checksums are updated incrementally (RFC 1624): the
 * 4 bytes of ChannelData framing sit at an even offset, so the payload's
 * sum is the same in both packets, and an incoming checksum that was
 * wrong stays wrong (the receiver drops it, as our kernel would have).
 *
 * Built by bpf/build.sh; the object is committed (bpf/turnkey_xdp.o) and
 * embedded in the binary, so building turnkey needs no clang.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_BINDINGS 16384
#define MAX_ENTRY_IDS (2 * MAX_BINDINGS)
#define MAX_LISTEN 64
#define TTL 64

/* Why a packet went where it went: the index of `reasons`. Keep in step
 * with src/relay/xdp/maps.rs (Reason). */
enum reason {
	R_TO_PEER = 0,        /* relayed in XDP, client -> peer */
	R_TO_CLIENT,          /* relayed in XDP, peer -> client */
	R_OTHER,              /* not IPv4/IPv6 UDP */
	R_FRAGMENT,           /* an IP fragment */
	R_IP_OPTIONS,         /* IPv4 options or IPv6 extension headers */
	R_NOT_CHANNEL_DATA,   /* to a listen port, but STUN or anything else */
	R_UNKNOWN_CHANNEL,    /* ChannelData with no entry */
	R_UNKNOWN_PEER,       /* UDP with no peer entry */
	R_BAD_LENGTH,         /* lengths disagree (padding, truncation) */
	R_ZERO_CHECKSUM,      /* IPv6 UDP without a checksum */
	R_OVERSIZE,           /* too big for the route's MTU once framed */
	R_LOCAL,              /* the destination is this host (hairpin) */
	R_NO_NEIGHBOUR,       /* next hop not resolved yet */
	R_NO_ROUTE,           /* no route, or a route out of another interface */
	R_FAMILY,             /* the entry is of the other address family */
	R_FORWARDING_OFF,     /* the FIB helper needs forwarding on the interface */
	R_COUNT,
};

struct addr_port {
	__u8 ip[16];
	__be16 port;
	__u16 pad;
};

/* A client's channel as the client sees it: its address, the listen
 * address it sends to (the wildcard address when the listener is bound
 * to one) and the channel number. */
struct client_key {
	__u8 client_ip[16];
	__u8 server_ip[16];
	__be16 client_port;
	__be16 server_port;
	__be16 channel;
	__u16 pad;
};

/* Where that channel goes. A wildcard relay address means "the source the
 * kernel would choose", which is what a relay socket bound to the wildcard
 * address sends from. */
struct client_val {
	__u8 relay_ip[16];
	__u8 peer_ip[16];
	__be16 relay_port;
	__be16 peer_port;
	__u32 entry;
};

/* A peer's datagram to a relayed address (the wildcard address when the
 * relay sockets are bound to it). */
struct peer_key {
	__u8 peer_ip[16];
	__u8 relay_ip[16];
	__be16 peer_port;
	__be16 relay_port;
	__u32 pad;
};

struct peer_val {
	__u8 client_ip[16];
	__u8 server_ip[16];
	__be16 client_port;
	__be16 server_port;
	__be16 channel;
	__u16 pad;
	__u32 entry;
};

struct entry_count {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LISTEN);
	__type(key, struct addr_port);
	__type(value, __u32);
} listen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BINDINGS);
	__type(key, struct client_key);
	__type(value, struct client_val);
} clients SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BINDINGS);
	__type(key, struct peer_key);
	__type(value, struct peer_val);
} peers SEC(".maps");

/* Per entry (one per binding and direction), per CPU: no atomics. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_ENTRY_IDS);
	__type(key, __u32);
	__type(value, struct entry_count);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, R_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} reasons SEC(".maps");

static __always_inline int verdict(__u32 r, int action)
{
	__u64 *n = bpf_map_lookup_elem(&reasons, &r);
	if (n)
		*n += 1;
	return action;
}

#define PASS(r) verdict((r), XDP_PASS)

static __always_inline void count_entry(__u32 entry, __u64 bytes)
{
	struct entry_count *c = bpf_map_lookup_elem(&counts, &entry);
	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

/* One's complement sum of big-endian 16-bit words. */
static __always_inline __u32 sum16(__u32 acc, const __u8 *p, int n)
{
#pragma unroll
	for (int i = 0; i < n; i += 2)
		acc += ((__u32)p[i] << 8) | p[i + 1];
	return acc;
}

/* Adds the one's complement negation of the words (their removal). */
static __always_inline __u32 unsum16(__u32 acc, const __u8 *p, int n)
{
#pragma unroll
	for (int i = 0; i < n; i += 2)
		acc += 0xffff & ~(((__u32)p[i] << 8) | p[i + 1]);
	return acc;
}

static __always_inline __u16 fold(__u32 acc)
{
	acc = (acc & 0xffff) + (acc >> 16);
	acc = (acc & 0xffff) + (acc >> 16);
	return (__u16)acc;
}

static __always_inline __u32 word(__u16 host)
{
	return host;
}

static __always_inline int is_v4(const __u8 *ip)
{
	const __u32 *w = (const __u32 *)ip;
	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

static __always_inline int is_wildcard(const __u8 *ip)
{
	const __u32 *w = (const __u32 *)ip;
	return w[0] == 0 && w[1] == 0 && (w[2] == 0 || w[2] == bpf_htonl(0xffff)) && w[3] == 0;
}

static __always_inline void mapped(__u8 *out, __be32 v4)
{
	__u32 *w = (__u32 *)out;
	w[0] = 0;
	w[1] = 0;
	w[2] = bpf_htonl(0xffff);
	w[3] = v4;
}

static __always_inline void copy16(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, 16);
}

/* What the parser learnt of an IPv4/IPv6 UDP datagram. */
struct flow {
	__u8 src[16];
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
	__u16 udp_len;     /* host order, UDP header included */
	__u16 csum;        /* host order */
	__u32 tos;         /* IPv4 TOS, or IPv6's first 4 bytes (version, class, label) */
	__u16 ip_id;       /* IPv4 only, network order */
	__u8 v6;
};

/* The new datagram: addresses, ports, lengths. */
struct out {
	__u8 src[16];
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
	__u16 udp_len;
	__u16 csum;
	__u8 smac[6];
	__u8 dmac[6];
};

/*
 * The next hop for `o->dst` out of the interface the packet came in on,
 * and the source address when `o->src` is the wildcard. 0 or a pass reason.
 */
static __noinline int route(struct xdp_md *ctx, struct flow *f, struct out *o, __u16 ip_len)
{
	struct bpf_fib_lookup fib = {};
	/* An ingress-style lookup: the route the kernel would take for this
	 * destination from any interface. BPF_FIB_LOOKUP_OUTPUT would bind
	 * it to the interface the packet came in on, and so send a peer
	 * reached through another interface out of the wrong one. */
	__u32 flags = 0;
	int wild = is_wildcard(o->src);

	if (wild)
		flags |= BPF_FIB_LOOKUP_SRC;
	fib.ifindex = ctx->ingress_ifindex;
	fib.l4_protocol = IPPROTO_UDP;
	fib.sport = o->sport;
	fib.dport = o->dport;
	fib.tot_len = ip_len;
	if (f->v6) {
		fib.family = 10; /* AF_INET6 */
		__builtin_memcpy(fib.ipv6_dst, o->dst, 16);
		if (!wild)
			__builtin_memcpy(fib.ipv6_src, o->src, 16);
	} else {
		fib.family = 2; /* AF_INET */
		fib.ipv4_dst = *(__be32 *)(o->dst + 12);
		if (!wild)
			fib.ipv4_src = *(__be32 *)(o->src + 12);
	}
	long rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), flags);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		break;
	case BPF_FIB_LKUP_RET_NOT_FWDED:
		return R_LOCAL;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		return R_NO_NEIGHBOUR;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		return R_OVERSIZE;
	case BPF_FIB_LKUP_RET_FWD_DISABLED:
		return R_FORWARDING_OFF;
	default:
		return R_NO_ROUTE;
	}
	if (fib.ifindex != ctx->ingress_ifindex)
		return R_NO_ROUTE;
	if (wild) {
		if (f->v6)
			__builtin_memcpy(o->src, fib.ipv6_src, 16);
		else
			mapped(o->src, fib.ipv4_src);
	}
	__builtin_memcpy(o->smac, fib.smac, 6);
	__builtin_memcpy(o->dmac, fib.dmac, 6);
	return 0;
}

/* The UDP checksum of the new datagram from the old one's (RFC 1624, eqn 3):
 * the old pseudo-header and header words out, the new ones in, and the
 * ChannelData header out (`strip`) or in (`!strip`). */
static __always_inline __u16 new_csum(struct flow *f, struct out *o, __u8 *cd, int strip)
{
	__u32 acc = 0xffff & ~(__u32)f->csum;

	if (f->v6) {
		acc = unsum16(acc, f->src, 16);
		acc = unsum16(acc, f->dst, 16);
		acc = sum16(acc, o->src, 16);
		acc = sum16(acc, o->dst, 16);
	} else {
		acc = unsum16(acc, f->src + 12, 4);
		acc = unsum16(acc, f->dst + 12, 4);
		acc = sum16(acc, o->src + 12, 4);
		acc = sum16(acc, o->dst + 12, 4);
	}
	/* Ports; the length twice (pseudo-header and UDP header). */
	acc += 0xffff & ~word(bpf_ntohs(f->sport));
	acc += 0xffff & ~word(bpf_ntohs(f->dport));
	acc += word(bpf_ntohs(o->sport));
	acc += word(bpf_ntohs(o->dport));
	acc += 2 * (0xffff & ~word(f->udp_len));
	acc += 2 * word(o->udp_len);
	if (strip)
		acc = unsum16(acc, cd, 4);
	else
		acc = sum16(acc, cd, 4);
	__u16 c = ~fold(acc);
	return c ? c : 0xffff;
}

static __always_inline __u16 ip4_csum(struct iphdr *ip)
{
	__u32 acc = sum16(0, (const __u8 *)ip, 20);
	return bpf_htons(~fold(acc));
}

/*
 * Writes the new Ethernet, IP and UDP headers and the ChannelData header
 * (`cd`, when adding one) at the start of the packet; 0, or -1 when the
 * packet is too short for them (it cannot be: the caller's checks made it
 * long enough, but the verifier wants to see it).
 */
static __always_inline int write_headers(struct xdp_md *ctx, struct flow *f, struct out *o,
					 __u8 *cd)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if (f->v6) {
		struct ipv6hdr *ip = (void *)(eth + 1);
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) + (cd ? 4 : 0) > end)
			return -1;
		if (cd)
			__builtin_memcpy(udp + 1, cd, 4);
		__builtin_memcpy(eth->h_dest, o->dmac, 6);
		__builtin_memcpy(eth->h_source, o->smac, 6);
		eth->h_proto = bpf_htons(ETH_P_IPV6);
		*(__be32 *)ip = f->tos;
		ip->payload_len = bpf_htons(o->udp_len);
		ip->nexthdr = IPPROTO_UDP;
		ip->hop_limit = TTL;
		__builtin_memcpy(&ip->saddr, o->src, 16);
		__builtin_memcpy(&ip->daddr, o->dst, 16);
		udp->source = o->sport;
		udp->dest = o->dport;
		udp->len = bpf_htons(o->udp_len);
		udp->check = bpf_htons(o->csum);
	} else {
		struct iphdr *ip = (void *)(eth + 1);
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) + (cd ? 4 : 0) > end)
			return -1;
		if (cd)
			__builtin_memcpy(udp + 1, cd, 4);
		__builtin_memcpy(eth->h_dest, o->dmac, 6);
		__builtin_memcpy(eth->h_source, o->smac, 6);
		eth->h_proto = bpf_htons(ETH_P_IP);
		ip->version = 4;
		ip->ihl = 5;
		ip->tos = (__u8)f->tos;
		ip->tot_len = bpf_htons(20 + o->udp_len);
		ip->id = f->ip_id;
		ip->frag_off = bpf_htons(0x4000); /* DF, as Linux's UDP sockets send */
		ip->ttl = TTL;
		ip->protocol = IPPROTO_UDP;
		ip->check = 0;
		ip->saddr = *(__be32 *)(o->src + 12);
		ip->daddr = *(__be32 *)(o->dst + 12);
		ip->check = ip4_csum(ip);
		udp->source = o->sport;
		udp->dest = o->dport;
		udp->len = bpf_htons(o->udp_len);
		udp->check = bpf_htons(o->csum);
	}
	return 0;
}

/* Client -> peer: the ChannelData header comes off. */
static __always_inline int to_peer(struct xdp_md *ctx, struct flow *f, struct client_key *k,
				   int hdr_len, struct out *op)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u8 *p = data + hdr_len;
	__u8 cd[4];

	if ((void *)(p + 4) > end)
		return PASS(R_NOT_CHANNEL_DATA);
	__builtin_memcpy(cd, p, 4);
	/* Channel numbers are 0x4000-0x7FFF (RFC 5766; RFC 8656 narrowed them). */
	if ((cd[0] & 0xc0) != 0x40)
		return PASS(R_NOT_CHANNEL_DATA);
	__u16 len = ((__u16)cd[2] << 8) | cd[3];
	if (f->udp_len != 8 + 4 + len)
		return PASS(R_BAD_LENGTH);
	k->channel = *(__be16 *)cd;
	struct client_val *v = bpf_map_lookup_elem(&clients, k);
	if (!v)
		return PASS(R_UNKNOWN_CHANNEL);
	if (is_v4(v->peer_ip) == f->v6)
		return PASS(R_FAMILY);

	struct out *o = op;
	copy16(o->src, v->relay_ip);
	copy16(o->dst, v->peer_ip);
	o->sport = v->relay_port;
	o->dport = v->peer_port;
	o->udp_len = f->udp_len - 4;
	__u32 entry = v->entry;
	int r = route(ctx, f, o, (f->v6 ? 40 : 20) + o->udp_len);
	if (r)
		return PASS(r);
	o->csum = f->csum ? new_csum(f, o, cd, 1) : 0; /* IPv4 without a checksum stays so */

	if (bpf_xdp_adjust_head(ctx, 4))
		return PASS(R_NO_ROUTE);
	if (write_headers(ctx, f, o, 0))
		return XDP_ABORTED;
	count_entry(entry, len);
	return verdict(R_TO_PEER, XDP_TX);
}

/* Peer -> client: a ChannelData header goes on. */
static __always_inline int to_client(struct xdp_md *ctx, struct flow *f, struct out *op)
{
	struct peer_key k = {};
	copy16(k.peer_ip, f->src);
	copy16(k.relay_ip, f->dst);
	k.peer_port = f->sport;
	k.relay_port = f->dport;
	struct peer_val *v = bpf_map_lookup_elem(&peers, &k);
	if (!v) {
		/* Relay sockets bound to the wildcard address. */
		if (f->v6)
			__builtin_memset(k.relay_ip, 0, 16);
		else
			mapped(k.relay_ip, 0);
		v = bpf_map_lookup_elem(&peers, &k);
		if (!v)
			return PASS(R_UNKNOWN_PEER);
	}
	if (is_v4(v->client_ip) == f->v6)
		return PASS(R_FAMILY);
	if (f->v6 && f->csum == 0)
		return PASS(R_ZERO_CHECKSUM);
	if (f->udp_len > 0xffff - 4 - 40)
		return PASS(R_OVERSIZE);

	__u16 len = f->udp_len - 8;
	__u8 cd[4];
	*(__be16 *)cd = v->channel;
	cd[2] = len >> 8;
	cd[3] = len & 0xff;

	struct out *o = op;
	copy16(o->src, v->server_ip);
	copy16(o->dst, v->client_ip);
	o->sport = v->server_port;
	o->dport = v->client_port;
	o->udp_len = f->udp_len + 4;
	__u32 entry = v->entry;
	int r = route(ctx, f, o, (f->v6 ? 40 : 20) + o->udp_len);
	if (r)
		return PASS(r);
	o->csum = f->csum ? new_csum(f, o, cd, 0) : 0;

	if (bpf_xdp_adjust_head(ctx, -4))
		return PASS(R_OVERSIZE);
	if (write_headers(ctx, f, o, cd))
		return XDP_ABORTED;
	count_entry(entry, len);
	return verdict(R_TO_CLIENT, XDP_TX);
}

static __always_inline int is_listen(struct flow *f, struct client_key *k)
{
	struct addr_port lk = {};
	copy16(lk.ip, f->dst);
	lk.port = f->dport;
	if (bpf_map_lookup_elem(&listen, &lk)) {
		copy16(k->server_ip, f->dst);
		return 1;
	}
	if (f->v6)
		__builtin_memset(lk.ip, 0, 16);
	else
		mapped(lk.ip, 0);
	if (bpf_map_lookup_elem(&listen, &lk)) {
		copy16(k->server_ip, lk.ip);
		return 1;
	}
	return 0;
}

static __always_inline int relay(struct xdp_md *ctx, struct flow *f, int hdr_len)
{
	struct client_key k = {};
	struct out o = {};
	if (is_listen(f, &k)) {
		copy16(k.client_ip, f->src);
		k.client_port = f->sport;
		k.server_port = f->dport;
		return to_peer(ctx, f, &k, hdr_len, &o);
	}
	return to_client(ctx, f, &o);
}

SEC("xdp")
int turnkey_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct flow f = {};
	int hdr_len;

	if ((void *)(eth + 1) > end)
		return PASS(R_OTHER);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end || ip->version != 4 || ip->protocol != IPPROTO_UDP)
			return PASS(R_OTHER);
		if (ip->frag_off & bpf_htons(0x3fff))
			return PASS(R_FRAGMENT);
		if (ip->ihl != 5)
			return PASS(R_IP_OPTIONS);
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > end)
			return PASS(R_OTHER);
		__u16 tot = bpf_ntohs(ip->tot_len);
		f.udp_len = bpf_ntohs(udp->len);
		if (tot != 20 + f.udp_len || f.udp_len < 8 ||
		    (void *)ip + tot > end)
			return PASS(R_BAD_LENGTH);
		mapped(f.src, ip->saddr);
		mapped(f.dst, ip->daddr);
		f.sport = udp->source;
		f.dport = udp->dest;
		f.csum = bpf_ntohs(udp->check);
		f.tos = ip->tos;
		f.ip_id = ip->id;
		hdr_len = sizeof(*eth) + 20 + 8;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return PASS(R_OTHER);
		switch (ip->nexthdr) {
		case IPPROTO_UDP:
			break;
		case 44: /* Fragment */
			return PASS(R_FRAGMENT);
		case 0: case 43: case 60: case 51: case 50: case 135: case 139: case 140:
			return PASS(R_IP_OPTIONS);
		default:
			return PASS(R_OTHER);
		}
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > end)
			return PASS(R_OTHER);
		f.udp_len = bpf_ntohs(udp->len);
		if (bpf_ntohs(ip->payload_len) != f.udp_len || f.udp_len < 8 ||
		    (void *)(ip + 1) + f.udp_len > end)
			return PASS(R_BAD_LENGTH);
		copy16(f.src, (__u8 *)&ip->saddr);
		copy16(f.dst, (__u8 *)&ip->daddr);
		f.sport = udp->source;
		f.dport = udp->dest;
		f.csum = bpf_ntohs(udp->check);
		f.tos = *(__be32 *)ip;
		f.v6 = 1;
		hdr_len = sizeof(*eth) + 40 + 8;
	} else {
		return PASS(R_OTHER);
	}
	return relay(ctx, &f, hdr_len);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
