//! The open connections of this node and delivery to them: each connection,
//! `/ws` or socket.io, registers a [`PeerHandle`] (its bounded outgoing
//! queue, a way to kick it, and the form it wants messages in), and
//! [`Signaling::deliver`] queues the registry's and the backend's
//! deliveries to their recipients.
//!
//! Why a module of its own: both shells register here and read their
//! queues, and deliveries from the room backend (other nodes included)
//! must reach either kind of peer; neither shell owns the other's peers,
//! so neither needs to import the other.
//!
//! Senders only `try_send` into a queue and never wait: a peer that stops
//! reading fills its queue, is kicked once as a slow consumer, and nobody
//! sending to it is stalled.
//!
//! The table also holds the peers whose socket was lost and the sessions a
//! new socket may resume (`sessions.rs` does the resuming), because a
//! delivery must see which socket, if any, a peer id has now: a parked
//! peer's copy goes into its bounded buffer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{oneshot, Notify};

use crate::counter::inc;

use super::protocol::ServerMessage;
use super::rooms::Delivery;
use super::sessions::{Parked, Session};
use super::{PeerId, Signaling};

/// Messages a connection may have queued before it counts as a slow
/// consumer. Signaling is bursty but small: an offer, an answer and a few
/// dozen candidates fit comfortably.
pub(super) const OUTGOING_QUEUE: usize = 64;

/// What a connection's writer takes from its queue.
pub(super) enum Outgoing {
    /// A message as JSON text, for a `/ws` peer.
    Text(Utf8Bytes),
    /// What a resumed peer missed, oldest first: one queue item however
    /// many messages, so a full buffer cannot overflow the queue.
    Replay(VecDeque<Utf8Bytes>),
    /// The message itself, for a socket.io peer, whose shell renders it as
    /// events (`socketio.rs`).
    Message(ServerMessage),
    Ping,
    Close(u16, &'static str),
}

/// How other tasks reach a connection: its queue, and a way to make it stop.
pub(super) struct PeerHandle {
    pub(super) tx: mpsc::Sender<Outgoing>,
    pub(super) kick: Arc<Kick>,
    pub(super) wire: Wire,
}

/// How a peer wants its messages: JSON text (`/ws`) or as they are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Wire {
    Json,
    SocketIo,
}

/// A one-shot "drop this connection" signal; `Notify` keeps the permit if
/// the connection is busy, so the kick is never lost. Also the identity of
/// a connection: a peer id moves to another socket on resume, and the old
/// socket's farewell must not touch the new one.
#[derive(Default)]
pub(super) struct Kick {
    fired: AtomicBool,
    pub(super) notify: Notify,
}

impl Kick {
    pub(super) fn fire(&self) -> bool {
        let first = !self.fired.swap(true, Ordering::Relaxed);
        if first {
            self.notify.notify_one();
        }
        first
    }
}

/// This node's peers: open connections, parked ones, and the sessions
/// that may be resumed. One lock, so a resume and a delivery never
/// interleave (the buffered messages go out before anything newer).
#[derive(Default)]
pub(super) struct Table {
    pub(super) live: HashMap<PeerId, PeerHandle>,
    pub(super) parked: HashMap<PeerId, Parked>,
    pub(super) sessions: HashMap<PeerId, Session>,
    /// Sessions claimed from another node, waiting for what it buffered.
    pub(super) arriving: HashMap<PeerId, oneshot::Sender<Vec<String>>>,
    serial: u64,
}

impl Table {
    pub(super) fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }
}

/// Outgoing queues of every open connection, joined or not.
#[derive(Default)]
pub(super) struct Peers(Mutex<Table>);

impl Peers {
    pub(super) fn lock(&self) -> MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().live.is_empty()
    }
}

