// The NAT lab's scripted WebRTC client: Debian's Chromium, with a fake
// camera and microphone, on turnkey's own demo page, driven by
// playwright-core. It runs inside a lab client (a network namespace via
// `ip netns exec`, or a container of deploy/nat-lab/docker-compose.yml)
// and reports what the page sees through getStats(), as JSON lines on
// stdout:
//
//   {"event":"stun","local":PORT,"results":[{"server","mapped"}]}
//       with --stun: one socket's Binding requests, in order, to each
//       server; `mapped` is the XOR-MAPPED-ADDRESS, null when no answer.
//   {"event":"sample","t":MS,"signaling","peers":N,"connectionState",
//    "localCandidateType","remoteCandidateType","relayProtocol",
//    "localAddress","remoteAddress","framesDecoded",…}
//       every SAMPLE_MS once the page is up: the first remote peer's state.
//   {"event":"result","ok":BOOL,…the last sample…}
//       with --until connected: once the call is connected and video
//       frames are seen rising (ok), or at --max-ms (not ok).
//   {"event":"error","message"}    the browser or the page failed us.
//
// Without --until, it samples until its standard input closes (the test
// decides when the call is good; see tests/nat_lab.rs), or --max-ms.
//
//   node client.mjs --url URL [--name NAME] [--stun HOST:PORT]...
//                   [--until connected [--linger-ms MS]] [--max-ms MS]
//                   [--chromium PATH] [--chromium-arg ARG]...
//
// Console output of the page goes to stderr, prefixed with NAME.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import dgram from "node:dgram";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";
import { CHROMIUM_ARGS } from "../browser/chromium.mjs";

const SAMPLE_MS = 500;
const STUN_TIMEOUT_MS = 2000;
const STUN_RETRANSMIT_MS = 250;
const MAGIC_COOKIE = 0x2112a442;

