// The socket.io tutorial's page, unchanged, in Debian's Chromium against
// turnkey's /socket.io/ endpoint.
//
//   node tutorial.mjs same-origin  TURNKEY_URL FIXTURE_DIR
//   node tutorial.mjs cross-origin TURNKEY_URL FIXTURE_DIR
//
// same-origin: turnkey serves the page (http.static_dir = FIXTURE_DIR) and
// its own /socket.io/socket.io.js.
// cross-origin: a static server of this harness, on another loopback port,
// serves the page; /socket.io/socket.io.js is the socket.io-client 2.3.0
// npm package's dist/socket.io.js, followed by one line that points the
// page's argument-less io.connect() at turnkey (the one change a page kept
// on another server needs: io.connect("https://turnkey…")). So the real
// client's polling requests cross origins, and CORS must let them.
//
// In both: adapter-latest.js (an outside URL in the page) is served from
// the webrtc-adapter npm package; every other request off loopback is
// blocked and reported. Two pages must reach connectionState "connected"
// (the page's global `pc`) and decode video (framesDecoded rising in
// pc.getStats()); a third must log that the room is full, and the call
// must go on. Prints one JSON summary line; failures exit non-zero with
// each page's console on stderr.

import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { createRequire } from "node:module";
import { extname, join } from "node:path";
import { chromium } from "playwright-core";

import { CHROMIUM, CHROMIUM_ARGS } from "../chromium.mjs";

const ADAPTER_URL = "https://webrtc.github.io/adapter/adapter-latest.js";
const CONNECT_DEADLINE_MS = 30_000;
const FULL_DEADLINE_MS = 10_000;
const POLL_MS = 250;
const WATCHDOG_MS = 80_000;

const [mode, turnkeyUrl, fixtureDir] = process.argv.slice(2);
if (!["same-origin", "cross-origin"].includes(mode) || !turnkeyUrl || !fixtureDir) {
  console.error("usage: node tutorial.mjs same-origin|cross-origin TURNKEY_URL FIXTURE_DIR");
  process.exit(2);
}
const turnkey = new URL(turnkeyUrl);

class Failure extends Error {}

const require = createRequire(import.meta.url);
const adapterJs = readFileSync(require.resolve("webrtc-adapter/out/adapter.js"), "utf8");
const npmClientJs = readFileSync(
  join(require.resolve("socket.io-client/package.json"), "..", "dist", "socket.io.js"),
  "utf8",
);
const pointAtTurnkey =
  `\n;(function () { var connect = io.connect; io.connect = function (uri, opts) {` +
  ` return typeof uri === "string" ? connect(uri, opts) : connect(${JSON.stringify(turnkey.origin)}, uri); }; })();\n`;

const started = Date.now();
const since = () => Date.now() - started;
const pages = new Map();
const blocked = [];
/** Requests to turnkey's socket.io endpoint: method, transport, status, page origin. */
const engineRequests = [];
const websockets = [];

function dumpPages() {
  for (const [name, p] of pages) {
    console.error(`--- ${name}: last state ${JSON.stringify(p.last)}`);
    for (const line of p.console.slice(-40)) console.error(`    ${line}`);
  }
}

const watchdog = setTimeout(() => {
  console.error(`tutorial ${mode}: FAILED: watchdog: nothing finished within ${WATCHDOG_MS} ms`);
  dumpPages();
  process.exit(1);
}, WATCHDOG_MS);

