// One remote peer's RTCPeerConnection: negotiation, recovery and stats.
// No DOM and no signaling socket here; app.js hands in what it needs.
//
// Negotiation follows the "perfect negotiation" pattern (W3C WebRTC 1.0
// §10.7, MDN's example): either side may offer at any time, and when both
// offer at once (glare) the impolite side ignores the incoming offer while
// the polite side rolls its own back. Roles come from comparing the two
// peer ids, so both ends agree without another message. Candidates trickle
// as they are found.
//
// Glare is survivable but not free, so the ordinary paths avoid it: the
// newcomer makes the first offer, and a member who sees someone join only
// attaches its media when that offer arrives (tracks added just before
// setRemoteDescription ride on the offer's m-lines and need no offer of
// their own). Chromium can lose ICE gathering on the polite side when it
// rolls back an offer whose gathering had started, leaving both ends
// "stable" and "new" for good, and an ICE restart does not revive it. So
// ICE restarts come from the impolite side only, and a connection that
// stays "new" after negotiating is rebuilt from scratch by it (`watch`).

/** A negotiated connection still "new" after this long never started ICE. */
const STUCK_MS = 5000;

export class Peer {
  /**
   * @param {object} o
   * @param {string} o.id the remote peer's id
   * @param {boolean} o.polite our role in glare (the ends disagree)
   * @param {boolean} o.offerer true when we joined after them: we offer first
   * @param {() => RTCConfiguration} o.config read at each (re)build
   * @param {() => MediaStream | null} o.localStream our camera and microphone
   * @param {(data: object) => void} o.send delivers a payload to the peer
   * @param {(stream: MediaStream | null) => void} o.onStream what to show
   * @param {() => void} o.onChange the connection state changed
   */
  constructor({ id, polite, offerer, config, localStream, send, onStream, onChange }) {
    this.id = id;
    this.polite = polite;
    this.config = config;
    this.localStream = localStream;
    this.send = send;
    this.onStream = onStream;
    this.onChange = onChange;
    // Signals are applied in order, never interleaved.
    this.queue = Promise.resolve();
    this.rebuilds = 0;
    this.connect(offerer);
  }

  /** A fresh RTCPeerConnection and negotiation state; offers if `offerer`. */
  connect(offerer) {
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.settingRemoteAnswer = false;
    this.mediaAttached = false;
    /** When signaling last became stable (performance.now()), for watch(). */
    this.stableSince = null;
    this.stream = null;

    const pc = new RTCPeerConnection(this.config());
    this.pc = pc;
    // Events of a connection we have since replaced are ignored.
    const current = () => this.pc === pc;

    pc.onnegotiationneeded = async () => {
      try {
        this.makingOffer = true;
        await pc.setLocalDescription();
        if (current()) this.send({ description: pc.localDescription });
      } catch (err) {
        if (current()) console.error(`offer to ${this.id} failed`, err);
      } finally {
        if (current()) this.makingOffer = false;
      }
    };
    pc.onicecandidate = ({ candidate }) => {
      // null marks the end of gathering; the remote side needs no word of it.
      if (candidate && current()) this.send({ candidate });
    };
    pc.ontrack = ({ track, streams }) => {
      if (!current()) return;
      const stream = streams[0] ?? this.stream ?? new MediaStream();
      if (!streams[0]) stream.addTrack(track);
      if (stream !== this.stream) {
        this.stream = stream;
        this.onStream(stream);
      }
    };
    pc.onsignalingstatechange = () => {
      this.stableSince = pc.signalingState === "stable" ? performance.now() : null;
    };
    pc.onconnectionstatechange = () => {
      if (!current()) return;
      // A dead path (e.g. a network change): gather afresh and renegotiate.
      // Only one side restarts, so the restart offers cannot cross.
      if (pc.connectionState === "failed" && !this.polite) pc.restartIce();
      this.onChange();
    };

    // Adding media fires negotiationneeded, which makes the offer.
    if (offerer) this.attachMedia();
  }

  /** Our tracks (or receive-only slots) on the connection; once per connection. */
  attachMedia() {
    if (this.mediaAttached) return;
    this.mediaAttached = true;
    const local = this.localStream();
    const tracks = local ? local.getTracks() : [];
    for (const track of tracks) this.pc.addTrack(track, local);
    // Without a camera or microphone we still want to see and hear others.
    for (const kind of ["audio", "video"]) {
      if (tracks.every((t) => t.kind !== kind)) {
        this.pc.addTransceiver(kind, { direction: "recvonly" });
      }
    }
  }

