// A call through turnkey's TURN relay over one stream transport only, in
// Debian's Chromium.
//
//   node e2e-transport.mjs BASE_URL tls|tcp
//
// Opens two pages (separate browser contexts, fake camera and microphone)
// on BASE_URL/?room=…&relay=1. turnkey hands the page every URL it serves
// (stun:, turn: over UDP and TCP, turns:); an init script wraps
// RTCPeerConnection so that each page asks for exactly one of them: the
// `turns:` URL for `tls`, the `turn:…?transport=tcp` URL for `tcp`. The page
// itself is unchanged, and its `?relay=1` makes it use relay candidates only.
//
// Passes when both pages report, from getStats(), a connected call whose
// selected pair is relay on both ends, whose local candidate was allocated
// over the wanted protocol (relayProtocol "tls" or "tcp"), and whose inbound
// video is decoded (framesDecoded > 0 and rising) with at least
// MIN_BYTES_RECEIVED bytes in; and when every RTCPeerConnection the pages
// made reports, from getConfiguration(), only the wanted URL.
//
// For `tls` Chromium verifies turnkey's certificate: the caller trusts its
// test CA in the NSS database under $HOME/.pki/nssdb, which Chromium reads.
//
// Prints one JSON summary line on stdout. Any failure exits non-zero with
// the reason and each page's last state and console output on stderr.

import { callSummary, Failure, Session } from "./session.mjs";

const CONNECT_DEADLINE_MS = 30_000;
const POLL_MS = 250;
const STILL_DECODING_MS = 5_000;
// The Rust side checks turnkey's per-transport relay counters against this.
const MIN_BYTES_RECEIVED = 100_000;
// A last resort so a wedged browser can never hang the caller.
const WATCHDOG_MS = 50_000;

const [baseUrl, transport] = process.argv.slice(2);
if (!baseUrl || !["tls", "tcp"].includes(transport)) {
  console.error("usage: node e2e-transport.mjs BASE_URL tls|tcp");
  process.exit(2);
}
const ROOM = `e2e-${transport}`;

const session = new Session({
  label: "e2e-transport",
  baseUrl,
  room: ROOM,
  watchdogMs: WATCHDOG_MS,
  minBytes: MIN_BYTES_RECEIVED,
  protocol: transport,
});
const since = () => session.since();
const pages = session.pages;
const dumpPages = () => session.dumpPages();
const sample = (entry) => session.sample(entry);
const notYet = (state, prevFrames) => session.notYet(state, prevFrames);
const waitForCall = (names) => session.waitForCall(names, CONNECT_DEADLINE_MS, POLL_MS);

/**
 * Runs in each page before its own scripts. Keeps, of whatever iceServers
 * the page passes to RTCPeerConnection (constructor and setConfiguration,
 * which the page uses when its credential is renewed), only the URLs of one
 * transport, and remembers every connection so the harness can read back
 * what each was really configured with.
 */
function restrictIceServers(want) {
  const keep = (url) =>
    want === "tls"
      ? /^turns:/i.test(url)
      : /^turn:/i.test(url) && /[?&]transport=tcp(&|$)/i.test(url);
  const seen = new Set();
  const filter = (config) => {
    if (!config || !Array.isArray(config.iceServers)) return config;
    const iceServers = config.iceServers
      .map((server) => {
        const urls = [server.urls ?? []].flat();
        for (const u of urls) seen.add(u);
        return { ...server, urls: urls.filter(keep) };
      })
      .filter((server) => server.urls.length > 0);
    return { ...config, iceServers };
  };
  const Native = window.RTCPeerConnection;
  const made = [];
  class OneTransport extends Native {
    constructor(config, ...rest) {
      super(filter(config), ...rest);
      made.push(this);
    }
    setConfiguration(config) {
      return super.setConfiguration(filter(config));
    }
  }
  window.RTCPeerConnection = OneTransport;
  window.__oneTransport = {
    /** Every URL the page asked for, before the filter. */
    offered: () => [...seen],
    /** What each connection says it was configured with. */
    configs: () =>
      made.map((pc) => {
        const c = pc.getConfiguration();
        return {
          state: pc.connectionState,
          iceTransportPolicy: c.iceTransportPolicy,
          urls: c.iceServers.flatMap((s) => [s.urls].flat()),
        };
      }),
    /** The selected local candidate of each live connection, straight from getStats(). */
    selected: async () => {
      const out = [];
      for (const pc of made) {
        if (pc.connectionState === "closed") continue;
        const report = await pc.getStats();
        report.forEach((s) => {
          if (s.type !== "transport" || !s.selectedCandidatePairId) return;
          const pair = report.get(s.selectedCandidatePairId);
          const local = pair && report.get(pair.localCandidateId);
          if (local) {
            out.push({
              candidateType: local.candidateType,
              relayProtocol: local.relayProtocol ?? null,
              url: local.url ?? null,
            });
          }
        });
      }
      return out;
    },
  };
}

