// turnkey's self-test page in Debian's Chromium.
//
//   node selftest.mjs PAGE_URL SCREENSHOT_PATH
//
// Opens PAGE_URL (turnkey's /selftest.html, maybe with ?token=), waits for
// the page's own checks to finish (window.selftest.done), takes a
// full-page screenshot, presses "Copy report" and reads the clipboard
// back, and prints one JSON line on stdout: { report, copied, chromium }.
// Judging the report is the caller's job (tests/probe.rs); this exits
// non-zero only when the page could not be driven at all.
//
// For turns: Chromium verifies turnkey's certificate: the caller trusts its
// test CA in the NSS database under $HOME/.pki/nssdb.

import { chromium } from "playwright-core";

import { CHROMIUM, CHROMIUM_ARGS } from "./chromium.mjs";

const DONE_TIMEOUT_MS = 90_000;
// A last resort so a wedged browser can never hang the caller.
const WATCHDOG_MS = 110_000;

const [pageUrl, screenshot] = process.argv.slice(2);
if (!pageUrl || !screenshot) {
  console.error("usage: node selftest.mjs PAGE_URL SCREENSHOT_PATH");
  process.exit(2);
}

const consoleLines = [];
const watchdog = setTimeout(() => {
  console.error(`selftest: FAILED: watchdog: nothing finished within ${WATCHDOG_MS} ms`);
  for (const l of consoleLines.slice(-40)) console.error(`    ${l}`);
  process.exit(1);
}, WATCHDOG_MS);

let browser;
let code = 0;
try {
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  const context = await browser.newContext({ viewport: { width: 1200, height: 700 } });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: new URL(pageUrl).origin });
  const page = await context.newPage();
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  const res = await page.goto(pageUrl);
  if (!res || !res.ok()) throw new Error(`GET ${pageUrl} answered ${res?.status()}`);
  await page.waitForFunction(() => typeof window.selftest === "object", null, { timeout: 10_000 });
  const report = await page.evaluate(
    (ms) => Promise.race([window.selftest.done, new Promise((_, no) => setTimeout(() => no(new Error("selftest not done")), ms))]),
    DONE_TIMEOUT_MS,
  );
  await page.click("#copy");
  await page.waitForFunction(() => document.getElementById("copied").textContent !== "", null, { timeout: 5_000 });
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ report, copied, chromium: browser.version() }));
} catch (err) {
  code = 1;
  console.error(`selftest: FAILED: ${err.stack ?? err}`);
  for (const l of consoleLines.slice(-40)) console.error(`    ${l}`);
} finally {
  clearTimeout(watchdog);
  await browser?.close().catch(() => {});
}
process.exit(code);
