//! The socket.io shell: `/socket.io/` for pages written against
//! socket.io-client 2.x (Engine.IO 3, socket.io protocol 4), and
//! `GET /socket.io/socket.io.js`, the client script such pages load.
//!
//! Engine.IO and socket.io framing (polling, the upgrade to WebSocket, the
//! client-driven ping of Engine.IO 3) are socketioxide's, built with its
//! `v4` feature; this file registers each socket.io connection as a peer
//! of [`Signaling`], so it meets `/ws` peers in the same rooms, and moves
//! events between socketioxide and the registry. What the events mean lives
//! in [`super::tutorial`].
//!
//! Each connection gets the same bounded queue as a `/ws` peer and one
//! task (`pump`) that renders what arrives there as events. socketioxide
//! calls the event handler in arrival order; it checks the sender's budget
//! and queues the event for the pump, which handles events one at a time
//! (the room backend may wait for Redis), so an offer is never overtaken
//! by its candidates and no task is spawned per event.
//!
//! Limits: an event over `signaling.max_message_bytes` is refused with an
//! `error` event and the connection lives on; Engine.IO payloads beyond
//! [`transport_limit`] of the value at start close the connection (polling
//! and WebSocket alike). socketioxide's heartbeat uses `ping_interval_ms`
//! and `pong_timeout_ms` as they were at start; the size checked per
//! event follows reloads.
//!
//! Admission comes before socketioxide: a handshake (a request without a
//! session id) is an Engine.IO session that costs memory (about 19 KiB)
//! for as long as it lives, so [`handshake_gate`] runs the access rules,
//! the mint budget and the per-address socket cap first. A refused
//! handshake gets its HTTP refusal (401, 403, 429) and no session; an
//! admitted one carries its place under the cap in the request's
//! extensions, which socketioxide keeps with the session, so the place is
//! held from the moment the session exists (polling or upgraded) until it
//! ends. A polling session whose client never comes back with its id
//! within [`FOLLOW_UP`] is closed: socket.io-client polls again at once,
//! and a flood of abandoned handshakes must not hold places for the whole
//! heartbeat (ping interval + timeout, 45 s by default).
//!
//! A session id is a bearer secret (standard socket.io: whoever has it
//! speaks for the session, from any address), so it is never logged.
//!
//! Polling is cross-origin capable: socket.io-client 2.x sends its XHRs
//! with credentials, so the CORS layer echoes the request's `Origin` and
//! allows credentials (a wildcard would be refused by the browser), for
//! the origins the access rules allow (`access.rs`: any in `open` mode,
//! the listed ones in `origin` mode).

use std::convert::Infallible;
use std::future::{pending, ready};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use socketioxide::extract::SocketRef;
use socketioxide::handler::{ConnectHandler, FromMessage, Value as SioValue};
use socketioxide::socket::{DisconnectReason, Socket};
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::budget::Gcra;
use crate::caller::Caller;
use crate::counter::inc;

use super::peers::{Kick, Outgoing, PeerHandle, Wire, OUTGOING_QUEUE};
use super::protocol::{transport_limit, ParseError, ServerMessage};
use super::rooms::{Delivery, RoomError};
use super::timers;
use super::tutorial::{self, Args, Emit, Inbound, Renderer};
use super::{PeerId, RoomName, Signaling};

/// socket.io-client 2.3.0's browser bundle (`dist/socket.io.js` of the npm
/// package), unchanged; its MIT licence is beside it.
const CLIENT_JS: &str = include_str!("vendor/socket.io-client-2.3.0/socket.io.js");

/// socketioxide's own per-connection packet buffer, behind our queue.
const ENGINE_BUFFER: usize = 128;
/// Shortest heartbeat honoured, as for `/ws` (see `timers`).
const MIN_HEARTBEAT: Duration = timers::MIN_INTERVAL;
/// How long a new polling session may wait for its client's next request
/// (socket.io-client sends it as soon as the handshake is answered).
const FOLLOW_UP: Duration = Duration::from_secs(5);
/// Largest handshake answer read for its session id (an open packet is
/// about 100 bytes).
const OPEN_PACKET_LIMIT: usize = 4096;

