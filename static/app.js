// turnkey's demo page: a small mesh video call over turnkey's own signaling
// (/ws) and TURN relay. One RTCPeerConnection per remote peer (peer.js: how
// each is negotiated, and why the newcomer offers); this file holds the
// signaling socket, the room's tiles and the buttons.
//
// window.turnkey exposes what the call is doing, sampled from getStats(),
// for the browser end-to-end test (tests/browser/e2e.mjs) and for people
// poking at the page from the devtools console.

import { Peer } from "./peer.js";

const params = new URLSearchParams(location.search);
// Deployments in token access mode hand the page an access token (?token=),
// which signaling and /api/ice-servers require.
const tokenQuery = params.get("token") ? `?token=${encodeURIComponent(params.get("token"))}` : "";
const ROOM_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const STATS_INTERVAL_MS = 1000;
const RECONNECT_MAX_MS = 10000;
// The first retry after a lost socket: soon, so a resume lands well inside
// the server's window (signaling.resume_secs, 30 s by default).
const RECONNECT_FIRST_MS = 500;

const $ = (id) => document.getElementById(id);

const call = {
  room: null,
  relayOnly: params.get("relay") === "1",
  id: null,
  ws: null,
  iceServers: null,
  localStream: null,
  /** @type {Map<string, {peer: Peer, tile: Tile}>} remote peer id → connection and tile */
  peers: new Map(),
  full: false,
  left: false,
  reconnectDelay: RECONNECT_FIRST_MS,
  /** The token that resumes our session after a lost socket (from joined/resumed). */
  resume: null,
  /** Signals written while the socket was down, sent once it is back. */
  outbox: [],
  /** Times the session was resumed; what window.turnkey reports. */
  resumes: 0,
  /** The last getStats() sample, per peer id; what window.turnkey.state() returns. */
  sample: {},
  /** Signaling messages are handled one at a time, in arrival order. */
  inbox: Promise.resolve(),
};

// ---------------------------------------------------------------------------
// Stats: what the status lines show and window.turnkey reports.

let sampling = null;

/** Refreshes every peer's sample and status line; concurrent callers share one run. */
function sampleAll() {
  sampling ??= (async () => {
    const next = {};
    for (const [id, { peer }] of [...call.peers]) {
      try {
        next[id] = await peer.stats();
      } catch (err) {
        // The peer left (its connection closed) while we were reading.
        if (call.peers.get(id)?.peer === peer) console.warn(`stats for ${id}`, err);
      }
    }
    call.sample = next;
    const now = performance.now();
    for (const remote of call.peers.values()) {
      remote.peer.watch(now);
      renderRemote(remote);
    }
  })().finally(() => {
    sampling = null;
  });
  return sampling;
}

function snapshot() {
  return {
    id: call.id,
    room: call.room,
    relayOnly: call.relayOnly,
    signaling: call.ws ? ["connecting", "open", "closing", "closed"][call.ws.readyState] : "closed",
    full: call.full,
    left: call.left,
    resumes: call.resumes,
    peers: structuredClone(call.sample),
  };
}

window.turnkey = {
  /** The last sample (at most a second old). */
  state: snapshot,
  /** A fresh sample straight from getStats(). */
  sample: async () => {
    await sampleAll();
    return snapshot();
  },
  get full() {
    return call.full;
  },
};

// ---------------------------------------------------------------------------
// Signaling.

function send(msg) {
  if (call.ws && call.ws.readyState === WebSocket.OPEN) {
    call.ws.send(JSON.stringify(msg));
  } else if (msg.type === "signal" && call.resume) {
    // The socket is down but the session may resume: the server keeps our
    // peers and buffers their messages, so ours wait here for the new socket.
    call.outbox.push(msg);
  }
}

/** A new socket whose session is kept: the signals written meanwhile go out. */
function flushOutbox() {
  const queued = call.outbox;
  call.outbox = [];
  for (const msg of queued) send(msg);
}

