#!/usr/bin/env python3
"""Writes the seed inputs of the core_input fuzz target into core_input/,
and inputs that once failed it into ../regressions/core_input/.

Each seed is a small program in the target's op format (fuzz/README.md):
plain messages a client sends first (Binding, an unsigned Allocate,
ChannelData) and a few whole flows through signed requests, so the fuzzer
starts from inputs that reach allocations, channels and reservations.
Run it from anywhere: python3 fuzz/seeds/make_seeds.py
"""

import os
import struct

COOKIE = 0x2112A442
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "core_input")
OUT_REGRESSIONS = os.path.join(HERE, "..", "regressions", "core_input")

# Op kinds (tag % 6); the client is tag // 6 % 3 (0, 1: UDP, 2: TCP).
RAW, PEER, CLOCK, SIGNED, CLOSED, SWITCHES = range(6)
# Methods and credentials of a SIGNED op.
ALLOCATE, REFRESH, PERMISSION, CHANNEL_BIND, BINDING = range(5)
ALICE, REST, REST_EXPIRED, WRONG_PASSWORD, UNKNOWN_USER = range(5)
# Peer indices (see peer() in the target): 1 = 8.8.8.8:3478, 2 = 1.1.1.1:3478,
# 5 = [2001:4860::8888]:3478.


def tag(kind, who=0):
    return bytes([kind + 6 * who])


def chunk(data):
    return struct.pack(">H", len(data)) + data


def stun(msg_type, attrs, txid):
    body = b""
    for typ, value in attrs:
        pad = (4 - len(value) % 4) % 4
        body += struct.pack(">HH", typ, len(value)) + value + b"\0" * pad
    return struct.pack(">HHI", msg_type, len(body), COOKIE) + txid + body


def xor_peer_v4(ip, port):
    a = bytes(int(x) for x in ip.split("."))
    c = struct.pack(">I", COOKIE)
    x = bytes(p ^ k for p, k in zip(a, c))
    return struct.pack(">BBH", 0, 1, port ^ (COOKIE >> 16)) + x


def raw(data, who=0):
    return tag(RAW, who) + chunk(data)


def peer(relay, frm, data):
    return tag(PEER) + bytes([relay, frm]) + chunk(data)


def clock(secs):
    return tag(CLOCK) + struct.pack(">H", 0x8000 | secs)


def signed(method, cred=ALICE, flags=0, peers=(), extra=b"", who=0):
    """extra: the fields the flags ask for, then ChannelBind's number."""
    head = bytes([method, cred, flags, len(peers)])
    return tag(SIGNED, who) + head + extra + bytes(peers)


def channel_data(number, data):
    return struct.pack(">HH", number, len(data)) + data


BINDING_REQ = stun(0x0001, [], b"seed-bind-01")
ALLOCATE_REQ = stun(0x0003, [(0x0019, bytes([17, 0, 0, 0]))], b"seed-alloc-1")
SEND_IND = stun(
    0x0016,
    [(0x0012, xor_peer_v4("1.1.1.1", 3478)), (0x0013, b"hello peer")],
    b"seed-send-01",
)

SEEDS = {
    "binding": raw(BINDING_REQ),
    "allocate_unsigned": raw(ALLOCATE_REQ),
    "channel_data": raw(channel_data(0x4000, b"ping")),
    # Allocate, permission and channel to 8.8.8.8, data both ways, expiry.
    "channel_flow": signed(ALLOCATE)
    + signed(PERMISSION, peers=(1,))
    + signed(CHANNEL_BIND, peers=(1,), extra=struct.pack(">H", 0x4000))
    + raw(channel_data(0x4000, b"to peer"))
    + peer(0, 1, b"to client over the channel")
    + peer(0, 2, b"no permission")
    + clock(700),
    # Send and Data indications with 1.1.1.1, over the TCP client.
    "indication_flow": signed(ALLOCATE, who=2)
    + signed(PERMISSION, peers=(2,), who=2)
    + raw(SEND_IND, who=2)
    + peer(0, 2, b"to client as a Data indication")
    + tag(CLOSED, 2),
    # EVEN-PORT with R, the reserved port claimed by another client, and a
    # REST-credential Refresh to lifetime 0.
    "reservation_flow": signed(ALLOCATE, flags=0x02, extra=bytes([0x80]))
    + signed(ALLOCATE, REST, flags=0x04, who=1)
    + signed(REFRESH, REST, flags=0x01, extra=struct.pack(">I", 0), who=1)
    + clock(40),
    # A dual-stack allocation (ADDITIONAL-ADDRESS-FAMILY IPv6), a channel
    # to an IPv6 peer and data both ways.
    "dual_stack_flow": signed(ALLOCATE, flags=0x10, extra=bytes([0x81]))
    + signed(CHANNEL_BIND, peers=(5,), extra=struct.pack(">H", 0x4001))
    + raw(channel_data(0x4001, b"to the IPv6 peer"))
    + peer(0x80 | 0x40 | 0, 5, b"wrong relay port, maybe")
    + peer(1, 5, b"to client from the IPv6 peer"),
}


# Inputs that found bugs; each must pass once its bug is fixed.
REGRESSIONS = {
    # Three failing relay binds use up the IPv6 pool; then an Allocate with
    # EVEN-PORT (R) plus ADDITIONAL-ADDRESS-FAMILY IPv6 opens and reserves
    # its IPv4 pair, fails on IPv6 with 508, and never releases the
    # reserved neighbour port.
    "dual_even_port_leak": tag(SWITCHES) + bytes([3])
    + signed(ALLOCATE, flags=0x10, extra=bytes([0x01]), who=1)
    + signed(ALLOCATE, REST, flags=0x12, extra=bytes([0x80, 0x81])),
}


def write(folder, inputs):
    os.makedirs(folder, exist_ok=True)
    for name, data in inputs.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def main():
    write(OUT, SEEDS)
    write(OUT_REGRESSIONS, REGRESSIONS)


if __name__ == "__main__":
    main()
