//! WebSocket signaling: peers meet in named rooms and relay opaque JSON
//! (SDP offers/answers, ICE candidates) to each other, and receive the ICE
//! server list with fresh TURN credentials.
//!
//! The module is split the usual way: [`protocol`] is the wire format,
//! [`rooms`] the registry (plain data, unit-tested), [`backend`] where the
//! rooms live (this process, or Redis shared by several nodes: `redis`),
//! [`timers`] the
//! per-connection deadlines (plain data too), [`resume`] the tokens and
//! buffers that let a lost `/ws` peer come back (plain data; `sessions`
//! parks, expires, resumes and hands over), and `ws` the thin axum shell
//! that owns sockets and tasks. The socket.io tutorial's peers meet `/ws`
//! peers in the same registry: [`tutorial`] maps its events (plain data),
//! `socketio` is their shell at `/socket.io/`. Both shells register their
//! connections in `peers`, which delivers to either kind; neither shell
//! imports the other. This file is the surface the
//! rest of the application uses: [`Signaling`], [`SignalConfig`],
//! [`SignalStats`] and [`router`].
//!
//! Lifecycle: while the drain flag it shares with the relay is set, new
//! joins are refused and running calls continue; [`Signaling::shutdown`]
//! closes every connection with 1001 "going away" and
//! [`Signaling::wait_idle`] tells when they are gone.

pub mod backend;
#[cfg(test)]
mod backend_tests;
pub mod ids;
mod peers;
pub mod protocol;
pub mod redis;
#[cfg(test)]
mod redis_server;
pub mod resume;
pub mod rooms;
mod sessions;
mod socketio;
pub mod timers;
pub mod tutorial;
mod ws;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use std::net::IpAddr;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::access::{Admission, Doorman, Refusal};
use crate::budget::{Occupancy, PerAddress, Rate, Slot};
use crate::caller::Caller;
use crate::counter::inc;
use crate::lifecycle::Drain;
use backend::{Arrival, Backend, BackendStats, Inbox, Memory};
use rooms::{Delivery, IceGrant, RoomError};

pub use ids::{PeerId, RoomName};
pub use protocol::{ClientMessage, ErrorCode, ServerMessage};
pub use rooms::Rooms;

/// A refused socket's HTTP answer: the status, and the reason as JSON.
impl axum::response::IntoResponse for EntryRefusal {
    fn into_response(self) -> axum::response::Response {
        match self {
            EntryRefusal::Access(r) => r.into_response(),
            EntryRefusal::TooManySockets => (
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                axum::Json(serde_json::json!({ "error": self.to_string() })),
            )
                .into_response(),
        }
    }
}

/// `GET /ws`, the socket.io endpoint and its client script; the caller
/// merges it into the app router.
pub fn router(sig: Arc<Signaling>) -> axum::Router {
    ws::router(sig.clone()).merge(socketio::router(sig))
}

/// Settings of the signaling service. `room_capacity` applies to the next
/// join after [`Signaling::set_config`]; the others to connections opened
/// afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalConfig {
    /// Most peers in one room: 2 for 1:1 calls, more for small mesh calls.
    pub room_capacity: usize,
    /// Largest accepted text message, in bytes. Messages somewhat larger are
    /// answered with `too-large`; far larger ones close the connection (see
    /// `ws.rs`).
    pub max_message_bytes: usize,
    /// How often the server pings each connection.
    pub ping_interval: Duration,
    /// A connection that sent nothing (not even a pong) for this long is
    /// dropped and announced as `peer-left`.
    pub pong_timeout: Duration,
    /// A socket that has not joined a room this long is closed.
    pub join_timeout: Duration,
    /// Sockets per client address (IPv6: per /64).
    pub max_sockets_per_ip: usize,
    /// What one socket may send (twice that at once); beyond, its messages
    /// are dropped with `rate-limited`, and its room-mates never notice.
    pub messages_per_sec: u64,
    pub bytes_per_sec: u64,
    /// Joins per second per client address (twice that at once).
    pub joins_per_sec_per_ip: u64,
    /// Rooms in all.
    pub max_rooms: usize,
    /// How long a joined `/ws` peer whose socket was lost (no close frame,
    /// or silent past `pong_timeout`) keeps its id and room for a socket
    /// that resumes it (`resume.rs`); zero: never, it leaves at once.
    pub resume_window: Duration,
    /// Most bytes buffered for one such peer; more ends its session.
    pub resume_buffer_bytes: usize,
}

