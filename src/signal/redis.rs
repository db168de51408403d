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
//!   as an [`Envelope`].
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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::backend::{Backend, BackendStats, Inbox};
use super::ids::{PeerId, RoomName};
use super::protocol::ServerMessage;
use super::rooms::{Delivery, IceGrant, RoomError, Rooms};
use crate::counter::inc;

/// How long one Redis request or connection attempt may take; past it the
/// backend counts as unavailable.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between attempts to subscribe again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(250);

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
/// scripts write the same shape (see `FANOUT`).
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    to: Vec<PeerId>,
    msg: ServerMessage,
}

/// Shared by the scripts. `fanout` publishes MSG to every member of ROOM
/// on another node than SELF (except EXCEPT), one envelope per node. The
/// envelope is concatenated rather than built with cjson, which would turn
/// an empty array in MSG into an object; ids are hex and MSG is JSON that
/// serde wrote, so the result is valid JSON. `sweep` removes the members
/// whose node's presence key is gone and returns them.
const LIB: &str = r#"
local function fanout(room, self, except, msg, prefix)
  local m = redis.call('HGETALL', room)
  local by = {}
  for i = 1, #m, 2 do
    local p, n = m[i], m[i + 1]
    if p ~= except and n ~= self then
      by[n] = by[n] or {}
      table.insert(by[n], '"' .. p .. '"')
    end
  end
  for n, ids in pairs(by) do
    redis.call('PUBLISH', prefix .. 'chan:' .. n,
      '{"to":[' .. table.concat(ids, ',') .. '],"msg":' .. msg .. '}')
  end
end
local function sweep(room, self, prefix)
  local m = redis.call('HGETALL', room)
  local dead, alive = {}, {}
  for i = 1, #m, 2 do
    local p, n = m[i], m[i + 1]
    if n ~= self then
      if alive[n] == nil then
        alive[n] = redis.call('EXISTS', prefix .. 'node:' .. n)
      end
      if alive[n] == 0 then
        redis.call('HDEL', room, p)
        table.insert(dead, p)
      end
    end
  end
  return dead
end
"#;

/// KEYS: room. ARGV: peer, node, capacity, room ttl ms, prefix, the
/// `peer-joined` message. Returns {joined 0/1, members before (peer, node,
/// …), dead members swept}.
static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LIB}
local dead = sweep(KEYS[1], ARGV[2], ARGV[5])
local m = redis.call('HGETALL', KEYS[1])
if #m / 2 >= tonumber(ARGV[3]) then return {{0, m, dead}} end
fanout(KEYS[1], ARGV[2], ARGV[1], ARGV[6], ARGV[5])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {{1, m, dead}}"
    ))
});

/// KEYS: room. ARGV: peer, node, prefix, the `peer-left` message.
static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LIB}
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
fanout(KEYS[1], ARGV[2], ARGV[1], ARGV[4], ARGV[3])
return 1"
    ))
});

/// KEYS: room. ARGV: recipient, node, prefix, envelope. 0 when the
/// recipient is not a member on another node.
static ROUTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local n = redis.call('HGET', KEYS[1], ARGV[1])
if not n or n == ARGV[2] then return 0 end
redis.call('PUBLISH', ARGV[3] .. 'chan:' .. n, ARGV[4])
return 1",
    )
});

/// KEYS: room. ARGV: sender, node, prefix, message.
static BROADCAST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LIB}
fanout(KEYS[1], ARGV[2], ARGV[1], ARGV[4], ARGV[3])
return 1"
    ))
});

