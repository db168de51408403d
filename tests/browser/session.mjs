// What the browser harnesses share: Chromium launched the one way
// (chromium.mjs), one browser context per page on turnkey's page, polling
// each page's getStats()-based state (window.turnkey.sample()) until the
// call is relayed and decoding, and a watchdog so a wedged browser can
// never hang the caller.

import { chromium } from "playwright-core";

import { CHROMIUM, CHROMIUM_ARGS } from "./chromium.mjs";

/** The fields of one peer's state a harness reports in its summary line. */
export function callSummary(p) {
  const {
    connectionState, localCandidateType, remoteCandidateType, relayProtocol,
    localAddress, remoteAddress, framesDecoded, bytesReceived,
  } = p;
  return {
    connectionState, localCandidateType, remoteCandidateType, relayProtocol,
    localAddress, remoteAddress, framesDecoded, bytesReceived,
  };
}

/** A failed expectation: reported as its message, without a stack. */
export class Failure extends Error {}

export class Session {
  /**
   * label: prefix of failure lines; room: the room every page joins;
   * minBytes: media a page must have received; protocol: when set, the
   * relayProtocol the selected local candidate must have.
   */
  constructor({ label, baseUrl, room, watchdogMs, minBytes, protocol = null }) {
    Object.assign(this, { label, baseUrl, room, minBytes, protocol });
    this.started = Date.now();
    /** name → { page, console: string[], last: state } */
    this.pages = new Map();
    this.browser = null;
    this.watchdog = setTimeout(() => {
      console.error(`${label}: FAILED: watchdog: nothing finished within ${watchdogMs} ms`);
      this.dumpPages();
      process.exit(1);
    }, watchdogMs);
  }

  since() {
    return Date.now() - this.started;
  }

  /** Chromium on a fresh temporary profile, deleted on close. */
  async launch() {
    this.browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
    return this.browser;
  }

  async close() {
    clearTimeout(this.watchdog);
    await this.browser?.close().catch(() => {});
  }

  dumpPages() {
    for (const [name, p] of this.pages) {
      console.error(`--- ${name}: last state ${JSON.stringify(p.last)}`);
      for (const line of p.console.slice(-40)) console.error(`    ${line}`);
    }
  }

  /** Opens turnkey's page on the room, relay only; `init` = [script, arg] runs first. */
  async openPage(name, init = null) {
    // A separate context per page: its own cookies, storage and media
    // permissions, like two people on two machines.
    const context = await this.browser.newContext({ viewport: { width: 1000, height: 620 } });
    // E2E_BASE_URL_BOB puts bob on another turnkey (a second node).
    const base = (name === "bob" && process.env.E2E_BASE_URL_BOB) || this.baseUrl;
    await context.grantPermissions(["camera", "microphone"], { origin: new URL(base).origin });
    if (init) await context.addInitScript(...init);
    const page = await context.newPage();
    const entry = { page, console: [], last: null };
    this.pages.set(name, entry);
    page.on("console", (m) => entry.console.push(`[${this.since()} ms] ${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => entry.console.push(`[${this.since()} ms] pageerror: ${e.message}`));
    // E2E_QUERY adds to the page's query (an access token, say).
    const extra = process.env.E2E_QUERY ?? "";
    const url = new URL(`/?room=${this.room}&relay=1${extra}`, base).href;
    const res = await page.goto(url);
    if (!res || !res.ok()) throw new Failure(`${name}: GET ${url} answered ${res?.status()}`);
    await page.waitForFunction(() => typeof window.turnkey === "object", null, { timeout: 10_000 });
    return entry;
  }

  /** A fresh getStats()-based state from the page. */
  async sample(entry) {
    entry.last = await entry.page.evaluate(() => window.turnkey.sample());
    return entry.last;
  }

  /** Why `state` is not yet a relayed, decoding call (null when it is). */
  notYet(state, prevFrames) {
    const peers = Object.entries(state.peers);
    if (peers.length !== 1) return `sees ${peers.length} peers`;
    const [id, p] = peers[0];
    if (p.connectionState !== "connected") return `${id}: connectionState ${p.connectionState}`;
    if (p.localCandidateType !== "relay" || p.remoteCandidateType !== "relay") {
      return `${id}: selected pair ${p.localCandidateType}/${p.remoteCandidateType}, want relay/relay`;
    }
    if (this.protocol && p.relayProtocol !== this.protocol) {
      return `${id}: local candidate allocated over ${p.relayProtocol}, want ${this.protocol}`;
    }
    if (!(p.framesDecoded > 0)) return `${id}: no video frames decoded yet`;
    if (prevFrames === undefined || !(p.framesDecoded > prevFrames)) {
      return `${id}: framesDecoded ${p.framesDecoded} not yet seen rising (previous ${prevFrames})`;
    }
    if (!(p.bytesReceived >= this.minBytes)) {
      return `${id}: ${p.bytesReceived} of ${this.minBytes} bytes received`;
    }
    return null;
  }

  /** Polls the pages until every one is in a relayed, decoding call; when each got there. */
  async waitForCall(names, deadlineMs, pollMs) {
    const deadline = Date.now() + deadlineMs;
    const prevFrames = {};
    const done = {};
    for (;;) {
      const reasons = [];
      for (const name of names) {
        const state = await this.sample(this.pages.get(name));
        const [p] = Object.values(state.peers);
        const why = this.notYet(state, prevFrames[name]);
        if (p?.framesDecoded > 0) prevFrames[name] = p.framesDecoded;
        if (why === null) done[name] ??= this.since();
        else if (!done[name]) reasons.push(`${name}: ${why}`);
      }
      if (names.every((n) => done[n])) return done;
      if (Date.now() > deadline) {
        const over = this.protocol ? ` over ${this.protocol}` : "";
        throw new Failure(`no call relayed${over} within ${deadlineMs} ms: ${reasons.join("; ")}`);
      }
      await new Promise((r) => setTimeout(r, pollMs));
    }
  }
}