impl Default for SignalConfig {
    fn default() -> Self {
        Self {
            room_capacity: 2,
            max_message_bytes: 64 * 1024,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(45),
            join_timeout: Duration::from_secs(30),
            max_sockets_per_ip: 32,
            messages_per_sec: 50,
            bytes_per_sec: 256 * 1024,
            joins_per_sec_per_ip: 5,
            max_rooms: 10_000,
            resume_window: Duration::from_secs(30),
            resume_buffer_bytes: 64 * 1024,
        }
    }
}

impl SignalConfig {
    /// One socket's budgets: messages, and bytes.
    pub fn send_rates(&self) -> (Rate, Rate) {
        (
            Rate {
                per_sec: self.messages_per_sec,
                burst: self.messages_per_sec * 2,
            },
            Rate {
                per_sec: self.bytes_per_sec,
                burst: self.bytes_per_sec * 2,
            },
        )
    }
}

/// Why a socket may not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryRefusal {
    #[error(transparent)]
    Access(#[from] Refusal),
    #[error("too many signaling sockets from this address")]
    TooManySockets,
}

impl EntryRefusal {
    pub fn status(self) -> u16 {
        match self {
            Self::Access(r) => r.status(),
            Self::TooManySockets => 429,
        }
    }
}

/// An open socket's admission: the terms the access rules gave it, and
/// its place under the per-address cap (given back when dropped).
#[derive(Debug)]
pub struct Entry {
    ip: IpAddr,
    pub admission: Admission,
    _place: Slot,
}

/// Supplies the `iceServers` list (a JSON array of RTCIceServer-shaped
/// objects) and how long its credentials live, for the HTTP host the client
/// used (`None` when the request had no usable `Host`). Called once per join
/// and once per refresh, never while a lock is held. A zero ttl means the
/// list holds no expiring credential, so no refresh is scheduled.
pub type IceServersFn = Arc<
    dyn Fn(Option<&str>, &crate::access::Admission) -> (serde_json::Value, Duration) + Send + Sync,
>;

/// Counters and gauges, plain atomics so the hot path pays one relaxed add;
/// the metrics module reads them at scrape time.
#[derive(Debug, Default)]
pub struct SignalStats {
    /// Open connections (joined or not), `/ws` and socket.io alike.
    pub connected_peers: AtomicU64,
    /// Of those, socket.io connections.
    pub socketio_peers: AtomicU64,
    /// socket.io polling sessions closed because their client never came
    /// back after the handshake.
    pub socketio_abandoned_total: AtomicU64,
    /// Events received from socket.io peers, accepted or refused.
    pub socketio_events_total: AtomicU64,
    /// `message` events delivered to socket.io peers (also counted in
    /// `messages_relayed_total`).
    pub socketio_messages_relayed_total: AtomicU64,
    /// Rooms with at least one member.
    pub rooms: AtomicU64,
    pub joins_total: AtomicU64,
    /// Joins answered with `full`.
    pub full_total: AtomicU64,
    /// `signal` messages queued to their recipient.
    pub messages_relayed_total: AtomicU64,
    /// `ice-servers` refreshes sent.
    pub ice_refreshes_total: AtomicU64,
    /// `error` messages sent, indexed by [`ErrorCode::index`].
    pub errors_total: [AtomicU64; ErrorCode::COUNT],
    /// Connections dropped for sending nothing within `pong_timeout`.
    pub heartbeat_drops_total: AtomicU64,
    /// Connections dropped because their outgoing queue was full.
    pub slow_consumer_drops_total: AtomicU64,
    /// Sockets refused over the per-address cap, closed for not joining in
    /// time, and messages dropped over their sender's budget.
    pub sockets_refused_total: AtomicU64,
    pub join_timeouts_total: AtomicU64,
    pub rate_limited_total: AtomicU64,
    /// Peers whose socket was lost, waiting for a resume now.
    pub parked_peers: AtomicU64,
    /// Sessions taken over by a `resume`; sessions of lost sockets that
    /// ended because no resume came in time, or because what was
    /// addressed to them meanwhile passed `resume_buffer_bytes`.
    pub resumes_total: AtomicU64,
    pub resume_expired_total: AtomicU64,
    pub resume_overflow_total: AtomicU64,
    /// Where the rooms live: up or not, outages, failed operations.
    pub backend: Arc<BackendStats>,
}

