//! Where the rooms live: the [`Backend`] trait, and [`Memory`], the
//! single-node backend (the pure registry of `rooms.rs` behind a lock).
//! The Redis backend, which lets several nodes share rooms, is in
//! `redis/`; both pass the same test suite (`backend_tests.rs`).
//!
//! A backend answers with the [`Delivery`]s for peers of this node; what
//! goes to peers of another node it sends itself, and it arrives there
//! through that node's [`Inbox`]. Operations that may need the network are
//! futures; [`Backend::disconnect`] is not, because a closing connection
//! cannot wait (its room-mates on this node hear `peer-left` at once, the
//! rest follows in the background).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::BoxFuture;

use super::ids::{PeerId, RoomName};
use super::protocol::Data;
use super::rooms::{Delivery, IceGrant, RoomError, Rooms};

/// Where a backend hands what arrived from other nodes for this node's
/// peers.
pub type Inbox = Arc<dyn Fn(Arrival) + Send + Sync>;

/// What another node sent this one.
#[derive(Debug)]
pub enum Arrival {
    /// Messages for this node's peers.
    Deliveries(Vec<Delivery>),
    /// A socket on node `to` resumed `peer`, a lost peer of this node:
    /// give it up and send `to` what was buffered for it
    /// ([`Backend::hand_over`]).
    HandOver { peer: PeerId, to: String },
    /// The node `peer` was lost on gave it up: what was buffered for it
    /// (JSON texts, oldest first).
    HandedOver { peer: PeerId, messages: Vec<String> },
}

/// A session another node holds, claimed for a socket on this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub room: RoomName,
}

/// The room operations of the signaling service. Each returns the
/// deliveries for peers of this node.
pub trait Backend: Send + Sync {
    /// Puts `peer` into `room` (see [`Rooms::join`]); atomic across nodes.
    fn join(
        &self,
        peer: PeerId,
        room: RoomName,
        grant: IceGrant,
        draining: bool,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>>;
    /// Takes `peer` out of its room; its room-mates get `peer-left`.
    fn leave(&self, peer: PeerId) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>>;
    /// [`Self::leave`] for a peer that is gone: never an error, never waits.
    fn disconnect(&self, peer: PeerId) -> Vec<Delivery>;
    /// `data` from `from` to `to`, a member of the same room.
    fn route(
        &self,
        from: PeerId,
        to: PeerId,
        data: Data,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>>;
    /// `data` from `from` to every other member of its room.
    fn broadcast(
        &self,
        from: PeerId,
        data: Data,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>>;
    /// Room capacity and the most rooms, for later joins.
    fn set_limits(&self, capacity: usize, max_rooms: usize);
    /// `peer` in `room` may be resumed with a token whose secret has
    /// `digest`, from any node (a single node needs nothing: its peer
    /// table knows).
    fn remember_session(&self, _peer: PeerId, _room: &RoomName, _digest: String) {}
    /// `peer`'s session ended: its token resumes nothing anywhere.
    fn forget_session(&self, _peer: PeerId) {}
    /// Claims `peer`'s session, held by another node, for a socket of this
    /// one, if `digest` is its secret's: `peer` becomes this node's member
    /// of its room, and the other node is asked to hand it over
    /// ([`Arrival::HandOver`]). `None`: no such session.
    fn claim_session(&self, _peer: PeerId, _digest: String) -> BoxFuture<'_, Option<Claim>> {
        Box::pin(std::future::ready(None))
    }
    /// Gives `peer` up to node `to` without announcing anything, and sends
    /// it `messages` ([`Arrival::HandedOver`]).
    fn hand_over(&self, _peer: PeerId, _to: String, _messages: Vec<String>) {}
    /// Rooms with a member on this node.
    fn room_count(&self) -> usize;
    /// Stops background work (at process stop).
    fn shutdown(&self) {}
}

/// A backend's health (kept in [`super::SignalStats`]; the backend writes
/// it). The memory backend is always up.
#[derive(Debug)]
pub struct BackendStats {
    /// 1 while the backend answers, 0 during an outage.
    pub up: AtomicU64,
    /// Times it became unavailable.
    pub outages_total: AtomicU64,
    /// Operations that failed for want of it.
    pub errors_total: AtomicU64,
}

impl Default for BackendStats {
    fn default() -> Self {
        Self {
            up: AtomicU64::new(1),
            outages_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
        }
    }
}

impl BackendStats {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed) == 1
    }
}

/// One node's rooms in its own memory: today's behaviour.
pub struct Memory {
    rooms: Mutex<Rooms>,
}

impl Memory {
    pub fn new(capacity: usize, max_rooms: usize) -> Self {
        let mut rooms = Rooms::new(capacity);
        rooms.set_max_rooms(max_rooms);
        Self {
            rooms: Mutex::new(rooms),
        }
    }

    /// One registry operation; the lock is never held across an await.
    fn with<R>(&self, op: impl FnOnce(&mut Rooms) -> R) -> R {
        // A panic elsewhere must not take signaling down with it; the
        // registry's operations leave it consistent at every return.
        op(&mut self.rooms.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

fn ready<T: Send + 'static>(v: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(v))
}

impl Backend for Memory {
    fn join(
        &self,
        peer: PeerId,
        room: RoomName,
        grant: IceGrant,
        draining: bool,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>> {
        ready(self.with(|r| r.join(peer, room, grant, draining)))
    }

    fn leave(&self, peer: PeerId) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>> {
        ready(self.with(|r| r.leave(peer)))
    }

    fn disconnect(&self, peer: PeerId) -> Vec<Delivery> {
        self.with(|r| r.disconnect(peer))
    }

    fn route(
        &self,
        from: PeerId,
        to: PeerId,
        data: Data,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>> {
        ready(self.with(|r| r.route(from, to, data)).map(|d| vec![d]))
    }

    fn broadcast(
        &self,
        from: PeerId,
        data: Data,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, RoomError>> {
        ready(self.with(|r| r.broadcast(from, data)).map(|d| vec![d]))
    }

    fn set_limits(&self, capacity: usize, max_rooms: usize) {
        self.with(|r| {
            r.set_capacity(capacity);
            r.set_max_rooms(max_rooms);
        });
    }

    fn room_count(&self) -> usize {
        self.with(|r| r.room_count())
    }
}