/// `/socket.io/` and `/socket.io/socket.io.js`.
pub fn router(sig: Arc<Signaling>) -> Router {
    let cfg = sig.config();
    let limit = transport_limit(cfg.max_message_bytes);
    let ping_interval = cfg.ping_interval.max(MIN_HEARTBEAT);
    // Engine.IO 3 clients ping every interval and the server waits
    // interval + timeout for it: together they make `pong_timeout`.
    let ping_timeout = cfg
        .pong_timeout
        .saturating_sub(ping_interval)
        .max(MIN_HEARTBEAT);
    let (svc, io) = SocketIo::builder()
        .req_path("/socket.io")
        .ping_interval(ping_interval)
        .ping_timeout(ping_timeout)
        .max_payload(limit as u64)
        .ws_max_message_size(limit)
        .ws_max_frame_size(limit)
        .max_buffer_size(ENGINE_BUFFER)
        .build_svc();
    let handshakes = Arc::new(Handshakes {
        sig: sig.clone(),
        pending: std::sync::Mutex::default(),
    });
    let on_connect = {
        let handshakes = handshakes.clone();
        move |socket: SocketRef| {
            attach(sig.clone(), handshakes.clone(), socket);
            ready(Ok::<(), Infallible>(()))
        }
    };
    // Registered as middleware, which runs before socketioxide sends the
    // CONNECT packet, so no event can arrive before its handler exists.
    io.ns("/", (|| ready(())).with(on_connect));

    let rules = handshakes.sig.clone();
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            origin.to_str().is_ok_and(|o| rules.cors_allows(o))
        }))
        .allow_credentials(true)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(Duration::from_secs(600));
    Router::new()
        .route_service("/socket.io/", svc)
        .route_layer(axum::middleware::from_fn_with_state(
            handshakes,
            handshake_gate,
        ))
        .route("/socket.io/socket.io.js", get(client_js))
        .layer(cors)
}

/// New sessions: their admission, and the polling ones still waiting for
/// their client's next request.
struct Handshakes {
    sig: Arc<Signaling>,
    /// Session ids answered but not yet seen again, with when they were
    /// answered.
    pending: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
}

impl Handshakes {
    fn pending(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Instant>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn answered(&self, sid: String) {
        let now = Instant::now();
        let mut pending = self.pending();
        // Entries of sessions that ended before their deadline was checked
        // (closed by the client, say) are dropped once they are long past it.
        if pending.len() >= 4096 {
            pending.retain(|_, at| now.duration_since(*at) < FOLLOW_UP * 4);
        }
        pending.insert(sid, now);
    }

    /// Whether `sid` was answered and never seen again (forgets it).
    fn abandoned(&self, sid: &str) -> bool {
        self.pending().remove(sid).is_some()
    }
}

/// A new session's place under the cap, from the gate to [`attach`]
/// through the handshake's extensions (which socketioxide keeps with the
/// session: the place is given back when the session is dropped, attached
/// or not).
#[derive(Clone)]
struct Admitted(Arc<std::sync::Mutex<Option<super::Entry>>>);

/// The session id of an Engine.IO request, if it names one.
fn session_id(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "sid")
        .map(|(_, v)| v)
}

/// Runs before socketioxide: admits or refuses a handshake, and notes a
/// polling session's first follow-up (see the module doc).
async fn handshake_gate(State(h): State<Arc<Handshakes>>, req: Request, next: Next) -> Response {
    if let Some(sid) = session_id(req.uri().query()) {
        h.pending().remove(sid);
        return next.run(req).await;
    }
    if req.method() != Method::GET {
        // Not a handshake: socketioxide answers it (400).
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let entry = match h.sig.enter(&Caller::of(&parts)) {
        Ok(e) => e,
        Err(refused) => {
            tracing::debug!("socket.io handshake refused: {refused}");
            return refused.into_response();
        }
    };
    parts
        .extensions
        .insert(Admitted(Arc::new(std::sync::Mutex::new(Some(entry)))));
    let polling = parts
        .uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "transport=polling"));
    let response = next.run(Request::from_parts(parts, body)).await;
    if !polling || response.status() != StatusCode::OK {
        return response;
    }
    // The open packet names the session: `NN:0{"sid":"…",…}`.
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, OPEN_PACKET_LIMIT).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    if let Some(sid) = open_packet_sid(&bytes) {
        h.answered(sid);
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// The `sid` of an Engine.IO open packet.
fn open_packet_sid(packet: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(packet).ok()?;
    let json = &text[text.find('{')?..];
    let end = json.rfind('}')?;
    let open: serde_json::Value = serde_json::from_str(json.get(..=end)?).ok()?;
    open.get("sid")?.as_str().map(str::to_string)
}

async fn client_js() -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                "application/javascript; charset=utf-8",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT_JS,
    )
}