impl SignalStats {
    /// `error` messages sent with `code` so far.
    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.errors_total
            .get(code.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn count_error(&self, code: ErrorCode) {
        if let Some(counter) = self.errors_total.get(code.index()) {
            crate::counter::inc(counter);
        }
    }
}

/// The signaling service state shared by all connections.
pub struct Signaling {
    config: RwLock<SignalConfig>,
    ice: IceServersFn,
    /// Who may open a socket (`access.rs`).
    doorman: Arc<Doorman>,
    /// Open sockets (socket.io: sessions, from their handshake) per client
    /// address key.
    sockets: Arc<Occupancy>,
    /// Join budgets per client address.
    joins: Mutex<PerAddress>,
    /// Where the rooms live.
    backend: Arc<dyn Backend>,
    /// Outgoing queues of every open connection, joined or not.
    peers: peers::Peers,
    stats: SignalStats,
    /// The appliance's drain flag: while set, joins are refused.
    drain: Arc<Drain>,
    /// A child of the appliance's stop token, cancelled at shutdown (or
    /// with the appliance): every connection and the backend's tasks end.
    stop: CancellationToken,
    /// Woken when the last connection goes away.
    idle: Notify,
}

impl Signaling {
    /// One node, rooms in memory.
    pub fn new(
        cfg: SignalConfig,
        ice: IceServersFn,
        doorman: Arc<Doorman>,
        drain: Arc<Drain>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let memory = Arc::new(Memory::new(cfg.room_capacity, cfg.max_rooms));
        let made: Result<_, std::convert::Infallible> =
            Self::with_backend(cfg, ice, doorman, drain, stop, |_, _, _| Ok(memory));
        match made {
            Ok(sig) => sig,
            Err(never) => match never {},
        }
    }

    /// Rooms in Redis, shared with every node on the same server and
    /// prefix. Needs a tokio runtime (it starts the backend's tasks).
    pub fn with_redis(
        cfg: SignalConfig,
        ice: IceServersFn,
        doorman: Arc<Doorman>,
        drain: Arc<Drain>,
        stop: CancellationToken,
        settings: redis::Settings,
    ) -> Result<Arc<Self>, redis::BadRedisUrl> {
        Self::with_backend(cfg, ice, doorman, drain, stop, |stats, inbox, stop| {
            let r = redis::Redis::start(
                settings,
                cfg.room_capacity,
                cfg.max_rooms,
                stats,
                inbox,
                stop,
            )?;
            Ok(Arc::new(r))
        })
    }

    /// `make` gets the backend's health counters and the inbox for
    /// deliveries from other nodes.
    fn with_backend<E>(
        cfg: SignalConfig,
        ice: IceServersFn,
        doorman: Arc<Doorman>,
        drain: Arc<Drain>,
        stop: CancellationToken,
        make: impl FnOnce(Arc<BackendStats>, Inbox, CancellationToken) -> Result<Arc<dyn Backend>, E>,
    ) -> Result<Arc<Self>, E> {
        let stats = SignalStats::default();
        let backend_stats = stats.backend.clone();
        let mut made = None;
        let sig = Arc::new_cyclic(|me: &std::sync::Weak<Signaling>| {
            let me = me.clone();
            let inbox: Inbox = Arc::new(move |arrival| {
                if let Some(sig) = me.upgrade() {
                    match arrival {
                        Arrival::Deliveries(d) => sig.deliver(d),
                        Arrival::HandOver { peer, to } => sig.hand_over(peer, to),
                        Arrival::HandedOver { peer, messages } => sig.handed_over(peer, messages),
                    }
                }
            });
            let backend = match make(backend_stats, inbox, stop.child_token()) {
                Ok(b) => b,
                Err(e) => {
                    made = Some(e);
                    Arc::new(Memory::new(cfg.room_capacity, cfg.max_rooms))
                }
            };
            Self {
                config: RwLock::new(cfg),
                ice,
                doorman,
                sockets: Occupancy::new(),
                joins: Mutex::new(PerAddress::new(65_536)),
                backend,
                peers: peers::Peers::default(),
                stats,
                drain,
                stop,
                idle: Notify::new(),
            }
        });
        match made {
            Some(e) => Err(e),
            None => Ok(sig),
        }
    }

