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
//! Resumption (issue 27) lives here too, because it is about which socket a
//! peer id currently has: a joined `/ws` peer whose socket is lost is
//! *parked* (its room-mates see nothing; what is addressed to it goes into
//! a bounded [`resume::Buffer`]) until a socket presents its token or
//! `resume_secs` pass, when it leaves its room as if it had just gone.
//! The room backend never learns of the gap, so this works with either
//! backend for a peer that comes back to the same node.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::Notify;

use crate::counter::inc;

use super::protocol::ServerMessage;
use super::resume::{self, Buffer, Secret};
use super::rooms::Delivery;
use super::{PeerId, RoomName, Signaling};

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
    fn fire(&self) -> bool {
        let first = !self.fired.swap(true, Ordering::Relaxed);
        if first {
            self.notify.notify_one();
        }
        first
    }
}

/// A joined `/ws` peer's claim to its session: the secret of its current
/// resume token and its room.
struct Session {
    secret: Secret,
    room: RoomName,
}

/// A peer whose socket is gone, waiting for a resume.
struct Parked {
    /// Which parking this is, so a late timer of an earlier one is void.
    serial: u64,
    buffer: Buffer,
}

/// This node's peers: open connections, parked ones, and the sessions
/// that may be resumed. One lock, so a resume and a delivery never
/// interleave (the buffered messages go out before anything newer).
#[derive(Default)]
pub(super) struct Table {
    live: HashMap<PeerId, PeerHandle>,
    parked: HashMap<PeerId, Parked>,
    sessions: HashMap<PeerId, Session>,
    serial: u64,
}

/// Outgoing queues of every open connection, joined or not.
#[derive(Default)]
pub(super) struct Peers(Mutex<Table>);

impl Peers {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().live.is_empty()
    }
}

/// Why a `resume` took over nothing. One answer for every cause, so a
/// guesser cannot tell a wrong secret from an unknown peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no session to resume with this token; join again")]
pub(super) struct ResumeRefused;