/// One socket.io connection as the registry's peer.
struct Peer {
    sig: Arc<Signaling>,
    id: PeerId,
    host: Option<String>,
    kick: Arc<Kick>,
    entry: super::Entry,
    /// What this socket may send: messages, bytes.
    budget: std::sync::Mutex<[Gcra; 2]>,
    /// Events for the pump, in arrival order.
    inbound: mpsc::Sender<String>,
}

/// The raw text of an event packet, `["event", arg, …]`: parsed by
/// [`tutorial::parse_event`], which checks its size first. `None` for a
/// packet with binary attachments, which the tutorial never sends.
struct RawEvent(Option<String>);

impl<A: socketioxide::adapter::Adapter> FromMessage<A> for RawEvent {
    type Error = Infallible;
    fn from_message(_: Arc<Socket<A>>, v: SioValue, _: Option<i64>) -> Result<Self, Infallible> {
        Ok(RawEvent(match v {
            SioValue::Str(text, None) => Some(text.to_string()),
            _ => None,
        }))
    }
}

/// Registers `socket` as a signaling peer and starts its pump.
fn attach(sig: Arc<Signaling>, handshakes: Arc<Handshakes>, socket: SocketRef) {
    let parts = socket.req_parts();
    let entry = parts
        .extensions
        .get::<Admitted>()
        .and_then(|a| a.0.lock().ok()?.take());
    let Some(entry) = entry else {
        // Every handshake passes the gate; a session without its place
        // was not admitted there.
        tracing::warn!("socket.io session without an admission: closed");
        let _ = socket.disconnect();
        return;
    };
    let host = crate::ice::host_from_headers(&socket.req_parts().headers);
    let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
    let (inbound, events) = mpsc::channel(OUTGOING_QUEUE);
    let kick = Arc::new(Kick::default());
    let id = sig.register(PeerHandle {
        tx,
        kick: kick.clone(),
        wire: Wire::SocketIo,
    });
    sig.stats.socketio_peers.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(peer = %id, host = host.as_deref(), "socket.io connection opened");
    let peer = Arc::new(Peer {
        sig,
        id,
        host,
        kick,
        entry,
        budget: std::sync::Mutex::new([Gcra::new(); 2]),
        inbound,
    });
    // Every event goes to one handler, which runs to completion before
    // returning the (ready) future socketioxide spawns.
    let on_event = {
        let peer = peer.clone();
        move |raw: RawEvent| {
            peer.on_event(raw);
            ready(())
        }
    };
    socket.on_fallback(on_event);
    let gone = CancellationToken::new();
    let on_disconnect = {
        let (gone, peer) = (gone.clone(), peer.clone());
        move |reason: DisconnectReason| {
            if reason == DisconnectReason::HeartbeatTimeout {
                inc(&peer.sig.stats.heartbeat_drops_total);
            }
            tracing::debug!(peer = %peer.id, ?reason, "socket.io connection closed");
            gone.cancel();
            ready(())
        }
    };
    socket.on_disconnect(on_disconnect);
    let follow_up = (socket.transport_type() == socketioxide::TransportType::Polling)
        .then(|| (handshakes, Instant::now() + FOLLOW_UP));
    tokio::spawn(pump(peer, socket, rx, events, gone, follow_up));
}

impl Peer {
    fn on_event(&self, raw: RawEvent) {
        inc(&self.sig.stats.socketio_events_total);
        let Some(text) = raw.0 else {
            return self.reply(ParseError::Binary.reply());
        };
        // Over its budget, a sender loses its own messages, nothing else.
        let (messages, bytes) = self.sig.config().send_rates();
        let now = std::time::Instant::now();
        let within = {
            let mut b = self
                .budget
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            b[0].take(messages, now, 1) && b[1].take(bytes, now, text.len() as u64)
        };
        if !within {
            inc(&self.sig.stats.rate_limited_total);
            return self.reply(ServerMessage::error(
                super::ErrorCode::RateLimited,
                "too many messages or bytes; slow down",
            ));
        }
        // Within its budget, a full queue means the pump is stuck behind
        // the backend: the event is refused like one over budget.
        if self.inbound.try_send(text).is_err() {
            inc(&self.sig.stats.rate_limited_total);
            self.reply(ServerMessage::error(
                super::ErrorCode::RateLimited,
                "too many events waiting; slow down",
            ));
        }
    }

    /// One queued event, in the pump.
    async fn handle(&self, text: String) {
        let max = self.sig.config().max_message_bytes;
        let outcome = match tutorial::parse_event(&text, max) {
            Ok(Inbound::CreateOrJoin(room)) => self.join(room).await,
            Ok(Inbound::Message(data)) => self.sig.broadcast(self.id, data.into()).await,
            Err(e) => return self.reply(e.reply()),
        };
        match outcome {
            Ok(deliveries) => self.sig.deliver(deliveries),
            Err(e) => self.reply(e.reply()),
        }
    }