/// KEYS: room. ARGV: node, prefix, room ttl ms, this node's members…
/// Writes them back (Redis may have restarted empty), keeps the room
/// alive, and returns the members swept.
static REFRESH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{LIB}
for i = 4, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return sweep(KEYS[1], ARGV[1], ARGV[2])"
    ))
});

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
            stop: CancellationToken::new(),
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

    fn room_ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// Refused at once during an outage, rather than after a timeout.
    fn check_up(&self) -> Result<(), RoomError> {
        if self.stats.is_up() {
            Ok(())
        } else {
            inc(&self.stats.errors_total);
            Err(RoomError::BackendUnavailable)
        }
    }

    fn mark_down(&self, why: &dyn std::fmt::Display) {
        inc(&self.stats.errors_total);
        if self.stats.up.swap(0, Ordering::Relaxed) == 1 {
            inc(&self.stats.outages_total);
            tracing::warn!(
                "signaling backend unavailable: {why}; joins and signals to other nodes are refused until it is back"
            );
        }
    }

    fn mark_up(&self) {
        if self.stats.up.swap(1, Ordering::Relaxed) == 0 {
            tracing::info!("signaling backend available");
        }
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

    /// Tells Redis (and so the other nodes) that `peer` left `room`; queued
    /// for the next refresh if Redis cannot hear it now.
    async fn remote_leave(&self, peer: PeerId, room: RoomName) {
        let _shared = self.writes.read().await;
        let done = self.stats.is_up()
            && self
                .run::<i64>(
                    LEAVE
                        .key(self.room_key(&room))
                        .arg(peer.to_string())
                        .arg(&self.node)
                        .arg(&self.prefix)
                        .arg(to_json(&ServerMessage::PeerLeft { id: peer })),
                )
                .await
                .is_ok();
        if !done {
            self.lock_pending().push((peer, room));
        }
    }

    fn lock_pending(&self) -> MutexGuard<'_, Vec<(PeerId, RoomName)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Announces members of `room` swept for a dead node: to this node's
    /// members at once, to the other nodes' through Redis.
    async fn farewell(&self, room: &RoomName, dead: Vec<PeerId>) {
        for id in dead {
            let local = self.lock_local().members(room).to_vec();
            if !local.is_empty() {
                (self.inbox)(vec![Delivery {
                    to: local,
                    msg: ServerMessage::PeerLeft { id },
                }]);
            }
            let _ = self
                .run::<i64>(
                    BROADCAST
                        .key(self.room_key(room))
                        .arg(id.to_string())
                        .arg(&self.node)
                        .arg(&self.prefix)
                        .arg(to_json(&ServerMessage::PeerLeft { id })),
                )
                .await;
        }
    }

    /// Presence, the subscription, queued leaves, and this node's rooms
    /// (written back, kept alive, swept).
    async fn refresh(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let presence_ms = self.ttl.as_millis() as u64 * 3 / 4;
        redis::cmd("SET")
            .arg(format!("{}node:{}", self.prefix, self.node))
            .arg(1)
            .arg("PX")
            .arg(presence_ms)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(self.channel())
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if subscribers == 0 || !self.subscribed.load(Ordering::Relaxed) {
            if self.subscribed.load(Ordering::Relaxed) {
                self.resubscribe.notify_one();
            }
            return Err("not subscribed to this node's channel".into());
        }
        let pending = std::mem::take(&mut *self.lock_pending());
        for (i, (peer, room)) in pending.iter().enumerate() {
            let sent = LEAVE
                .key(self.room_key(room))
                .arg(peer.to_string())
                .arg(&self.node)
                .arg(&self.prefix)
                .arg(to_json(&ServerMessage::PeerLeft { id: *peer }))
                .invoke_async::<i64>(&mut conn)
                .await;
            if let Err(e) = sent {
                self.lock_pending().extend(pending.into_iter().skip(i));
                return Err(e.to_string());
            }
        }
        let mut swept = Vec::new();
        {
            let _exclusive = self.writes.write().await;
            let rooms: Vec<(RoomName, Vec<PeerId>)> = self
                .lock_local()
                .rooms()
                .map(|(r, m)| (r.clone(), m.to_vec()))
                .collect();
            for (room, members) in rooms {
                let mut call = REFRESH.key(self.room_key(&room));
                call.arg(&self.node)
                    .arg(&self.prefix)
                    .arg(self.room_ttl_ms());
                for m in &members {
                    call.arg(m.to_string());
                }
                let dead: Vec<String> = call
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                if !dead.is_empty() {
                    swept.push((room, ids(&dead)));
                }
            }
        }
        for (room, dead) in swept {
            self.farewell(&room, dead).await;
        }
        Ok(())
    }

    async fn refresh_loop(self: Arc<Self>) {
        let period = self.ttl / 4;
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = self.refresh_now.notified() => {}
                () = self.stop.cancelled() => return,
            }
            match tokio::time::timeout(period.max(REDIS_TIMEOUT), self.refresh()).await {
                Ok(Ok(())) => self.mark_up(),
                Ok(Err(e)) => self.mark_down(&e),
                Err(_) => self.mark_down(&"refresh timed out"),
            }
        }
    }

    /// Keeps this node subscribed to its channel and hands what arrives
    /// to the inbox.
    async fn subscribe_loop(self: Arc<Self>) {
        loop {
            let attempt = async {
                let mut ps = self.client.get_async_pubsub().await?;
                ps.subscribe(self.channel()).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            match tokio::time::timeout(REDIS_TIMEOUT, attempt).await {
                Ok(Ok(ps)) => {
                    self.subscribed.store(true, Ordering::Relaxed);
                    self.refresh_now.notify_one();
                    let mut messages = ps.into_on_message();
                    loop {
                        tokio::select! {
                            m = messages.next() => match m {
                                Some(m) => self.receive(m.get_payload_bytes()),
                                None => break,
                            },
                            () = self.resubscribe.notified() => break,
                            () = self.stop.cancelled() => return,
                        }
                    }
                    self.subscribed.store(false, Ordering::Relaxed);
                    self.mark_down(&"lost the subscription to this node's channel");
                }
                Ok(Err(e)) => self.mark_down(&e),
                Err(_) => self.mark_down(&"timed out subscribing"),
            }
            tokio::select! {
                () = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    fn receive(&self, payload: &[u8]) {
        match serde_json::from_slice::<Envelope>(payload) {
            Ok(Envelope { to, msg }) => (self.inbox)(vec![Delivery { to, msg }]),
            Err(e) => tracing::warn!(error = %e, "unreadable message on this node's channel"),
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
        data: Value,
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
        data: Value,
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

    fn shutdown(&self) {
        self.inner.stop.cancel();
    }
}