const openPage = (name) => session.openPage(name, [restrictIceServers, transport]);

/** The last state of `name` once its call has decoded more frames than it had. */
async function stillDecoding(name) {
  const entry = pages.get(name);
  const [before] = Object.values(entry.last.peers);
  const deadline = Date.now() + STILL_DECODING_MS;
  for (;;) {
    await new Promise((r) => setTimeout(r, POLL_MS));
    const state = await sample(entry);
    const why = notYet(state, before.framesDecoded);
    if (why === null) return state;
    if (Date.now() > deadline) throw new Failure(`${name} after the checks: ${why}`);
  }
}

/** The filter really left each connection of `name` with only the wanted URL. */
async function checkConfiguration(name) {
  const { page } = pages.get(name);
  const { offered, configs, selected } = await page.evaluate(async () => ({
    offered: window.__oneTransport.offered(),
    configs: window.__oneTransport.configs(),
    selected: await window.__oneTransport.selected(),
  }));
  const want = transport === "tls" ? /^turns:/ : /^turn:.*[?&]transport=tcp(&|$)/;
  // turnkey offered more than the one URL, so the filter had work to do.
  if (!offered.some((u) => /^turn:.*transport=udp/.test(u))) {
    throw new Failure(`${name}: turnkey did not offer a UDP TURN URL: ${JSON.stringify(offered)}`);
  }
  const wanted = offered.filter((u) => want.test(u));
  if (wanted.length !== 1) {
    throw new Failure(`${name}: want exactly one ${transport} URL among ${JSON.stringify(offered)}`);
  }
  if (configs.length === 0) throw new Failure(`${name}: the page made no RTCPeerConnection`);
  for (const c of configs) {
    if (c.urls.length !== 1 || c.urls[0] !== wanted[0]) {
      throw new Failure(`${name}: a connection is configured with ${JSON.stringify(c.urls)}, want only ${wanted[0]}`);
    }
    if (c.iceTransportPolicy !== "relay") {
      throw new Failure(`${name}: a connection has iceTransportPolicy ${c.iceTransportPolicy}, want relay`);
    }
  }
  if (selected.length !== 1) throw new Failure(`${name}: ${selected.length} live selected pairs, want 1`);
  const [s] = selected;
  if (s.candidateType !== "relay" || s.relayProtocol !== transport) {
    throw new Failure(`${name}: selected local candidate ${JSON.stringify(s)}, want relay over ${transport}`);
  }
  // Chromium names the server a local candidate came from; when it does, it must be ours.
  if (s.url !== null && s.url !== wanted[0]) {
    throw new Failure(`${name}: selected local candidate came from ${s.url}, want ${wanted[0]}`);
  }
  return { offered, url: wanted[0], connections: configs.length, candidateUrl: s.url };
}

async function main() {
  const browser = await session.launch();
  const version = browser.version();
  const launched = since();

  await openPage("alice");
  await openPage("bob");
  const opened = since();
  const connected = await waitForCall(["alice", "bob"]);
  const config = { alice: await checkConfiguration("alice"), bob: await checkConfiguration("bob") };

  // Still decoding after the checks: the call is not a momentary success.
  const after = {};
  for (const name of ["alice", "bob"]) after[name] = await stillDecoding(name);

  const summary = {
    ok: true,
    transport,
    chromium: version,
    launch_ms: launched,
    pages_open_ms: opened,
    connected_ms: connected,
    total_ms: since(),
    peers: Object.fromEntries(
      ["alice", "bob"].map((n) => {
        const [p] = Object.values(after[n].peers);
        return [n, {
          id: after[n].id,
          iceServerUrl: config[n].url,
          candidateUrl: config[n].candidateUrl,
          connections: config[n].connections,
          ...callSummary(p),
        }];
      }),
    ),
  };
  console.log(JSON.stringify(summary));
}

let code = 0;
try {
  await main();
} catch (err) {
  code = 1;
  console.error(`e2e-transport: FAILED: ${err instanceof Failure ? err.message : err.stack}`);
  dumpPages();
} finally {
  await session.close();
}
process.exit(code);