impl Signaling {
    /// Queues each delivery to its recipients without ever waiting. Counts
    /// what is sent, so statistics match what peers saw. A parked
    /// recipient's copy is buffered; one whose buffer overflows loses its
    /// session.
    pub(super) fn deliver(&self, deliveries: Vec<Delivery>) {
        let mut overflowed = Vec::new();
        for Delivery { to, msg } in deliveries {
            match &msg {
                ServerMessage::Error { code, .. } => self.stats.count_error(*code),
                ServerMessage::Joined { .. } => inc(&self.stats.joins_total),
                ServerMessage::Full { .. } => inc(&self.stats.full_total),
                ServerMessage::IceServers { .. } => inc(&self.stats.ice_refreshes_total),
                _ => {}
            }
            let text = match serde_json::to_string(&msg) {
                Ok(text) => Utf8Bytes::from(text),
                Err(e) => {
                    tracing::error!(error = %e, "cannot serialize a signaling message");
                    continue;
                }
            };
            let relayed = matches!(msg, ServerMessage::Signal { .. });
            let mut table = self.peers.lock();
            for id in &to {
                if let Some(handle) = table.live.get(id) {
                    let out = match handle.wire {
                        Wire::Json => Outgoing::Text(text.clone()),
                        Wire::SocketIo => Outgoing::Message(msg.clone()),
                    };
                    if self.push(&handle.tx, &handle.kick, out) && relayed {
                        inc(&self.stats.messages_relayed_total);
                        if handle.wire == Wire::SocketIo {
                            inc(&self.stats.socketio_messages_relayed_total);
                        }
                    }
                } else if let Some(parked) = table.parked.get_mut(id) {
                    if parked.buffer.push(text.clone()).is_ok() {
                        if relayed {
                            inc(&self.stats.messages_relayed_total);
                        }
                    } else {
                        table.parked.remove(id);
                        table.sessions.remove(id);
                        overflowed.push(*id);
                    }
                }
            }
        }
        if !overflowed.is_empty() {
            self.count_parked(&self.peers.lock());
        }
        for id in overflowed {
            self.backend.forget_session(id);
            inc(&self.stats.resume_overflow_total);
            tracing::debug!(peer = %id, "a lost signaling peer's resume buffer overflowed");
            self.farewell(id);
        }
    }

    /// Queues one item; a full queue kicks the connection (once).
    pub(super) fn push(&self, tx: &mpsc::Sender<Outgoing>, kick: &Kick, out: Outgoing) -> bool {
        match tx.try_send(out) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                if kick.fire() {
                    inc(&self.stats.slow_consumer_drops_total);
                }
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    pub(super) fn register(&self, handle: PeerHandle) -> PeerId {
        let mut table = self.peers.lock();
        let id = loop {
            let id = PeerId::random();
            if !table.live.contains_key(&id)
                && !table.parked.contains_key(&id)
                && !table.sessions.contains_key(&id)
            {
                break id;
            }
        };
        table.live.insert(id, handle);
        self.count_connected(&table);
        id
    }

    /// The connection `kick` identifies is gone for good: its peer leaves
    /// its room. Nothing happens if the id has since moved to another
    /// socket (a resume took it over).
    pub(super) fn unregister(&self, id: PeerId, kick: &Arc<Kick>) {
        {
            let mut table = self.peers.lock();
            if !table
                .live
                .get(&id)
                .is_some_and(|h| Arc::ptr_eq(&h.kick, kick))
            {
                return;
            }
            if table.sessions.remove(&id).is_some() {
                self.backend.forget_session(id);
            }
        }
        self.farewell(id);
        let mut table = self.peers.lock();
        table.live.remove(&id);
        self.count_connected(&table);
        if table.live.is_empty() {
            self.idle.notify_waiters();
        }
    }

    /// `id` leaves its room; its room-mates get `peer-left`.
    pub(super) fn farewell(&self, id: PeerId) {
        let farewell = self.backend.disconnect(id);
        self.count_rooms();
        self.deliver(farewell);
    }

    pub(super) fn count_connected(&self, table: &Table) {
        self.stats
            .connected_peers
            .store(table.live.len() as u64, Ordering::Relaxed);
    }

    pub(super) fn count_parked(&self, table: &Table) {
        self.stats
            .parked_peers
            .store(table.parked.len() as u64, Ordering::Relaxed);
    }
}