const { values: opts } = parseArgs({
  options: {
    url: { type: "string" },
    name: { type: "string", default: "client" },
    stun: { type: "string", multiple: true, default: [] },
    until: { type: "string" },
    "linger-ms": { type: "string", default: "10000" },
    "max-ms": { type: "string", default: "120000" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
    "chromium-arg": { type: "string", multiple: true, default: [] },
  },
});
if (!opts.url || (opts.until && opts.until !== "connected")) {
  console.error("usage: node client.mjs --url URL [--name NAME] [--stun HOST:PORT]... [--until connected] [--max-ms MS]");
  process.exit(2);
}
const maxMs = Number(opts["max-ms"]);
const started = Date.now();
const since = () => Date.now() - started;
const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const log = (line) => process.stderr.write(`[${opts.name} ${since()} ms] ${line}\n`);

let context = null;
let profile = null;
let finishing = false;
let lastSample = null;

/** Closes the browser (bounded) and removes its profile, then exits. */
async function finish(code) {
  if (finishing) return;
  finishing = true;
  const closing = context ? context.close().catch(() => {}) : Promise.resolve();
  await Promise.race([closing, new Promise((r) => setTimeout(r, 5000))]);
  if (profile) rmSync(profile, { recursive: true, force: true });
  process.exit(code);
}

setTimeout(() => {
  if (opts.until) {
    emit({ ...lastSample, event: "result", ok: false, reason: `not connected within --max-ms ${maxMs}` });
  } else {
    emit({ event: "error", message: `--max-ms ${maxMs} passed` });
  }
  finish(1);
}, maxMs).unref();
for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"]) process.on(sig, () => finish(1));

// ---------------------------------------------------------------------------
// STUN Binding (RFC 8489 §5), from one socket to each server in turn, so
// the caller can compare the mappings a NAT made for different destinations.

function parseMapped(msg) {
  if (msg.length < 20 || msg.readUInt16BE(0) !== 0x0101) return null;
  let fallback = null;
  for (let off = 20; off + 4 <= msg.length; ) {
    const type = msg.readUInt16BE(off);
    const len = msg.readUInt16BE(off + 2);
    const v = msg.subarray(off + 4, off + 4 + len);
    if ((type === 0x0020 || type === 0x0001) && v.length >= 8 && v[1] === 0x01) {
      const xor = type === 0x0020;
      const port = v.readUInt16BE(2) ^ (xor ? MAGIC_COOKIE >>> 16 : 0);
      const ip = [0, 1, 2, 3].map((i) => v[4 + i] ^ (xor ? (MAGIC_COOKIE >>> (24 - 8 * i)) & 0xff : 0));
      const addr = `${ip.join(".")}:${port}`;
      if (xor) return addr;
      fallback = addr;
    }
    off += 4 + len + ((4 - (len % 4)) % 4);
  }
  return fallback;
}

async function stunProbe(servers) {
  const sock = dgram.createSocket("udp4");
  await new Promise((resolve, reject) => {
    sock.once("error", reject);
    sock.bind(0, "0.0.0.0", resolve);
  });
  const waiting = new Map();
  sock.on("message", (msg) => {
    if (msg.length < 20) return;
    const done = waiting.get(msg.subarray(8, 20).toString("hex"));
    if (done) done(parseMapped(msg));
  });
  const results = [];
  for (const server of servers) {
    const i = server.lastIndexOf(":");
    const host = server.slice(0, i);
    const port = Number(server.slice(i + 1));
    const tid = randomBytes(12);
    const req = Buffer.alloc(20);
    req.writeUInt16BE(0x0001, 0);
    req.writeUInt32BE(MAGIC_COOKIE, 4);
    tid.copy(req, 8);
    const mapped = await new Promise((resolve) => {
      const send = () => sock.send(req, port, host, () => {});
      const timer = setInterval(send, STUN_RETRANSMIT_MS);
      const give_up = setTimeout(() => done(null), STUN_TIMEOUT_MS);
      const done = (addr) => {
        clearInterval(timer);
        clearTimeout(give_up);
        waiting.delete(tid.toString("hex"));
        resolve(addr);
      };
      waiting.set(tid.toString("hex"), done);
      send();
    });
    results.push({ server, mapped });
  }
  const local = sock.address().port;
  sock.close();
  return { local, results };
}

// ---------------------------------------------------------------------------
// The call.

/** The page's state flattened to its first remote peer. */
function flatten(state) {
  const ids = Object.keys(state.peers ?? {});
  const peer = ids.length > 0 ? state.peers[ids[0]] : {};
  return {
    event: "sample",
    t: since(),
    signaling: state.signaling,
    full: state.full,
    peers: ids.length,
    connectionState: peer.connectionState ?? null,
    iceConnectionState: peer.iceConnectionState ?? null,
    localCandidateType: peer.localCandidateType ?? null,
    remoteCandidateType: peer.remoteCandidateType ?? null,
    relayProtocol: peer.relayProtocol ?? null,
    localAddress: peer.localAddress ?? null,
    remoteAddress: peer.remoteAddress ?? null,
    framesDecoded: peer.framesDecoded ?? 0,
    bytesReceived: peer.bytesReceived ?? 0,
    roundTripTimeMs: peer.roundTripTimeMs ?? null,
  };
}

async function openPage() {
  const url = new URL(opts.url);
  const args = [...CHROMIUM_ARGS, ...opts["chromium-arg"]];
  // getUserMedia needs a secure context; the lab serves plain HTTP on a
  // documentation address, so that one origin is declared secure.
  if (url.protocol === "http:" && !["localhost", "127.0.0.1", "[::1]"].includes(url.hostname)) {
    args.push(`--unsafely-treat-insecure-origin-as-secure=${url.origin}`);
  }
  profile = mkdtempSync(join(tmpdir(), "turnkey-lab-chromium-"));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: opts.chromium,
    headless: true,
    args,
    viewport: { width: 800, height: 600 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => log(`console ${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => log(`pageerror: ${e.message}`));
  // In the compose lab turnkey may still be starting: retry the first load.
  for (;;) {
    try {
      const res = await page.goto(url.href, { timeout: 10_000 });
      if (res && res.ok()) break;
      log(`GET ${url.href}: ${res?.status()}`);
    } catch (err) {
      log(`GET ${url.href}: ${err.message.split("\n")[0]}`);
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
  await page.waitForFunction(() => typeof window.turnkey === "object", null, { timeout: 10_000 });
  return page;
}

async function main() {
  if (opts.stun.length > 0) emit({ event: "stun", ...(await stunProbe(opts.stun)) });

  if (!opts.until) {
    // The caller is done with us (or gone): close the browser and leave.
    process.stdin.on("end", () => finish(0));
    process.stdin.on("close", () => finish(0));
    process.stdin.resume();
  }

  const page = await openPage();
  let prevFrames = 0;
  for (;;) {
    const s = flatten(await page.evaluate(() => window.turnkey.sample()));
    lastSample = s;
    emit(s);
    if (opts.until) {
      const good = s.connectionState === "connected" && s.framesDecoded > prevFrames && prevFrames > 0;
      prevFrames = s.framesDecoded;
      if (good) {
        emit({ ...s, event: "result", ok: true });
        // Stay in the call a while so the other side sees it too.
        await new Promise((r) => setTimeout(r, Number(opts["linger-ms"])));
        return finish(0);
      }
    }
    await new Promise((r) => setTimeout(r, SAMPLE_MS));
  }
}

main().catch((err) => {
  emit({ event: "error", message: String(err?.message ?? err).split("\n")[0] });
  finish(1);
});
