// turnkey's self-test page: does TURN work from *this* browser?
//
// It asks /api/ice-servers for what the call page gets (passing ?token= on
// from its own URL, for deployments that want one), then gathers ICE
// candidates one server at a time in a fresh RTCPeerConnection each: the
// stun: URLs for server-reflexive candidates, and each turn:/turns: URL
// alone with iceTransportPolicy "relay", so a relay candidate there can
// only come from that transport. Where one is missing it shows why, as
// the browser said it (icecandidateerror code and text) or as a timeout.
// Then two RTCPeerConnections in this page call each other relay-only and
// ping over a data channel: the round-trip time through the relay.
//
// window.selftest = { done: Promise<report>, report } is for the browser
// test (tests/browser/selftest.mjs) and the devtools console; "Copy
// report" copies the same JSON.

const GATHER_TIMEOUT_MS = 10_000;
// Once the wanted candidate is there, how long to keep listening for more
// (another interface may take until the timeout to give up).
const GATHER_SETTLE_MS = 1_000;
const CALL_TIMEOUT_MS = 15_000;
const PINGS = 5;
const PING_TIMEOUT_MS = 3_000;

const $ = (id) => document.getElementById(id);
const since = (t0) => Math.round((performance.now() - t0) * 10) / 10;
const params = new URLSearchParams(location.search);

const report = {
  page: location.href.replace(/([?&]token=)[^&]*/, "$1…"),
  userAgent: navigator.userAgent,
  started: new Date().toISOString(),
  api: null,
  rows: [],
  call: null,
  ok: false,
};

/** What an icecandidateerror code means for the person running this page. */
function hint(code) {
  if (code === 701) return "no answer from the server: its port is filtered or closed on the way";
  if (code === 401) return "credential refused: the API's secret does not match the TURN server's";
  if (code === 403) return "forbidden: the server is draining or refuses this client";
  if (code === 437 || code === 438) return "the server lost the allocation or nonce; retry";
  if (code === 486 || code === 508) return "the server is at its allocation quota or capacity";
  return "";
}

async function iceServers() {
  const url = new URL("/api/ice-servers", location.href);
  const token = params.get("token");
  const headers = {};
  if (token) {
    url.searchParams.set("token", token);
    headers.Authorization = `Bearer ${token}`;
  }
  const t0 = performance.now();
  const res = await fetch(url, { cache: "no-store", headers });
  if (!res.ok) {
    const why = res.status === 401 || res.status === 403 ? " (open this page with ?token=…)" : "";
    throw new Error(`GET /api/ice-servers answered HTTP ${res.status}${why}`);
  }
  const cfg = await res.json();
  report.api = { ms: since(t0), ttl: cfg.ttl ?? null };
  return cfg.iceServers ?? [];
}

/** The checks to run: one STUN row, one row per TURN URL, in the order browsers try them. */
function checks(servers) {
  const out = [];
  const stun = servers.flatMap((s) => [s.urls].flat().filter((u) => /^stun:/i.test(u)));
  if (stun.length) out.push({ check: "stun", url: stun[0], config: { iceServers: [{ urls: stun }] }, want: "srflx" });
  for (const s of servers) {
    for (const url of [s.urls].flat()) {
      const transport = /^turns:/i.test(url) ? "tls" : /^turn:/i.test(url) ? (/transport=tcp/i.test(url) ? "tcp" : "udp") : null;
      if (!transport) continue;
      out.push({
        check: `relay ${transport}`,
        transport,
        url,
        config: { iceServers: [{ urls: [url], username: s.username, credential: s.credential }], iceTransportPolicy: "relay" },
        want: "relay",
      });
    }
  }
  return out;
}

/**
 * Gathers candidates with `config` until gathering completes, times out,
 * or settles after a candidate of type `want` has appeared.
 */
