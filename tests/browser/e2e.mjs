// End-to-end call through turnkey in Debian's Chromium.
//
//   node e2e.mjs BASE_URL SCREENSHOT_PATH
//
// Opens two pages (separate browser contexts, fake camera and microphone) on
// BASE_URL/?room=e2e&relay=1 and waits until both report, from their own
// getStats(), a connected call whose selected candidate pair is relay on
// both ends and whose inbound video is being decoded (framesDecoded > 0 and
// rising between two reads), with at least MIN_BYTES_RECEIVED bytes of
// media in. A third page must then be told the room is full. A screenshot
// of a connected page goes to SCREENSHOT_PATH.
//
// Prints one JSON summary line on stdout. Any failure exits non-zero with
// the reason and each page's last state and console output on stderr.

import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { callSummary, Failure, Session } from "./session.mjs";

const ROOM = "e2e";
const CONNECT_DEADLINE_MS = 30_000;
const FULL_DEADLINE_MS = 10_000;
const POLL_MS = 250;
// Enough media that turnkey's relay counters cannot be explained by
// anything but the call (the Rust side checks them against these numbers).
const MIN_BYTES_RECEIVED = 100_000;
// A last resort so a wedged browser can never hang the caller.
const WATCHDOG_MS = 75_000;

const [baseUrl, screenshotPath] = process.argv.slice(2);
if (!baseUrl || !screenshotPath) {
  console.error("usage: node e2e.mjs BASE_URL SCREENSHOT_PATH");
  process.exit(2);
}

const session = new Session({
  label: "e2e",
  baseUrl,
  room: ROOM,
  watchdogMs: WATCHDOG_MS,
  minBytes: MIN_BYTES_RECEIVED,
});
const since = () => session.since();
const pages = session.pages;
const dumpPages = () => session.dumpPages();
const sample = (entry) => session.sample(entry);
const notYet = (state, prevFrames) => session.notYet(state, prevFrames);
const waitForCall = (names) => session.waitForCall(names, CONNECT_DEADLINE_MS, POLL_MS);
const openPage = (name) => session.openPage(name);

async function main() {
  const browser = await session.launch();
  const version = browser.version();
  const launched = since();

  const a = await openPage("alice");
  const b = await openPage("bob");
  const opened = since();
  const connected = await waitForCall(["alice", "bob"]);

  // The status line is what a person reads; it must agree with getStats().
  await a.page.waitForFunction(
    () => [...document.querySelectorAll(".tile.remote .status")].some((s) => /relay ↔ relay/.test(s.textContent)),
    null,
    { timeout: 5_000, polling: 200 },
  );
  const tiles = await a.page.locator(".tile video").count();
  if (tiles !== 2) throw new Failure(`alice shows ${tiles} video tiles, want 2`);
  mkdirSync(dirname(screenshotPath), { recursive: true });
  await a.page.screenshot({ path: screenshotPath });

  const c = await openPage("carol");
  await c.page.waitForFunction(() => window.turnkey.full === true, null, {
    timeout: FULL_DEADLINE_MS,
    polling: POLL_MS,
  }).catch(() => {
    throw new Failure(`carol was not told the room is full within ${FULL_DEADLINE_MS} ms`);
  });
  const banner = await c.page.locator("#banner").innerText();
  if (!/room is full/i.test(banner)) throw new Failure(`carol's banner does not say the room is full: ${JSON.stringify(banner)}`);
  const fullAt = since();

  // Carol's attempt must not have disturbed the call.
  const after = { alice: await sample(a), bob: await sample(b), carol: await sample(c) };
  for (const name of ["alice", "bob"]) {
    const why = notYet(after[name], 0);
    if (why) throw new Failure(`${name} after carol was turned away: ${why}`);
  }
  if (Object.keys(after.carol.peers).length !== 0) throw new Failure("carol has peer connections in a full room");

  const summary = {
    ok: true,
    chromium: version,
    launch_ms: launched,
    pages_open_ms: opened,
    connected_ms: connected,
    full_ms: fullAt,
    total_ms: since(),
    screenshot: screenshotPath,
    peers: Object.fromEntries(
      ["alice", "bob"].map((n) => {
        const [p] = Object.values(after[n].peers);
        return [n, {
          id: after[n].id,
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
  console.error(`e2e: FAILED: ${err instanceof Failure ? err.message : err.stack}`);
  dumpPages();
  const failShot = screenshotPath.replace(/(\.png)?$/, "-failure.png");
  const first = pages.values().next().value;
  if (first) await first.page.screenshot({ path: failShot }).then(
    () => console.error(`e2e: failure screenshot of the first page: ${failShot}`),
    () => {},
  );
} finally {
  await session.close();
}
process.exit(code);
