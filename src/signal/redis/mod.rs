//! The Redis backend: several turnkey nodes that share one Redis server
//! (and key prefix) share their rooms.
//!
//! What lives where:
//! - `PREFIX room:NAME`, a hash peer id → node id: the room's members,
//!   written only by Lua scripts, so the capacity check and the insert of a
//!   join are one atomic step across nodes (racing joins never overfill a
//!   room). It expires `presence_ttl` after the last node with a member
//!   there stopped refreshing it.
//! - `PREFIX node:ID`, a node's presence, refreshed every quarter of
//!   `presence_ttl` and expiring after three quarters of it. Every refresh
//!   also sweeps the rooms this node has members in: a member whose node's
//!   presence is gone is removed and announced as `peer-left`. So a crashed
//!   node's peers leave their rooms within `presence_ttl`.
//! - `PREFIX chan:ID`, one pub/sub channel per node (not per room, so
//!   subscriptions do not grow with rooms): messages for that node's peers,
//!   as an [`Envelope`], and the [`Control`] messages of a resume.
//! - `PREFIX resume:PEER`, a `/ws` peer's resumable session: the digest of
//!   its token's secret, its node and its room. A socket on another node
//!   that presents the token claims it (`claim.lua`): the peer becomes that
//!   node's member, and its old node hands over what it buffered.
//!
//! This node also keeps its own peers in a local [`Rooms`] (capacity
//! unbounded: Redis decides), so signals between two peers of this node
//! never touch Redis and keep working while Redis is away. During an
//! outage joins, and signals to peers of other nodes, are refused with
//! `backend-unavailable`; leaves are queued and replayed; the refresh keeps
//! trying and, once Redis answers and the subscription is back, the node
//! writes its members back (Redis may have lost them) and accepts joins
//! again. Messages published to a node while it was not subscribed are
//! lost: signaling peers renegotiate.
//!
//! Files: this one is the backend's room operations and its shared state;
//! `scripts.rs` and the `.lua` files beside it are the atomic steps run in
//! Redis; `presence.rs` is the refresh and subscription tasks and the
//! up/down state they drive.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::backend::{Arrival, Backend, BackendStats, Claim, Inbox};
use super::ids::{PeerId, RoomName};
use super::protocol::{Data, ServerMessage};
use super::rooms::{Delivery, IceGrant, RoomError, Rooms};
use scripts::{BROADCAST, CLAIM, JOIN, ROUTE};

mod presence;
mod scripts;

/// How long one Redis request or connection attempt may take; past it the
/// backend counts as unavailable.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the shared rooms live.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub prefix: String,
    pub presence_ttl: Duration,
}

/// `signaling.redis_url` is not one the client accepts.
#[derive(Debug, thiserror::Error)]
#[error("signaling.redis_url: {0}")]
pub struct BadRedisUrl(String);

/// A message for peers of one node, as published on its channel. The Lua
/// scripts write the same shape (see `fanout` in `lib.lua`).
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    to: Vec<PeerId>,
    msg: ServerMessage,
}

/// Node-to-node messages of a resume across nodes ([`Arrival`]'s
/// `HandOver` and `HandedOver`); `claim.lua` writes the first by hand.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum Control {
    HandOver { peer: PeerId, to: String },
    HandedOver { peer: PeerId, messages: Vec<String> },
}

/// A session key's backstop lifetime: a node that crashed never deletes
/// its peers' keys.
const SESSION_TTL_SECS: u64 = 24 * 3600;

/// The Redis backend; see the module docs.
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    prefix: String,
    ttl: Duration,
    client: redis::Client,
    conn: ConnectionManager,
    /// This node's peers only.
    local: Mutex<Rooms>,
    capacity: AtomicUsize,
    max_rooms: AtomicUsize,
    stats: Arc<BackendStats>,
    subscribed: AtomicBool,
    /// Tells the subscriber its subscription is gone (seen by the refresh).
    resubscribe: Notify,
    /// Asks for a refresh now (after subscribing).
    refresh_now: Notify,
    /// Leaves Redis has not heard of yet.
    pending: Mutex<Vec<(PeerId, RoomName)>>,
    /// Leaves hold it shared, the refresh exclusively: a refresh that read
    /// a member before it left must not write it back after its leave.
    writes: tokio::sync::RwLock<()>,
    inbox: Inbox,
    stop: CancellationToken,
}

