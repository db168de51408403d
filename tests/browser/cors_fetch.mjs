// A page on another origin fetches turnkey's /api/ice-servers with an
// `Authorization: Bearer` token, in Debian's Chromium: the browser sends
// the CORS preflight first, and reads the answer only if turnkey allows it.
//
//   node cors_fetch.mjs API_URL TOKEN
//
// Serves a blank page on 127.0.0.2 (another origin than API_URL's), runs
// the fetch there and prints one JSON line: { origin, status, body } or
// { origin, error }.

import http from "node:http";

import { chromium } from "playwright-core";

import { CHROMIUM, CHROMIUM_ARGS } from "./chromium.mjs";

const [apiUrl, token] = process.argv.slice(2);
if (!apiUrl || !token) {
  console.error("usage: node cors_fetch.mjs API_URL TOKEN");
  process.exit(2);
}
const watchdog = setTimeout(() => {
  console.error("cors_fetch: watchdog: nothing finished within 60 s");
  process.exit(1);
}, 60_000);

const server = http.createServer((_, res) => {
  res.writeHead(200, { "content-type": "text/html" });
  res.end("<!doctype html><title>another origin</title>");
});
await new Promise((resolve) => server.listen(0, "127.0.0.2", resolve));
const origin = `http://127.0.0.2:${server.address().port}`;

let browser;
let code = 0;
try {
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  const page = await browser.newPage();
  await page.goto(`${origin}/`);
  const result = await page.evaluate(
    async ([url, t]) => {
      try {
        const r = await fetch(url, { headers: { Authorization: `Bearer ${t}` } });
        return { status: r.status, body: await r.json() };
      } catch (e) {
        return { error: String(e) };
      }
    },
    [apiUrl, token],
  );
  console.log(JSON.stringify({ origin, ...result }));
} catch (e) {
  console.error(`cors_fetch: ${e}`);
  code = 1;
} finally {
  if (browser) await browser.close();
  server.close();
  clearTimeout(watchdog);
}
process.exit(code);