    async fn join(&self, room: RoomName) -> Result<Vec<Delivery>, RoomError> {
        self.sig
            .join_as(self.id, &self.entry, self.host.as_deref(), room)
            .await
            .map(|(out, _)| out)
    }

    fn reply(&self, msg: ServerMessage) {
        self.sig.deliver(vec![Delivery {
            to: vec![self.id],
            msg,
        }]);
    }
}

/// Takes the peer out of the registry however the pump ends.
struct Registered(Arc<Peer>);

impl Drop for Registered {
    fn drop(&mut self) {
        let peer = &self.0;
        peer.sig.unregister(peer.id, &peer.kick);
        peer.sig
            .stats
            .socketio_peers
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handles the peer's events, renders what the registry queued for it as
/// events, refreshes its ICE credentials, and ends the connection on kick
/// or shutdown.
async fn pump(
    peer: Arc<Peer>,
    socket: SocketRef,
    mut rx: mpsc::Receiver<Outgoing>,
    mut events: mpsc::Receiver<String>,
    gone: CancellationToken,
    mut follow_up: Option<(Arc<Handshakes>, Instant)>,
) {
    let peer = Registered(peer);
    let peer = &peer.0;
    let shutdown = peer.sig.stop.clone();
    let mut renderer = Renderer::default();
    let mut refresh_at: Option<Instant> = None;
    // A socket must join a room in time (and again after it left).
    let mut join_by = Some(Instant::now() + peer.sig.config().join_timeout);
    loop {
        let refresh = async {
            match refresh_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => pending().await,
            }
        };
        let unjoined = async {
            match join_by {
                Some(at) => tokio::time::sleep_until(at).await,
                None => pending().await,
            }
        };
        let abandoned = async {
            match &follow_up {
                Some((_, at)) => tokio::time::sleep_until(*at).await,
                None => pending().await,
            }
        };
        tokio::select! {
            Some(text) = events.recv() => peer.handle(text).await,
            out = rx.recv() => {
                let Some(Outgoing::Message(msg)) = out else {
                    // Text, pings and closes are for `/ws` peers only.
                    continue;
                };
                if let ServerMessage::Joined { ttl, .. } = &msg {
                    refresh_at = timers::refresh_after(Duration::from_secs(*ttl))
                        .map(|after| Instant::now() + after);
                    join_by = None;
                }
                for event in renderer.render(msg) {
                    match emit(&socket, event) {
                        Ok(()) => {}
                        Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                            inc(&peer.sig.stats.slow_consumer_drops_total);
                            let _ = socket.clone().disconnect();
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(peer = %peer.id, error = %e, "socket.io emit failed");
                            return;
                        }
                    }
                }
            }
            () = refresh => {
                let (servers, ttl) =
                    (peer.sig.ice)(peer.host.as_deref(), &peer.entry.admission);
                refresh_at = timers::refresh_after(ttl).map(|after| Instant::now() + after);
                peer.reply(ServerMessage::IceServers { ice_servers: servers, ttl: ttl.as_secs() });
            }
            () = abandoned => {
                if let Some((handshakes, _)) = follow_up.take() {
                    if handshakes.abandoned(&socket.id.to_string()) {
                        inc(&peer.sig.stats.socketio_abandoned_total);
                        let _ = socket.clone().disconnect();
                        return;
                    }
                }
            }
            () = unjoined => {
                inc(&peer.sig.stats.join_timeouts_total);
                let _ = socket.clone().disconnect();
                return;
            }
            () = gone.cancelled() => return,
            () = peer.kick.notify.notified() => {
                tracing::info!(peer = %peer.id, "dropping a socket.io peer that stopped reading");
                let _ = socket.clone().disconnect();
                return;
            }
            () = shutdown.cancelled() => {
                let _ = socket.clone().disconnect();
                return;
            }
        }
    }
}

fn emit(socket: &SocketRef, e: Emit) -> Result<(), SendError> {
    // socketioxide spreads a tuple as separate arguments; an empty array
    // is a tuple of none (`()` would be sent as one `null`).
    match e.args {
        Args::None => socket.emit(e.event, &[(); 0]),
        Args::One(a) => socket.emit(e.event, &(a,)),
        Args::Two(a, b) => socket.emit(e.event, &(a, b)),
    }
}
