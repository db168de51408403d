// How every test harness starts Debian's Chromium: headless, with fake
// camera and microphone, and nothing that phones home (this machine's
// network is closed, and background fetches would only fail). Never a
// downloaded browser.

export const CHROMIUM = "/usr/bin/chromium";

export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--use-fake-ui-for-media-stream",
  "--use-fake-device-for-media-stream",
];