function gather(config, want) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const found = { candidates: [], errors: [], complete: false, ms: null };
    const pc = new RTCPeerConnection(config);
    let finished = false;
    let settling = null;
    const finish = (complete) => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      clearTimeout(settling);
      found.complete = complete;
      found.ms = since(t0);
      pc.close();
      resolve(found);
    };
    const timer = setTimeout(() => finish(false), GATHER_TIMEOUT_MS);
    pc.onicecandidate = ({ candidate }) => {
      if (!candidate) return finish(true);
      if (!candidate.candidate) return;
      found.candidates.push({
        type: candidate.type,
        protocol: candidate.protocol,
        address: candidate.address,
        port: candidate.port,
        relayProtocol: candidate.relayProtocol ?? null,
        url: candidate.url ?? null,
        ms: since(t0),
      });
      if (candidate.type === want && !settling) settling = setTimeout(() => finish(false), GATHER_SETTLE_MS);
    };
    pc.onicecandidateerror = (e) => {
      found.errors.push({ url: e.url, errorCode: e.errorCode, errorText: e.errorText, ms: since(t0) });
    };
    pc.createDataChannel("selftest");
    pc.createOffer().then((o) => pc.setLocalDescription(o)).catch((err) => {
      found.errors.push({ url: null, errorCode: 0, errorText: String(err), ms: since(t0) });
      finish(false);
    });
  });
}

/** A row's verdict from what gathering found. */
function judge(c, found) {
  const types = [...new Set(found.candidates.map((x) => x.type))];
  const wanted = found.candidates.filter((x) => x.type === c.want);
  const row = {
    check: c.check,
    url: c.url,
    transport: c.transport ?? null,
    types,
    candidates: found.candidates,
    errors: found.errors,
    firstMs: wanted[0]?.ms ?? null,
    gatheringMs: found.ms,
    complete: found.complete,
    ok: wanted.length > 0,
    failure: null,
  };
  if (row.ok) return row;
  const err = found.errors[0];
  if (err) {
    const h = hint(err.errorCode);
    row.failure = `${err.errorCode} ${err.errorText}${h ? ` — ${h}` : ""}`;
  } else if (!found.complete) {
    row.failure = `timeout: no ${c.want} candidate within ${GATHER_TIMEOUT_MS / 1000} s and no error from the browser`;
  } else if (c.want === "srflx" && types.includes("host")) {
    // Browsers drop a server-reflexive candidate equal to a host one:
    // without NAT between here and the server, that is a success.
    row.ok = true;
    row.failure = null;
    row.note = "no srflx: the server sees this machine's own address (no NAT on the way)";
  } else {
    row.failure = `no ${c.want} candidate, and the browser reported no error`;
  }
  return row;
}

function renderRow(tr, row) {
  const cells = [
    row.check,
    row.url,
    row.types?.length ? row.types.join(", ") : "—",
    row.firstMs != null ? `${row.firstMs} ms` : "—",
    row.ok ? (row.note ? `ok (${row.note})` : "ok") : row.failure ?? "running…",
  ];
  tr.replaceChildren(...cells.map((text) => Object.assign(document.createElement("td"), { textContent: text })));
  tr.lastChild.dataset.result = row.failure == null && !row.ok ? "running" : row.ok ? "ok" : "fail";
}

/** Two connections in this page call each other through the relay and ping over a data channel. */
async function loopbackCall(turnServers) {
  const config = { iceServers: turnServers, iceTransportPolicy: "relay" };
  const a = new RTCPeerConnection(config);
  const b = new RTCPeerConnection(config);
  const t0 = performance.now();
  const result = { ok: false, connectMs: null, rttMs: [], selected: null, failure: null };
  try {
    a.onicecandidate = ({ candidate }) => candidate && b.addIceCandidate(candidate).catch(() => {});
    b.onicecandidate = ({ candidate }) => candidate && a.addIceCandidate(candidate).catch(() => {});
    b.ondatachannel = ({ channel }) => {
      channel.onmessage = ({ data }) => channel.send(data);
    };
    const dc = a.createDataChannel("ping");
    const opened = new Promise((resolve, reject) => {
      dc.onopen = resolve;
      setTimeout(() => reject(new Error(`no connection through the relay within ${CALL_TIMEOUT_MS / 1000} s (ICE ${a.iceConnectionState})`)), CALL_TIMEOUT_MS);
    });
    await a.setLocalDescription(await a.createOffer());
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await a.setRemoteDescription(b.localDescription);
    await opened;
    result.connectMs = since(t0);
    for (let i = 0; i < PINGS; i++) {
      const sent = performance.now();
      const echoed = new Promise((resolve, reject) => {
        dc.onmessage = ({ data }) => data === `ping ${i}` && resolve();
        setTimeout(() => reject(new Error(`ping ${i} not echoed within ${PING_TIMEOUT_MS / 1000} s`)), PING_TIMEOUT_MS);
      });
      dc.send(`ping ${i}`);
      await echoed;
      result.rttMs.push(since(sent));
    }
    result.selected = await selectedPair(a);
    result.ok = result.selected?.local === "relay" && result.selected?.remote === "relay";
    if (!result.ok) result.failure = `selected pair ${JSON.stringify(result.selected)}, want relay/relay`;
  } catch (err) {
    result.failure = err.message;
  } finally {
    a.close();
    b.close();
  }
  return result;
}