impl Redis {
    /// Connects lazily (the node starts while Redis is down) and starts the
    /// subscriber and the refresh. Needs a tokio runtime.
    pub fn start(
        s: Settings,
        capacity: usize,
        max_rooms: usize,
        stats: Arc<BackendStats>,
        inbox: Inbox,
        stop: CancellationToken,
    ) -> Result<Redis, BadRedisUrl> {
        let client = redis::Client::open(s.url.as_str()).map_err(|e| BadRedisUrl(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| BadRedisUrl(e.to_string()))?;
        // Down until the first refresh succeeds; that is not an outage.
        stats.up.store(0, Ordering::Relaxed);
        let inner = Arc::new(Inner {
            node: format!("{:016x}", rand::random::<u64>()),
            prefix: s.prefix,
            ttl: s.presence_ttl,
            client,
            conn,
            local: Mutex::new(Rooms::new(usize::MAX)),
            capacity: AtomicUsize::new(capacity),
            max_rooms: AtomicUsize::new(max_rooms),
            stats,
            subscribed: AtomicBool::new(false),
            resubscribe: Notify::new(),
            refresh_now: Notify::new(),
            pending: Mutex::new(Vec::new()),
            writes: tokio::sync::RwLock::new(()),
            inbox,
            stop,
        });
        tracing::info!(node = %inner.node, "signaling rooms in Redis");
        tokio::spawn(inner.clone().subscribe_loop());
        tokio::spawn(inner.clone().refresh_loop());
        Ok(Redis { inner })
    }
}

impl Inner {
    fn lock_local(&self) -> MutexGuard<'_, Rooms> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn room_key(&self, room: &RoomName) -> String {
        format!("{}room:{room}", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}chan:{}", self.prefix, self.node)
    }

    fn session_key(&self, peer: PeerId) -> String {
        format!("{}resume:{peer}", self.prefix)
    }

    /// One command in the background, for what a closing connection
    /// cannot wait for; a failure counts against the backend's health.
    fn spawn_cmd(self: &Arc<Self>, cmd: redis::Cmd) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            let mut conn = me.conn.clone();
            if let Err(e) = cmd.query_async::<()>(&mut conn).await {
                me.mark_down(&e);
            }
        });
    }

    fn room_ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// Runs one script; a failure marks the backend down.
    async fn run<T: redis::FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RoomError> {
        let mut conn = self.conn.clone();
        match call.invoke_async(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                self.mark_down(&e);
                Err(RoomError::BackendUnavailable)
            }
        }
    }
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Our own message types always serialize.
    serde_json::to_string(v).unwrap_or_default()
}

/// Peer ids from Redis; anything else (not written by turnkey) is skipped.
fn ids(raw: &[String]) -> Vec<PeerId> {
    raw.iter().filter_map(|s| s.parse().ok()).collect()
}