/// What a resumed socket becomes: the session's id and room.
pub(super) struct Resumed {
    pub(super) id: PeerId,
    pub(super) ttl: std::time::Duration,
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
            table.sessions.remove(&id);
        }
        self.farewell(id);
        let mut table = self.peers.lock();
        table.live.remove(&id);
        self.count_connected(&table);
        if table.live.is_empty() {
            self.idle.notify_waiters();
        }
    }

    /// The connection `kick` identifies was lost without a goodbye. A
    /// joined `/ws` peer is parked for `resume_window`; anyone else leaves
    /// at once, as with [`Self::unregister`].
    pub(super) fn lose(self: &Arc<Self>, id: PeerId, kick: &Arc<Kick>) {
        let cfg = self.config();
        let (window, limit) = (cfg.resume_window, cfg.resume_buffer_bytes);
        let runtime = tokio::runtime::Handle::try_current();
        let serial = {
            let mut table = self.peers.lock();
            let owner = table
                .live
                .get(&id)
                .is_some_and(|h| Arc::ptr_eq(&h.kick, kick));
            if !owner {
                return;
            }
            let parkable = !window.is_zero() && runtime.is_ok() && table.sessions.contains_key(&id);
            if parkable {
                table.live.remove(&id);
                table.serial += 1;
                let serial = table.serial;
                let buffer = Buffer::new(limit);
                table.parked.insert(id, Parked { serial, buffer });
                self.count_connected(&table);
                self.count_parked(&table);
                if table.live.is_empty() {
                    self.idle.notify_waiters();
                }
                Some(serial)
            } else {
                None
            }
        };
        let (Some(serial), Ok(runtime)) = (serial, runtime) else {
            return self.unregister(id, kick);
        };
        tracing::debug!(peer = %id, "signaling peer lost; kept for a resume");
        let sig = self.clone();
        let stop = self.stop.clone();
        runtime.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(window) => {}
                () = stop.cancelled() => {}
            }
            sig.expire(id, serial);
        });
    }

    /// The window of parking `serial` has passed: unless the peer resumed
    /// (or was parked again since), its session ends.
    fn expire(&self, id: PeerId, serial: u64) {
        {
            let mut table = self.peers.lock();
            if table.parked.get(&id).is_none_or(|p| p.serial != serial) {
                return;
            }
            table.parked.remove(&id);
            table.sessions.remove(&id);
            self.count_parked(&table);
        }
        inc(&self.stats.resume_expired_total);
        tracing::debug!(peer = %id, "a lost signaling peer did not resume in time");
        self.farewell(id);
    }

    /// `id` leaves its room; its room-mates get `peer-left`.
    fn farewell(&self, id: PeerId) {
        let farewell = self.backend.disconnect(id);
        self.count_rooms();
        self.deliver(farewell);
    }

    /// A resume token for `peer`, just joined `room`, put into its
    /// `joined` among `out`; no token when resumption is off.
    pub(super) fn grant_resume(&self, peer: PeerId, out: &mut [Delivery]) {
        if self.config().resume_window.is_zero() {
            return;
        }
        for d in out.iter_mut() {
            if let ServerMessage::Joined {
                room, id, resume, ..
            } = &mut d.msg
            {
                if *id == peer {
                    let secret = Secret::random();
                    *resume = Some(secret.token_for(peer));
                    let room = room.clone();
                    self.peers
                        .lock()
                        .sessions
                        .insert(peer, Session { secret, room });
                }
            }
        }
    }

    /// `peer` left its room: its token resumes nothing any more.
    pub(super) fn revoke_resume(&self, peer: PeerId) {
        self.peers.lock().sessions.remove(&peer);
    }

    /// The connection `conn` (identified by `kick`) takes over the session
    /// `token` names: it gets `resumed` with fresh ICE servers and a fresh
    /// token, then what was buffered, and is known by the session's id
    /// from then on. A socket still holding the session is closed.
    pub(super) fn resume(
        &self,
        conn: PeerId,
        kick: &Arc<Kick>,
        token: &str,
        host: Option<&str>,
        user: Option<&str>,
    ) -> Result<Resumed, ResumeRefused> {
        let (id, claimed) = resume::parse_token(token).ok_or(ResumeRefused)?;
        let valid = |table: &Table| {
            table
                .sessions
                .get(&id)
                .is_some_and(|s| s.secret.matches(&claimed))
        };
        if !valid(&self.peers.lock()) {
            return Err(ResumeRefused);
        }
        // Outside the lock, like every call to the provider.
        let (ice_servers, ttl) = (self.ice)(host, user);
        let mut table = self.peers.lock();
        // Checked again: the window may have closed, or another socket
        // resumed, while the lock was released.
        if id == conn || !valid(&table) {
            return Err(ResumeRefused);
        }
        let is_me = |h: &PeerHandle| Arc::ptr_eq(&h.kick, kick);
        if !table.live.get(&conn).is_some_and(is_me) {
            return Err(ResumeRefused);
        }
        let missed = match table.parked.remove(&id) {
            Some(parked) => parked.buffer.into_messages(),
            None => {
                // Its old socket is open as far as we know (the loss is
                // not noticed yet): the client says otherwise.
                if let Some(old) = table.live.remove(&id) {
                    old.kick.fire();
                }
                VecDeque::new()
            }
        };
        let secret = Secret::random();
        let token = secret.token_for(id);
        let Some(session) = table.sessions.get_mut(&id) else {
            return Err(ResumeRefused);
        };
        session.secret = secret;
        let resumed = ServerMessage::Resumed {
            room: session.room.clone(),
            id,
            ice_servers,
            ttl: ttl.as_secs(),
            resume: token,
        };
        let Some(handle) = table.live.remove(&conn) else {
            return Err(ResumeRefused);
        };
        // Queued under the lock, before the handle is reachable under the
        // session's id: nothing newer can overtake the missed messages.
        if let Ok(text) = serde_json::to_string(&resumed) {
            self.push(&handle.tx, &handle.kick, Outgoing::Text(text.into()));
        }
        if !missed.is_empty() {
            self.push(&handle.tx, &handle.kick, Outgoing::Replay(missed));
        }
        table.live.insert(id, handle);
        self.count_connected(&table);
        self.count_parked(&table);
        inc(&self.stats.resumes_total);
        Ok(Resumed { id, ttl })
    }

    fn count_connected(&self, table: &Table) {
        self.stats
            .connected_peers
            .store(table.live.len() as u64, Ordering::Relaxed);
    }

    fn count_parked(&self, table: &Table) {
        self.stats
            .parked_peers
            .store(table.parked.len() as u64, Ordering::Relaxed);
    }
}