async function selectedPair(pc) {
  const stats = await pc.getStats();
  for (const s of stats.values()) {
    if (s.type !== "transport" || !s.selectedCandidatePairId) continue;
    const pair = stats.get(s.selectedCandidatePairId);
    const local = pair && stats.get(pair.localCandidateId);
    const remote = pair && stats.get(pair.remoteCandidateId);
    return {
      local: local?.candidateType ?? null,
      remote: remote?.candidateType ?? null,
      relayProtocol: local?.relayProtocol ?? null,
    };
  }
  return null;
}

function showReport() {
  $("report").textContent = JSON.stringify(report, null, 2);
  $("copy").disabled = false;
}

$("copy").addEventListener("click", async () => {
  const text = JSON.stringify(report, null, 2);
  try {
    await navigator.clipboard.writeText(text);
    $("copied").textContent = "copied";
  } catch {
    // No clipboard (insecure origin, or no permission): select the text instead.
    $("report").parentElement.open = true;
    getSelection().selectAllChildren($("report"));
    $("copied").textContent = "select and copy the report below";
  }
});

async function main() {
  const servers = await iceServers();
  const body = $("rows").tBodies[0];
  for (const c of checks(servers)) {
    const tr = body.insertRow();
    renderRow(tr, { check: c.check, url: c.url, ok: false, failure: null });
    const row = judge(c, await gather(c.config, c.want));
    report.rows.push(row);
    renderRow(tr, row);
  }
  const turn = servers
    .map((s) => ({ ...s, urls: [s.urls].flat().filter((u) => /^turns?:/i.test(u)) }))
    .filter((s) => s.urls.length > 0);
  $("call").textContent = "calling through the relay…";
  report.call = turn.length ? await loopbackCall(turn) : { ok: false, failure: "the server offers no TURN URL" };
  const call = report.call;
  const relays = report.rows.flatMap((r) => r.candidates.filter((c) => c.type === "relay").map((c) => c.address));
  if (!call.ok && relays.length > 0) {
    // Allocations worked, so the ports and the credential are fine: what
    // is left is the relayed address itself.
    call.failure += ` — relay candidates appeared (${[...new Set(relays)].join(", ")}) but do not reach the relay:` +
      " turn.external_ip must be the server's public address, and the relay port range open for UDP";
  }
  const rtt = [...call.rttMs].sort((x, y) => x - y);
  $("call").textContent = call.ok
    ? `connected in ${call.connectMs} ms over ${call.selected.local}/${call.selected.remote}` +
      `${call.selected.relayProtocol ? ` (${call.selected.relayProtocol})` : ""}; ` +
      `round trip min ${rtt[0]} / median ${rtt[rtt.length >> 1]} / max ${rtt[rtt.length - 1]} ms over ${rtt.length} pings`
    : `failed: ${call.failure}`;
  $("call").dataset.result = call.ok ? "ok" : "fail";
  report.ok = report.rows.length > 0 && report.rows.every((r) => r.ok) && call.ok;
}

const done = main()
  .catch((err) => {
    report.error = err.message;
  })
  .then(() => {
    report.finished = new Date().toISOString();
    const failed = report.rows.filter((r) => !r.ok).map((r) => r.check);
    $("summary").textContent = report.ok
      ? "all checks passed"
      : report.error ?? `failed: ${[...failed, ...(report.call?.ok === false ? ["loopback call"] : [])].join(", ")}`;
    $("summary").dataset.result = report.ok ? "ok" : "fail";
    showReport();
    return report;
  });

window.selftest = { done, report };