    pub fn config(&self) -> SignalConfig {
        *self.config.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Swaps the configuration (e.g. on reload). Existing connections keep
    /// their heartbeat and size settings; room capacity applies at once.
    pub fn set_config(&self, cfg: SignalConfig) {
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = cfg;
        self.backend.set_limits(cfg.room_capacity, cfg.max_rooms);
    }

    /// Admits a socket from `caller`, or says why not: the per-address
    /// cap first (a refusal there costs no mint), then the access rules.
    pub fn enter(&self, caller: &Caller) -> Result<Entry, EntryRefusal> {
        let cap = self.config().max_sockets_per_ip;
        if self.sockets.held_by(caller.ip) >= cap {
            inc(&self.stats.sockets_refused_total);
            return Err(EntryRefusal::TooManySockets);
        }
        let admission = self.doorman.admit(&caller.credentials(), caller.ip)?;
        // Taken after the decision; another socket from the address may
        // have taken the last place meanwhile.
        let place = self.sockets.take(caller.ip, cap, usize::MAX).map_err(|_| {
            inc(&self.stats.sockets_refused_total);
            EntryRefusal::TooManySockets
        })?;
        Ok(Entry {
            ip: caller.ip,
            admission,
            _place: place,
        })
    }

    /// Which pages may read signaling answers cross-origin (socket.io's
    /// polling transport).
    pub fn cors_allows(&self, origin: &str) -> bool {
        self.doorman.cors_allows(origin)
    }

    /// Joins `peer` to `room` on the terms of its entry: the room its token
    /// allows, its address's join budget; then the registry's own rules.
    async fn join_as(
        &self,
        peer: PeerId,
        entry: &Entry,
        host: Option<&str>,
        room: RoomName,
    ) -> Result<(Vec<Delivery>, Duration), RoomError> {
        if entry
            .admission
            .room
            .as_deref()
            .is_some_and(|allowed| allowed != room.as_str())
        {
            return Err(RoomError::ForbiddenRoom);
        }
        let cfg = self.config();
        let rate = Rate {
            per_sec: cfg.joins_per_sec_per_ip,
            burst: cfg.joins_per_sec_per_ip * 2,
        };
        let allowed = self
            .joins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(entry.ip, rate, std::time::Instant::now());
        if !allowed {
            return Err(RoomError::RateLimited);
        }
        let (servers, ttl) = (self.ice)(host, &entry.admission);
        let draining = self.is_draining();
        let grant = IceGrant { servers, ttl };
        let out = self.backend.join(peer, room, grant, draining).await;
        self.count_rooms();
        Ok((out?, ttl))
    }

    /// Sends `data` from `from` to `to`, a member of its room.
    async fn route(
        &self,
        from: PeerId,
        to: PeerId,
        data: protocol::Data,
    ) -> Result<Vec<Delivery>, RoomError> {
        self.backend.route(from, to, data).await
    }

    /// Sends `data` from `from` to the other members of its room.
    async fn broadcast(
        &self,
        from: PeerId,
        data: protocol::Data,
    ) -> Result<Vec<Delivery>, RoomError> {
        self.backend.broadcast(from, data).await
    }

    /// Takes `peer` out of its room; its resume token dies with the
    /// membership.
    async fn leave(&self, peer: PeerId) -> Result<Vec<Delivery>, RoomError> {
        self.revoke_resume(peer);
        let out = self.backend.leave(peer).await;
        self.count_rooms();
        out
    }

    /// While draining, `join` is answered with the `draining` error; peers
    /// already in rooms keep signaling.
    pub fn is_draining(&self) -> bool {
        self.drain.is_draining()
    }

    /// Drains and closes every connection with 1001 "going away"; new
    /// connections are closed the same way. Final: there is no undo.
    pub fn shutdown(&self) {
        self.drain.start();
        self.stop.cancel();
        self.backend.shutdown();
    }

    /// Whether the room backend answers (always, in memory).
    pub fn backend_up(&self) -> bool {
        self.stats.backend.is_up()
    }

    /// Resolves once no connection is open (at once if none is).
    pub async fn wait_idle(&self) {
        loop {
            // Created before the check so a wake-up in between is not lost.
            let notified = self.idle.notified();
            if self.peers.is_empty() {
                return;
            }
            notified.await;
        }
    }

    pub fn stats(&self) -> &SignalStats {
        &self.stats
    }

    /// Refreshes the rooms gauge (rooms with a member on this node).
    /// Refreshes the rooms gauge; a room fewer may be what a drain waits
    /// for.
    fn count_rooms(&self) {
        self.stats
            .rooms
            .store(self.backend.room_count() as u64, Ordering::Relaxed);
        self.drain.progressed();
    }
}