function rtcConfig() {
  return {
    iceServers: call.iceServers ?? [],
    iceTransportPolicy: call.relayOnly ? "relay" : "all",
    // One transport for audio and video, so one set of TURN allocations per peer.
    bundlePolicy: "max-bundle",
  };
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws${tokenQuery}`);
  call.ws = ws;
  setStatus("connecting to signaling…");
  // With a session to resume, the first message must be the resume.
  ws.onopen = () => send(call.resume ? { type: "resume", token: call.resume } : { type: "join", room: call.room });
  ws.onmessage = (event) => {
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      console.warn("signaling sent something that is not JSON", event.data);
      return;
    }
    call.inbox = call.inbox.then(() => onMessage(msg)).catch((err) => {
      console.error(`handling ${msg.type} failed`, err);
    });
  };
  ws.onclose = () => {
    if (call.ws !== ws) return;
    if (call.left || call.full) return;
    // The network changed or blipped: the calls keep their media paths, and
    // the new socket resumes our session (same id, same peers). Without a
    // token (never joined) there is nothing to keep.
    if (!call.resume) {
      closePeers();
      call.id = null;
    }
    const delay = call.reconnectDelay;
    call.reconnectDelay = Math.min(delay * 2, RECONNECT_MAX_MS);
    const what = call.resume ? "resuming" : "retrying";
    setStatus(`signaling connection lost; ${what} in ${(delay / 1000).toFixed(1)} s`);
    setTimeout(() => {
      if (!call.left && !call.full) connect();
    }, delay);
  };
}

async function onMessage(msg) {
  switch (msg.type) {
    case "joined": {
      call.id = msg.id;
      call.resume = msg.resume ?? null;
      call.reconnectDelay = RECONNECT_FIRST_MS;
      call.iceServers =
        Array.isArray(msg.iceServers) && msg.iceServers.length > 0
          ? msg.iceServers
          : await fetchIceServers();
      // We are the newcomer: the peers already here wait for our offers.
      for (const id of msg.peers) addPeer(id, true);
      renderHeader();
      break;
    }
    case "resumed": {
      call.resume = msg.resume;
      call.reconnectDelay = RECONNECT_FIRST_MS;
      call.resumes += 1;
      call.iceServers = msg.iceServers;
      flushOutbox();
      // The media may have survived the change; a path that did not is
      // gathered afresh (an ICE restart, with the fresh credentials).
      let restarted = 0;
      for (const { peer } of call.peers.values()) {
        peer.setIceServers(msg.iceServers);
        if (peer.restartIfBroken()) restarted += 1;
      }
      renderHeader();
      const how = restarted > 0 ? `; restarting ICE with ${restarted} peer${restarted === 1 ? "" : "s"}` : "";
      setStatus(`${$("signaling-status").textContent} · signaling resumed${how}`);
      break;
    }
    case "peer-joined":
      addPeer(msg.id, false);
      renderHeader();
      break;
    case "peer-left":
      removePeer(msg.id);
      renderHeader();
      break;
    case "signal":
      // A signal can only come from a peer of our room; one we have not
      // heard join yet (a race) gets its connection now.
      (call.peers.get(msg.from) ?? addPeer(msg.from, false)).peer.receive(msg.data ?? {});
      break;
    case "ice-servers":
      call.iceServers = msg.iceServers;
      for (const { peer } of call.peers.values()) peer.setIceServers(msg.iceServers);
      break;
    case "full":
      call.full = true;
      stopLocalMedia();
      call.ws.close();
      $("call").hidden = true;
      showBanner(`Room is full: "${msg.room}" already has as many people as it allows. Pick another room name.`);
      showForm();
      setStatus(`room ${msg.room} is full`);
      break;
    case "error":
      if (msg.code === "resume-refused") {
        // Too late (the server gave up on us) or not ours: start over.
        call.resume = null;
        call.outbox = [];
        closePeers();
        call.id = null;
        setStatus("signaling session expired; joining again");
        send({ type: "join", room: call.room });
        break;
      }
      console.warn(`signaling error ${msg.code}: ${msg.message}`);
      setStatus(`signaling error: ${msg.message}`);
      break;
    default:
      console.debug("ignoring signaling message", msg);
  }
}

async function fetchIceServers() {
  try {
    const res = await fetch(`/api/ice-servers${tokenQuery}`, { cache: "no-store" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    return (await res.json()).iceServers ?? [];
  } catch (err) {
    console.warn("no ICE servers; only direct connections will work", err);
    return [];
  }
}

function addPeer(id, offerer) {
  if (call.peers.has(id)) return call.peers.get(id);
  const tile = makeRemoteTile(id);
  const remote = { tile, peer: null };
  remote.peer = new Peer({
    id,
    // Both ends compute opposite answers from the same two ids.
    polite: call.id > id,
    offerer,
    config: rtcConfig,
    localStream: () => call.localStream,
    send: (data) => send({ type: "signal", to: id, data }),
    onStream: (stream) => {
      tile.video.srcObject = stream;
      if (stream) playWithFallback(tile);
    },
    onChange: () => renderRemote(remote),
  });
  call.peers.set(id, remote);
  renderRemote(remote);
  return remote;
}

function removePeer(id) {
  const remote = call.peers.get(id);
  if (!remote) return;
  call.peers.delete(id);
  delete call.sample[id];
  remote.peer.close();
  remote.tile.root.remove();
}

function closePeers() {
  for (const id of [...call.peers.keys()]) removePeer(id);
  renderHeader();
}

// ---------------------------------------------------------------------------
// Local media and controls.

async function openLocalMedia() {
  if (!navigator.mediaDevices?.getUserMedia) {
    showBanner("This page is not a secure context (use https:// or localhost), so the camera is unavailable; you can still see and hear others.");
    return null;
  }
  const wishes = [
    { audio: true, video: { width: { ideal: 640 }, height: { ideal: 480 } } },
    { video: true },
    { audio: true },
  ];
  for (const constraints of wishes) {
    try {
      return await navigator.mediaDevices.getUserMedia(constraints);
    } catch (err) {
      console.warn("getUserMedia", constraints, err);
    }
  }
  showBanner("No camera or microphone could be opened; you can still see and hear others.");
  return null;
}

function stopLocalMedia() {
  for (const track of call.localStream?.getTracks() ?? []) track.stop();
  call.localStream = null;
  $("local-video").srcObject = null;
}

function toggleTracks(kind, button, offLabel, onLabel) {
  const tracks = call.localStream?.getTracks().filter((t) => t.kind === kind) ?? [];
  const enable = !tracks.some((t) => t.enabled);
  for (const t of tracks) t.enabled = enable;
  button.textContent = enable ? offLabel : onLabel;
  button.setAttribute("aria-pressed", String(!enable));
  renderLocal();
}

function renderLocal() {
  const tracks = call.localStream?.getTracks() ?? [];
  const on = (kind) => tracks.some((t) => t.kind === kind && t.enabled && t.readyState === "live");
  const has = (kind) => tracks.some((t) => t.kind === kind);
  $("mute").disabled = !has("audio");
  $("camera").disabled = !has("video");
  const parts = [
    has("audio") ? `mic ${on("audio") ? "on" : "muted"}` : "no mic",
    has("video") ? `camera ${on("video") ? "on" : "off"}` : "no camera",
  ];
  if (call.relayOnly) parts.push("relay only");
  $("local-status").textContent = parts.join(" · ");
}

function leave() {
  call.left = true;
  send({ type: "leave" });
  call.id = null;
  call.resume = null;
  call.ws?.close();
  closePeers();
  stopLocalMedia();
  $("call").hidden = true;
  setStatus(`left room ${call.room}`);
  showForm();
}

// ---------------------------------------------------------------------------
// DOM helpers.

/** @typedef {{root: HTMLElement, video: HTMLVideoElement, status: HTMLElement}} Tile */

function makeRemoteTile(id) {
  const root = $("remote-tile").content.firstElementChild.cloneNode(true);
  root.dataset.peer = id;
  root.querySelector(".name").textContent = `peer ${id.slice(0, 8)}`;
  $("tiles").append(root);
  return {
    root,
    video: root.querySelector("video"),
    status: root.querySelector(".status"),
  };
}

/** The status line: connection state and, from the last sample, the path. */
function renderRemote({ peer, tile }) {
  const s = call.sample[peer.id];
  const state = peer.pc.connectionState;
  const parts = [state];
  if (s && s.localCandidateType) {
    const proto = s.relayProtocol ? ` over ${s.relayProtocol}` : "";
    parts.push(`${s.localCandidateType} ↔ ${s.remoteCandidateType}${proto}`);
  }
  if (s && s.framesDecoded) parts.push(`${s.framesDecoded} frames`);
  if (s && s.roundTripTimeMs != null) parts.push(`rtt ${s.roundTripTimeMs} ms`);
  tile.status.textContent = parts.join(" · ");
  tile.status.dataset.state = state;
}

/** Plays a remote video; if autoplay with sound is refused, plays it muted. */
function playWithFallback(tile) {
  const video = tile.video;
  video.play().catch(() => {
    if (video.muted) return;
    video.muted = true;
    video.play().catch(() => {});
    const name = tile.root.querySelector(".name");
    name.textContent += " (muted by the browser: click the video to unmute)";
    video.addEventListener("click", () => {
      video.muted = false;
      video.play().catch(() => {});
      name.textContent = name.textContent.replace(/ \(muted.*\)$/, "");
    }, { once: true });
  });
}

function setStatus(text) {
  $("signaling-status").textContent = text;
}

function renderHeader() {
  if (!call.id) return;
  const n = call.peers.size;
  const relay = call.relayOnly ? " · relay only" : "";
  setStatus(`room ${call.room} · you are ${call.id.slice(0, 8)} · ${n} other${n === 1 ? "" : "s"}${relay}`);
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = false;
}

function showForm() {
  $("room-input").value = call.room ?? "";
  $("relay-input").checked = call.relayOnly;
  $("join-form").hidden = false;
}

// ---------------------------------------------------------------------------

async function main() {
  const room = params.get("room");
  if (room === null || room === "") {
    $("room-input").value = `room-${Math.random().toString(36).slice(2, 8)}`;
    $("relay-input").checked = call.relayOnly;
    $("join-form").hidden = false;
    return;
  }
  if (!ROOM_RE.test(room)) {
    showBanner("Room names are 1–64 letters, digits, '_', '.' or '-'.");
    call.room = room;
    showForm();
    return;
  }
  call.room = room;
  document.title = `${room} · turnkey`;
  $("call").hidden = false;
  $("mute").onclick = (e) => toggleTracks("audio", e.currentTarget, "Mute", "Unmute");
  $("camera").onclick = (e) => toggleTracks("video", e.currentTarget, "Camera off", "Camera on");
  $("leave").onclick = leave;

  call.localStream = await openLocalMedia();
  $("local-video").srcObject = call.localStream;
  renderLocal();
  connect();
  setInterval(() => {
    if (call.peers.size > 0) sampleAll();
  }, STATS_INTERVAL_MS);
}

main();
