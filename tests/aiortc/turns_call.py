"""Calls between pairs of aiortc peers that may use only turnkey's `turns:`
server, where the callee answers late.

The caller gathers its relay candidate (a TURN allocation over TLS), then
says nothing while the callee takes `--answer-delay` seconds to answer: a
browser or a phone does the same while its user decides. The call must
still connect, relay to relay, and carry data both ways.

Prints one JSON line per call and exits non-zero unless every call worked.
The trust anchor for the TLS certificate comes from SSL_CERT_FILE.
"""

import argparse
import asyncio
import json
import sys
import time
import urllib.request

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy


def ice_config(api_url):
    """The server's own iceServers, keeping only the `turns:` URLs."""
    with urllib.request.urlopen(api_url, timeout=10) as r:
        grant = json.load(r)
    servers = []
    for s in grant["iceServers"]:
        urls = [u for u in s["urls"] if u.startswith("turns:")]
        if urls:
            servers.append(
                RTCIceServer(
                    urls=urls, username=s["username"], credential=s["credential"]
                )
            )
    if not servers:
        raise SystemExit(f"no turns: URL in {grant}")
    return RTCConfiguration(
        iceServers=servers, iceTransportPolicy=RTCIceTransportPolicy.RELAY
    )


def selected_types(pc):
    """Local and remote candidate types of the nominated pair."""
    ice = pc.sctp.transport.transport._connection
    pair = ice._nominated.get(1)
    if pair is None:
        return None
    return pair.local_candidate.type, pair.remote_candidate.type


async def call(n, api_url, delay, deadline):
    started = time.monotonic()
    caller = RTCPeerConnection(ice_config(api_url))
    callee = RTCPeerConnection(ice_config(api_url))
    result = {"call": n, "ok": False}
    try:
        channel = caller.createDataChannel("chat")
        opened = asyncio.Event()
        echoed = asyncio.Future()
        channel.on("open", opened.set)
        channel.on(
            "message",
            lambda m: echoed.done() or echoed.set_result(m),
        )

        @callee.on("datachannel")
        def on_channel(ch):
            ch.on("message", lambda m: ch.send(f"echo:{m}"))

        await caller.setLocalDescription(await caller.createOffer())
        result["offer_relay_candidates"] = caller.localDescription.sdp.count(
            "typ relay"
        )
        # The callee thinks it over; the caller's allocation sits quiet.
        await asyncio.sleep(delay)
        await callee.setRemoteDescription(caller.localDescription)
        await callee.setLocalDescription(await callee.createAnswer())
        await caller.setRemoteDescription(callee.localDescription)

        await asyncio.wait_for(opened.wait(), deadline)
        channel.send(f"hello {n}")
        reply = await asyncio.wait_for(echoed, deadline)
        result.update(
            reply=reply,
            caller_pair=selected_types(caller),
            callee_pair=selected_types(callee),
            connected_after_answer_s=round(time.monotonic() - started - delay, 2),
        )
        result["ok"] = (
            reply == f"echo:hello {n}"
            and result["caller_pair"] == ("relay", "relay")
            and result["callee_pair"] == ("relay", "relay")
        )
    except Exception as e:  # reported, and the run fails below
        result["error"] = f"{type(e).__name__}: {e}"
        result["caller_state"] = caller.connectionState
        result["callee_state"] = callee.connectionState
    finally:
        await caller.close()
        await callee.close()
    print(json.dumps(result), flush=True)
    return result["ok"]


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--api", required=True, help="URL of /api/ice-servers")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--answer-delay", type=float, default=15.0)
    p.add_argument("--deadline", type=float, default=30.0)
    a = p.parse_args()
    oks = await asyncio.gather(
        *(call(n, a.api, a.answer_delay, a.deadline) for n in range(a.calls))
    )
    print(json.dumps({"calls": a.calls, "ok": sum(oks)}), flush=True)
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