  /** Called every second or so; rebuilds a connection that never started ICE. */
  watch(now) {
    const pc = this.pc;
    // Back off, in case it is the network and not the race.
    const wait = STUCK_MS * 2 ** Math.min(this.rebuilds, 4);
    const stuck =
      pc.connectionState === "new" &&
      pc.remoteDescription !== null &&
      this.stableSince !== null &&
      now - this.stableSince > wait;
    if (stuck && !this.polite) {
      console.warn(`connection to ${this.id} never started ICE; rebuilding it`);
      this.rebuilds += 1;
      this.send({ rebuild: true });
      this.rebuild(true);
    }
  }

  rebuild(offerer) {
    const old = this.pc;
    this.connect(offerer);
    old.close();
    this.onStream(null);
    this.onChange();
  }

  /** Applies one signal payload from this peer, after the ones before it. */
  receive(data) {
    this.queue = this.queue.then(() => this.apply(data)).catch((err) => {
      console.error(`signal from ${this.id} failed`, err);
    });
  }

  async apply({ description, candidate, rebuild }) {
    if (rebuild) {
      // The other side started over; its new offer follows.
      this.rebuild(false);
      return;
    }
    const pc = this.pc;
    if (description) {
      const readyForOffer =
        !this.makingOffer && (pc.signalingState === "stable" || this.settingRemoteAnswer);
      const collision = description.type === "offer" && !readyForOffer;
      this.ignoreOffer = !this.polite && collision;
      if (this.ignoreOffer) return;
      if (description.type === "offer") this.attachMedia();
      this.settingRemoteAnswer = description.type === "answer";
      try {
        // On the polite side this rolls back our own offer if there is one.
        await pc.setRemoteDescription(description);
      } finally {
        this.settingRemoteAnswer = false;
      }
      if (description.type === "offer") {
        await pc.setLocalDescription();
        this.send({ description: pc.localDescription });
      }
    } else if (candidate) {
      try {
        await pc.addIceCandidate(candidate);
      } catch (err) {
        // Candidates of an offer we ignored cannot apply; anything else is real.
        if (!this.ignoreOffer) throw err;
      }
    }
  }

  /**
   * After signaling came back: a media path that broke meanwhile is
   * gathered afresh (only the impolite side restarts, as on failure).
   * Whether a restart was started.
   */
  restartIfBroken() {
    const broken = ["failed", "disconnected"].includes(this.pc.connectionState);
    if (broken && !this.polite) this.pc.restartIce();
    return broken && !this.polite;
  }

  /** Fresh TURN credentials, for the next gathering (ICE restart). */
  setIceServers(iceServers) {
    this.pc.setConfiguration({ ...this.pc.getConfiguration(), iceServers });
  }

  close() {
    this.pc.close();
  }

  /** The connection's facts, read from a real getStats() report. */
  async stats() {
    const pc = this.pc;
    const report = await pc.getStats();
    let pair = null;
    report.forEach((s) => {
      if (s.type === "transport" && s.selectedCandidatePairId) {
        pair = report.get(s.selectedCandidatePairId) ?? pair;
      }
    });
    if (!pair) {
      // Older engines flag the pair instead of naming it on the transport.
      report.forEach((s) => {
        if (s.type === "candidate-pair" && s.state === "succeeded" && (s.selected || s.nominated)) {
          pair ??= s;
        }
      });
    }
    const local = pair ? report.get(pair.localCandidateId) : undefined;
    const remote = pair ? report.get(pair.remoteCandidateId) : undefined;
    let framesDecoded = 0;
    let bytesReceived = 0;
    let bytesSent = 0;
    report.forEach((s) => {
      if (s.type === "inbound-rtp") {
        bytesReceived += s.bytesReceived ?? 0;
        if (s.kind === "video") framesDecoded += s.framesDecoded ?? 0;
      } else if (s.type === "outbound-rtp") {
        bytesSent += s.bytesSent ?? 0;
      }
    });
    return {
      connectionState: pc.connectionState,
      iceConnectionState: pc.iceConnectionState,
      signalingState: pc.signalingState,
      polite: this.polite,
      localCandidateType: local?.candidateType ?? null,
      remoteCandidateType: remote?.candidateType ?? null,
      relayProtocol: local?.relayProtocol ?? null,
      localAddress: local ? `${local.address}:${local.port}` : null,
      remoteAddress: remote ? `${remote.address}:${remote.port}` : null,
      roundTripTimeMs:
        pair?.currentRoundTripTime != null ? Math.round(pair.currentRoundTripTime * 1000) : null,
      framesDecoded,
      bytesReceived,
      bytesSent,
    };
  }
}
