// A call that survives its signaling socket dying (issue 27), in Debian's
// Chromium.
//
//   node resume.mjs BASE_URL
//
// alice loads the page through a small TCP proxy this script runs on
// loopback, bob directly. Once both are in a relayed, decoding call, the
// proxy resets every connection it carries (alice's WebSocket dies without
// a close frame) and refuses new ones for CUT_MS. Then it lets them through
// again: alice's page must resume its session (same id, without
// reloading), bob must still see alice (no peer-left), and the call must
// be decoding video again within RECOVER_DEADLINE_MS of the proxy coming
// back (its media never crossed the proxy; a broken path is restarted).
//
// Prints one JSON summary line on stdout; a failure exits non-zero with
// the reason and each page's last state and console output on stderr.

import net from "node:net";

import { Failure, Session } from "./session.mjs";

const ROOM = "resume";
const CONNECT_DEADLINE_MS = 30_000;
const CUT_MS = 5_000;
const RECOVER_DEADLINE_MS = 10_000;
const POLL_MS = 250;
const WATCHDOG_MS = 80_000;

const [baseUrl] = process.argv.slice(2);
if (!baseUrl) {
  console.error("usage: node resume.mjs BASE_URL");
  process.exit(2);
}

/** Forwards loopback TCP to `target`; `cut()` resets everything it carries. */
class Proxy {
  constructor(target) {
    this.target = target;
    this.down = false;
    this.sockets = new Set();
    this.server = net.createServer((client) => this.accept(client));
  }

  listen() {
    return new Promise((resolve) => this.server.listen(0, "127.0.0.1", () => resolve(this.server.address().port)));
  }

  accept(client) {
    if (this.down) {
      client.resetAndDestroy();
      return;
    }
    const upstream = net.connect(this.target.port, this.target.hostname);
    for (const [a, b] of [[client, upstream], [upstream, client]]) {
      this.sockets.add(a);
      a.on("error", () => b.destroy());
      a.on("close", () => {
        this.sockets.delete(a);
        b.destroy();
      });
      a.pipe(b);
    }
  }

  /** Every carried connection gets a TCP reset; new ones too until `up()`. */
  cut() {
    this.down = true;
    for (const s of this.sockets) s.resetAndDestroy();
  }

  up() {
    this.down = false;
  }

  close() {
    this.server.close();
  }
}

const target = new URL(baseUrl);
const proxy = new Proxy(target);
const proxyPort = await proxy.listen();
// bob goes to turnkey directly (session.mjs reads this for bob's page).
process.env.E2E_BASE_URL_BOB = baseUrl;
const session = new Session({
  label: "resume",
  baseUrl: `http://127.0.0.1:${proxyPort}/`,
  room: ROOM,
  watchdogMs: WATCHDOG_MS,
  minBytes: 1,
});
const sample = (entry) => session.sample(entry);

async function main() {
  await session.launch();
  const a = await session.openPage("alice");
  const b = await session.openPage("bob");
  await session.waitForCall(["alice", "bob"], CONNECT_DEADLINE_MS, POLL_MS);
  const before = { alice: await sample(a), bob: await sample(b) };
  const aliceId = before.alice.id;
  if (!aliceId || !before.bob.peers[aliceId]) throw new Failure(`bob does not see alice (${aliceId})`);
  // Gone if the page reloads.
  await a.page.evaluate(() => {
    window.notReloaded = true;
  });

  const cutAt = session.since();
  proxy.cut();
  await a.page.waitForFunction(() => window.turnkey.state().signaling !== "open", null, { timeout: 5_000, polling: 100 })
    .catch(() => {
      throw new Failure("alice's WebSocket did not notice the reset");
    });
  await new Promise((r) => setTimeout(r, CUT_MS - (session.since() - cutAt)));
  const upAt = session.since();
  proxy.up();

  // The session comes back: resumed, same id, the page not reloaded.
  const deadline = Date.now() + RECOVER_DEADLINE_MS;
  for (;;) {
    const s = await sample(a);
    if (s.resumes >= 1 && s.signaling === "open") break;
    if (Date.now() > deadline) throw new Failure(`alice did not resume within ${RECOVER_DEADLINE_MS} ms of the proxy coming back`);
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
  const resumedAt = session.since();
  const after = await sample(a);
  if (after.id !== aliceId) throw new Failure(`alice came back as ${after.id}, not ${aliceId}`);
  if (!(await a.page.evaluate(() => window.notReloaded === true))) throw new Failure("alice's page reloaded");
  const status = await a.page.locator("#signaling-status").innerText();
  if (!/resumed/.test(status)) throw new Failure(`alice's status line does not say resumed: ${JSON.stringify(status)}`);

  // The call decodes again (or never stopped), within the deadline.
  const left = Math.max(RECOVER_DEADLINE_MS - (session.since() - upAt), 1_000);
  await session.waitForCall(["alice", "bob"], left, POLL_MS);
  const bobAfter = await sample(b);
  if (!bobAfter.peers[aliceId]) throw new Failure("bob no longer sees alice");

  console.log(JSON.stringify({
    ok: true,
    cut_ms: upAt - cutAt,
    resumed_after_up_ms: resumedAt - upAt,
    decoding_after_up_ms: session.since() - upAt,
    alice: aliceId,
    status,
  }));
}

let code = 0;
try {
  await main();
} catch (err) {
  code = 1;
  console.error(`resume: FAILED: ${err instanceof Failure ? err.message : err.stack}`);
  session.dumpPages();
} finally {
  await session.close();
  proxy.close();
}
process.exit(code);