impl Backend for Redis {
    fn join(
        &self,
        peer: PeerId,
        room: RoomName,
        grant: IceGrant,
        draining: bool,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>> {
        Box::pin(async move {
            let i = &self.inner;
            {
                let local = i.lock_local();
                if let Some(current) = local.room_of(peer) {
                    return Err(RoomError::AlreadyJoined(current.clone()));
                }
                if draining {
                    return Err(RoomError::Draining);
                }
                if local.members(&room).is_empty()
                    && local.room_count() >= i.max_rooms.load(Ordering::Relaxed)
                {
                    return Err(RoomError::TooManyRooms);
                }
            }
            i.check_up()?;
            let (joined, members, dead): (i64, Vec<String>, Vec<String>) = i
                .run(
                    JOIN.key(i.room_key(&room))
                        .arg(peer.to_string())
                        .arg(&i.node)
                        .arg(i.capacity.load(Ordering::Relaxed))
                        .arg(i.room_ttl_ms())
                        .arg(&i.prefix)
                        .arg(to_json(&ServerMessage::PeerJoined { id: peer })),
                )
                .await?;
            if !dead.is_empty() {
                i.farewell(&room, ids(&dead)).await;
            }
            if joined == 0 {
                return Err(RoomError::Full(room));
            }
            let before: Vec<PeerId> = members
                .chunks(2)
                .filter_map(|pair| pair.first()?.parse().ok())
                .collect();
            let mut out = i.lock_local().join(peer, room, grant, false)?;
            if let Some(Delivery {
                msg: ServerMessage::Joined { peers, .. },
                ..
            }) = out.first_mut()
            {
                *peers = before;
            }
            Ok(out)
        })
    }

    fn leave(&self, peer: PeerId) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>> {
        Box::pin(async move {
            let (room, out) = {
                let mut local = self.inner.lock_local();
                let room = local.room_of(peer).cloned().ok_or(RoomError::NotJoined)?;
                (room, local.leave(peer)?)
            };
            self.inner.remote_leave(peer, room).await;
            Ok(out)
        })
    }

    fn disconnect(&self, peer: PeerId) -> Vec<Delivery> {
        let (room, out) = {
            let mut local = self.inner.lock_local();
            (local.room_of(peer).cloned(), local.disconnect(peer))
        };
        if let Some(room) = room {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let inner = self.inner.clone();
                    rt.spawn(async move { inner.remote_leave(peer, room).await });
                }
                Err(_) => self.inner.lock_pending().push((peer, room)),
            }
        }
        out
    }

    fn route(
        &self,
        from: PeerId,
        to: PeerId,
        data: Data,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>> {
        Box::pin(async move {
            let i = &self.inner;
            let room = {
                let local = i.lock_local();
                let room = local.room_of(from).cloned().ok_or(RoomError::NotJoined)?;
                if to != from && local.room_of(to) == Some(&room) {
                    return local.route(from, to, data).map(|d| vec![d]);
                }
                room
            };
            if to == from {
                return Err(RoomError::UnknownPeer);
            }
            i.check_up()?;
            let envelope = to_json(&Envelope {
                to: vec![to],
                msg: ServerMessage::Signal { from, data },
            });
            let sent: i64 = i
                .run(
                    ROUTE
                        .key(i.room_key(&room))
                        .arg(to.to_string())
                        .arg(&i.node)
                        .arg(&i.prefix)
                        .arg(envelope),
                )
                .await?;
            if sent == 0 {
                return Err(RoomError::UnknownPeer);
            }
            Ok(Vec::new())
        })
    }

    fn broadcast(
        &self,
        from: PeerId,
        data: Data,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>> {
        Box::pin(async move {
            let i = &self.inner;
            let (room, local) = {
                let local = i.lock_local();
                let room = local.room_of(from).cloned().ok_or(RoomError::NotJoined)?;
                (room, local.broadcast(from, data.clone())?)
            };
            // This node's room-mates get it even while Redis is away.
            if i.stats.is_up() {
                let msg = to_json(&ServerMessage::Signal { from, data });
                let _ = i
                    .run::<i64>(
                        BROADCAST
                            .key(i.room_key(&room))
                            .arg(from.to_string())
                            .arg(&i.node)
                            .arg(&i.prefix)
                            .arg(msg),
                    )
                    .await;
            }
            Ok(vec![local])
        })
    }

    fn set_limits(&self, capacity: usize, max_rooms: usize) {
        self.inner.capacity.store(capacity, Ordering::Relaxed);
        self.inner.max_rooms.store(max_rooms, Ordering::Relaxed);
    }

    fn room_count(&self) -> usize {
        self.inner.lock_local().room_count()
    }

    fn remember_session(&self, peer: PeerId, room: &RoomName, digest: String) {
        let i = &self.inner;
        let mut cmd = redis::cmd("SET");
        cmd.arg(i.session_key(peer))
            .arg(format!("{digest} {} {room}", i.node))
            .arg("EX")
            .arg(SESSION_TTL_SECS);
        i.spawn_cmd(cmd);
    }

    fn forget_session(&self, peer: PeerId) {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.inner.session_key(peer));
        self.inner.spawn_cmd(cmd);
    }

    fn claim_session(&self, peer: PeerId, digest: String) -> BoxFuture<'_, Option<Claim>> {
        Box::pin(async move {
            let i = &self.inner;
            i.check_up().ok()?;
            let room: Option<String> = i
                .run(
                    CLAIM
                        .key(i.session_key(peer))
                        .arg(peer.to_string())
                        .arg(digest)
                        .arg(&i.node)
                        .arg(&i.prefix)
                        .arg(i.room_ttl_ms()),
                )
                .await
                .ok()?;
            let room = RoomName::new(room?).ok()?;
            i.lock_local().adopt(peer, room.clone());
            Some(Claim { room })
        })
    }

    fn hand_over(&self, peer: PeerId, to: String, messages: Vec<String>) {
        let i = &self.inner;
        // Silently: it stays in its room, as a member of node `to`.
        let _ = i.lock_local().leave(peer);
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(format!("{}chan:{to}", i.prefix))
            .arg(to_json(&Control::HandedOver { peer, messages }));
        i.spawn_cmd(cmd);
    }

    fn shutdown(&self) {
        self.inner.stop.cancel();
    }
}
