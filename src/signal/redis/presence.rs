//! How this node stays present in Redis, and how it lives through Redis
//! being away: the backend's up/down state and the tasks that move it.
//!
//! Two tasks per node: `refresh_loop` sets the node's presence key, checks
//! the subscription, replays the leaves queued during an outage, writes
//! this node's members back into their rooms (Redis may have restarted
//! empty) and sweeps the members of dead nodes, every quarter of
//! `presence_ttl`; `subscribe_loop` keeps the node's channel subscribed and
//! hands what arrives there to the inbox. A failure anywhere marks the
//! backend down, which refuses joins and signals to other nodes at once;
//! the next whole refresh marks it up again. Leaves Redis could not hear
//! wait in `pending` for that refresh. Apart from the room
//! operations in `mod.rs` because it is the part that runs on its own
//! clock, and the part to read when an outage behaves oddly.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;

use super::scripts::{BROADCAST, LEAVE, REFRESH};
use super::{ids, to_json, Arrival, Control, Envelope, Inner, REDIS_TIMEOUT};
use super::{Delivery, PeerId, RoomError, RoomName, ServerMessage};
use crate::counter::inc;

/// Pause between attempts to subscribe again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(250);

impl Inner {
    /// Refused at once during an outage, rather than after a timeout.
    pub(super) fn check_up(&self) -> Result<(), RoomError> {
        if self.stats.is_up() {
            Ok(())
        } else {
            inc(&self.stats.errors_total);
            Err(RoomError::BackendUnavailable)
        }
    }

    pub(super) fn mark_down(&self, why: &dyn std::fmt::Display) {
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

    /// Tells Redis (and so the other nodes) that `peer` left `room`; queued
    /// for the next refresh if Redis cannot hear it now.
    pub(super) async fn remote_leave(&self, peer: PeerId, room: RoomName) {
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

    pub(super) fn lock_pending(&self) -> MutexGuard<'_, Vec<(PeerId, RoomName)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Announces members of `room` swept for a dead node: to this node's
    /// members at once, to the other nodes' through Redis.
    pub(super) async fn farewell(&self, room: &RoomName, dead: Vec<PeerId>) {
        for id in dead {
            let local = self.lock_local().members(room).to_vec();
            if !local.is_empty() {
                (self.inbox)(Arrival::Deliveries(vec![Delivery {
                    to: local,
                    msg: ServerMessage::PeerLeft { id },
                }]));
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

    pub(super) async fn refresh_loop(self: Arc<Self>) {
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
    pub(super) async fn subscribe_loop(self: Arc<Self>) {
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
        if let Ok(Envelope { to, msg }) = serde_json::from_slice::<Envelope>(payload) {
            return (self.inbox)(Arrival::Deliveries(vec![Delivery { to, msg }]));
        }
        match serde_json::from_slice::<Control>(payload) {
            Ok(Control::HandOver { peer, to }) => (self.inbox)(Arrival::HandOver { peer, to }),
            Ok(Control::HandedOver { peer, messages }) => {
                (self.inbox)(Arrival::HandedOver { peer, messages })
            }
            Err(e) => tracing::warn!(error = %e, "unreadable message on this node's channel"),
        }
    }
}
