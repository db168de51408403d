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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::Notify;

use crate::counter::inc;

use super::protocol::ServerMessage;
use super::rooms::Delivery;
use super::{PeerId, Signaling};

/// Messages a connection may have queued before it counts as a slow
/// consumer. Signaling is bursty but small: an offer, an answer and a few
/// dozen candidates fit comfortably.
pub(super) const OUTGOING_QUEUE: usize = 64;

/// What a connection's writer takes from its queue.
pub(super) enum Outgoing {
    /// A message as JSON text, for a `/ws` peer.
    Text(Utf8Bytes),
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
/// the connection is busy, so the kick is never lost.
#[derive(Default)]
pub(super) struct Kick {
    fired: AtomicBool,
    pub(super) notify: Notify,
}

/// Outgoing queues of every open connection, joined or not.
#[derive(Default)]
pub(super) struct Peers(Mutex<HashMap<PeerId, PeerHandle>>);

impl Peers {
    fn lock(&self) -> MutexGuard<'_, HashMap<PeerId, PeerHandle>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl Signaling {
    /// Queues each delivery to its recipients without ever waiting. Counts
    /// what is sent, so statistics match what peers saw.
    pub(super) fn deliver(&self, deliveries: Vec<Delivery>) {
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
            let peers = self.peers.lock();
            for handle in to.iter().filter_map(|id| peers.get(id)) {
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
            }
        }
    }

    /// Queues one item; a full queue kicks the connection (once).
    pub(super) fn push(&self, tx: &mpsc::Sender<Outgoing>, kick: &Kick, out: Outgoing) -> bool {
        match tx.try_send(out) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                if !kick.fired.swap(true, Ordering::Relaxed) {
                    inc(&self.stats.slow_consumer_drops_total);
                    kick.notify.notify_one();
                }
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    pub(super) fn register(&self, handle: PeerHandle) -> PeerId {
        let mut peers = self.peers.lock();
        let id = loop {
            let id = PeerId::random();
            if !peers.contains_key(&id) {
                break id;
            }
        };
        peers.insert(id, handle);
        self.stats
            .connected_peers
            .store(peers.len() as u64, Ordering::Relaxed);
        id
    }

    pub(super) fn unregister(&self, id: PeerId) {
        let farewell = self.backend.disconnect(id);
        self.count_rooms();
        self.deliver(farewell);
        let mut peers = self.peers.lock();
        peers.remove(&id);
        self.stats
            .connected_peers
            .store(peers.len() as u64, Ordering::Relaxed);
        if peers.is_empty() {
            self.idle.notify_waiters();
        }
    }
}
