// SPDX-License-Identifier: MIT OR GPL-2.0
/*
 * XDP_PASS and nothing else, for the test bed (tests/xdp.rs): a veth
 * delivers what its peer sent with XDP_TX only when it has an XDP program
 * of its own, so the router's end of the relay's link gets this one.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