/** The page's own origin: turnkey, or a static server of ours on another port. */
async function pageOrigin() {
  if (mode === "same-origin") return { origin: turnkey.origin, close: () => {} };
  const types = { ".html": "text/html; charset=utf-8", ".js": "application/javascript; charset=utf-8" };
  const server = createServer((req, res) => {
    const name = new URL(req.url, "http://x").pathname.replace(/^\//, "");
    if (!["rtc.html", "rtc.js"].includes(name)) {
      res.writeHead(404).end("not found\n");
      return;
    }
    res.writeHead(200, { "content-type": types[extname(name)] }).end(readFileSync(join(fixtureDir, name)));
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const origin = `http://127.0.0.1:${server.address().port}`;
  if (origin === turnkey.origin) throw new Failure("the page's server got turnkey's port");
  return { origin, close: () => server.close() };
}

const isLoopback = (url) => ["127.0.0.1", "localhost", "[::1]"].includes(url.hostname);

async function openPage(browser, name, origin) {
  const context = await browser.newContext();
  await context.grantPermissions(["camera", "microphone"], { origin });
  const entry = { page: null, console: [], last: null };
  await context.route("**/*", (route) => {
    const url = new URL(route.request().url());
    if (url.href === ADAPTER_URL) {
      return route.fulfill({ contentType: "application/javascript", body: adapterJs });
    }
    if (mode === "cross-origin" && url.origin === origin && url.pathname === "/socket.io/socket.io.js") {
      return route.fulfill({ contentType: "application/javascript", body: npmClientJs + pointAtTurnkey });
    }
    if (isLoopback(url)) return route.continue();
    blocked.push(`${name}: ${url.href}`);
    return route.abort("blockedbyclient");
  });
  const page = await context.newPage();
  entry.page = page;
  pages.set(name, entry);
  page.on("console", (m) => entry.console.push(`[${since()} ms] ${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => entry.console.push(`[${since()} ms] pageerror: ${e.message}`));
  page.on("websocket", (ws) => websockets.push({ page: name, url: ws.url() }));
  page.on("requestfinished", async (req) => {
    const url = new URL(req.url());
    if (url.origin !== turnkey.origin || url.pathname !== "/socket.io/") return;
    const res = await req.response();
    engineRequests.push({
      page: name,
      method: req.method(),
      transport: url.searchParams.get("transport"),
      status: res?.status(),
      origin: (await req.allHeaders()).origin ?? null,
    });
  });
  const res = await page.goto(`${origin}/rtc.html`);
  if (!res || !res.ok()) throw new Failure(`${name}: GET ${origin}/rtc.html answered ${res?.status()}`);
  return entry;
}

/** The page's own view of its call: its global `pc` and pc.getStats(). */
async function sample(entry) {
  entry.last = await entry.page.evaluate(async () => {
    // `pc` is a top-level `let` of rtc.js: a global binding, not a window property.
    if (typeof pc === "undefined" || !pc) return { pc: false };
    let framesDecoded = 0;
    const stats = await pc.getStats();
    stats.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") framesDecoded += s.framesDecoded ?? 0;
    });
    return { pc: true, connectionState: pc.connectionState, framesDecoded };
  });
  return entry.last;
}

/** Waits until every page is connected and its framesDecoded rose between two reads. */
async function waitForCall(names) {
  const deadline = Date.now() + CONNECT_DEADLINE_MS;
  const prev = {};
  const done = {};
  for (;;) {
    const reasons = [];
    for (const name of names) {
      if (done[name]) continue;
      const s = await sample(pages.get(name));
      if (!s.pc) reasons.push(`${name}: no RTCPeerConnection yet`);
      else if (s.connectionState !== "connected") reasons.push(`${name}: connectionState ${s.connectionState}`);
      else if (!(s.framesDecoded > 0) || prev[name] === undefined || !(s.framesDecoded > prev[name])) {
        reasons.push(`${name}: framesDecoded ${s.framesDecoded} (previous ${prev[name]})`);
      } else done[name] = { at: since(), framesDecoded: s.framesDecoded };
      if (s.framesDecoded > 0) prev[name] ??= s.framesDecoded;
    }
    if (names.every((n) => done[n])) return done;
    if (Date.now() > deadline) throw new Failure(`no call within ${CONNECT_DEADLINE_MS} ms: ${reasons.join("; ")}`);
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

async function main() {
  const { origin, close } = await pageOrigin();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Two pages on one machine: let ICE pair loopback host candidates.
    args: [...CHROMIUM_ARGS, "--allow-loopback-in-peer-connection"],
  });
  try {
    await openPage(browser, "alice", origin);
    // The first page must have created the room before the second asks.
    await pages.get("alice").page.waitForFunction(() => isInitiator === true, null, { timeout: 10_000 })
      .catch(() => { throw new Failure("alice was not told `created`"); });
    await openPage(browser, "bob", origin);
    const connected = await waitForCall(["alice", "bob"]);

    const carol = await openPage(browser, "carol", origin);
    const fullDeadline = Date.now() + FULL_DEADLINE_MS;
    while (!carol.console.some((l) => /Room foois full/.test(l))) {
      if (Date.now() > fullDeadline) throw new Failure(`carol was not told the room is full within ${FULL_DEADLINE_MS} ms`);
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
    // carol's `got user media` message is refused (she is in no room), and
    // must reach neither page of the call, which goes on decoding.
    const after = await waitForCall(["alice", "bob"]);
    for (const name of ["alice", "bob"]) {
      const extra = pages.get(name).console.filter((l) => /Room .*is full/.test(l));
      if (extra.length) throw new Failure(`${name} saw carol's refusal: ${extra[0]}`);
    }

    if (blocked.length) throw new Failure(`requests off the machine: ${blocked.join(", ")}`);
    const polling = engineRequests.filter((r) => r.transport === "polling" && r.status === 200);
    // The handshake and the first polls are GETs; whether a POST happens
    // before the upgrade is the client's timing (tests/socketio.rs posts).
    if (!["alice", "bob", "carol"].every((p) => polling.some((r) => r.page === p && r.method === "GET"))) {
      throw new Failure(`not every page polled turnkey successfully: ${JSON.stringify(engineRequests)}`);
    }
    if (mode === "cross-origin" && !polling.every((r) => r.origin === origin)) {
      throw new Failure(`polling requests did not come from the page's origin ${origin}: ${JSON.stringify(polling)}`);
    }
    const upgraded = websockets.filter((w) => w.url.startsWith(`ws://${turnkey.host}/socket.io/`) && /transport=websocket/.test(w.url));
    if (new Set(upgraded.map((w) => w.page)).size < 3) {
      throw new Failure(`not every page upgraded to a WebSocket: ${JSON.stringify(websockets)}`);
    }
    console.log(JSON.stringify({
      ok: true,
      mode,
      pageOrigin: origin,
      browser: browser.version(),
      connected,
      after,
      pollingRequests: polling.length,
      websockets: upgraded.length,
    }));
  } finally {
    close();
    await browser.close().catch(() => {});
  }
}

main().then(
  () => {
    clearTimeout(watchdog);
    process.exit(0);
  },
  (e) => {
    console.error(`tutorial ${mode}: FAILED: ${e instanceof Failure ? e.message : e.stack}`);
    dumpPages();
    process.exit(1);
  },
);
