//! The room registry: which peer is in which room, as plain data.
//!
//! No sockets, tasks or clocks live here. Each operation takes the acting
//! peer and returns [`Delivery`]s — who must receive which message — for the
//! shell (`ws.rs`) to send. Refusals come back as [`RoomError`], which maps
//! to exactly one reply in [`RoomError::reply`].
//!
//! Invariants: a peer is in at most one room; a room in the map has at least
//! one member (empty rooms are freed at once, so room names never leak);
//! members are kept in join order, which is the order `joined.peers` lists.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::ids::{PeerId, RoomName};
use super::protocol::{Data, ErrorCode, ServerMessage};

/// One message and the peers that must receive it. The shell serializes the
/// message once however many recipients there are.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub to: Vec<PeerId>,
    pub msg: ServerMessage,
}

impl Delivery {
    fn one(to: PeerId, msg: ServerMessage) -> Self {
        Self { to: vec![to], msg }
    }
}

/// The ICE servers handed to a joining peer, fetched by the caller so the
/// registry never calls out while its lock is held.
#[derive(Debug, Clone, PartialEq)]
pub struct IceGrant {
    pub servers: Value,
    pub ttl: Duration,
}

/// A refused registry operation. The peer's state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("already in room {0}; send leave first")]
    AlreadyJoined(RoomName),
    #[error("room {0} is full")]
    Full(RoomName),
    #[error("the server is draining and accepts no new joins; try again shortly")]
    Draining,
    #[error("join a room first")]
    NotJoined,
    #[error("no such peer in your room")]
    UnknownPeer,
    #[error("your access token is for another room")]
    ForbiddenRoom,
    #[error("too many joins from your address; try again shortly")]
    RateLimited,
    #[error("the server holds as many rooms as it may; try again later")]
    TooManyRooms,
    #[error("the room service is unavailable; try again shortly")]
    BackendUnavailable,
}

impl RoomError {
    /// The message that answers the refused request: `full` has its own
    /// message type, everything else is an `error` with a stable code.
    pub fn reply(&self) -> ServerMessage {
        let code = match self {
            Self::Full(room) => return ServerMessage::Full { room: room.clone() },
            Self::AlreadyJoined(_) => ErrorCode::AlreadyJoined,
            Self::Draining => ErrorCode::Draining,
            Self::NotJoined => ErrorCode::NotJoined,
            Self::UnknownPeer => ErrorCode::UnknownPeer,
            Self::ForbiddenRoom => ErrorCode::ForbiddenRoom,
            Self::RateLimited => ErrorCode::RateLimited,
            Self::TooManyRooms => ErrorCode::TooManyRooms,
            Self::BackendUnavailable => ErrorCode::BackendUnavailable,
        };
        ServerMessage::error(code, self.to_string())
    }
}

/// The registry. See the module docs for its invariants.
#[derive(Debug)]
pub struct Rooms {
    capacity: usize,
    /// Rooms in all; a join that would open one more is refused.
    max_rooms: usize,
    rooms: HashMap<RoomName, Vec<PeerId>>,
    member_of: HashMap<PeerId, RoomName>,
}

impl Rooms {
    /// `capacity` is the most peers one room holds (2 for 1:1 calls).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            max_rooms: usize::MAX,
            rooms: HashMap::new(),
            member_of: HashMap::new(),
        }
    }

    /// Applies to later joins; rooms already above it keep their members.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// Applies to later joins; rooms already open stay.
    pub fn set_max_rooms(&mut self, max_rooms: usize) {
        self.max_rooms = max_rooms;
    }

    /// Puts `peer` into `room`. On success the peer gets `joined` (listing
    /// the members before it) and each of those gets `peer-joined`. While
    /// the server drains, joins are refused; peers already in rooms stay
    /// and may keep signaling so running calls finish their negotiation.
    pub fn join(
        &mut self,
        peer: PeerId,
        room: RoomName,
        grant: IceGrant,
        draining: bool,
    ) -> Result<Vec<Delivery>, RoomError> {
        if let Some(current) = self.member_of.get(&peer) {
            return Err(RoomError::AlreadyJoined(current.clone()));
        }
        if draining {
            return Err(RoomError::Draining);
        }
        let members = self.rooms.get(&room).map(Vec::as_slice).unwrap_or_default();
        if members.len() >= self.capacity {
            return Err(RoomError::Full(room));
        }
        if members.is_empty() && self.rooms.len() >= self.max_rooms {
            return Err(RoomError::TooManyRooms);
        }
        let before = members.to_vec();
        self.rooms.entry(room.clone()).or_default().push(peer);
        self.member_of.insert(peer, room.clone());

        let joined = ServerMessage::Joined {
            room,
            id: peer,
            peers: before.clone(),
            ice_servers: grant.servers,
            ttl: grant.ttl.as_secs(),
            resume: None,
        };
        let mut out = vec![Delivery::one(peer, joined)];
        if !before.is_empty() {
            out.push(Delivery {
                to: before,
                msg: ServerMessage::PeerJoined { id: peer },
            });
        }
        Ok(out)
    }

    /// Puts `peer` into `room` without a word to anyone: it was a member
    /// all along, on another node (a resumed session moving here). No
    /// capacity check, for the same reason.
    pub fn adopt(&mut self, peer: PeerId, room: RoomName) {
        if self.member_of.contains_key(&peer) {
            return;
        }
        self.rooms.entry(room.clone()).or_default().push(peer);
        self.member_of.insert(peer, room);
    }

    /// Takes `peer` out of its room; the remaining members get `peer-left`.
    /// The leaving peer itself gets no message.
    pub fn leave(&mut self, peer: PeerId) -> Result<Vec<Delivery>, RoomError> {
        let room = self.member_of.remove(&peer).ok_or(RoomError::NotJoined)?;
        let Some(members) = self.rooms.get_mut(&room) else {
            return Ok(Vec::new());
        };
        members.retain(|m| *m != peer);
        if members.is_empty() {
            self.rooms.remove(&room);
            return Ok(Vec::new());
        }
        Ok(vec![Delivery {
            to: members.clone(),
            msg: ServerMessage::PeerLeft { id: peer },
        }])
    }

    /// Like [`Self::leave`] but for a peer that is going away: not being in
    /// a room is not an error then.
    pub fn disconnect(&mut self, peer: PeerId) -> Vec<Delivery> {
        self.leave(peer).unwrap_or_default()
    }

    /// Addresses `data` from `from` to `to`. Only peers of the same room can
    /// be reached; a peer in another room looks exactly like one that does
    /// not exist, so ids leak nothing about other rooms.
    pub fn route(&self, from: PeerId, to: PeerId, data: Data) -> Result<Delivery, RoomError> {
        let room = self.member_of.get(&from).ok_or(RoomError::NotJoined)?;
        if to == from || self.member_of.get(&to) != Some(room) {
            return Err(RoomError::UnknownPeer);
        }
        Ok(Delivery::one(to, ServerMessage::Signal { from, data }))
    }

    /// Addresses `data` from `from` to every other member of its room: the
    /// socket.io tutorial's `message`, which names no recipient. A member
    /// alone in its room reaches nobody, which is not an error.
    pub fn broadcast(&self, from: PeerId, data: Data) -> Result<Delivery, RoomError> {
        let room = self.member_of.get(&from).ok_or(RoomError::NotJoined)?;
        let to = self
            .members(room)
            .iter()
            .copied()
            .filter(|m| *m != from)
            .collect();
        Ok(Delivery {
            to,
            msg: ServerMessage::Signal { from, data },
        })
    }

    pub fn room_of(&self, peer: PeerId) -> Option<&RoomName> {
        self.member_of.get(&peer)
    }

    /// Members of `room` in join order (empty if the room does not exist).
    pub fn members(&self, room: &RoomName) -> &[PeerId] {
        self.rooms.get(room).map(Vec::as_slice).unwrap_or_default()
    }

    /// Every room and its members.
    pub fn rooms(&self) -> impl Iterator<Item = (&RoomName, &[PeerId])> {
        self.rooms.iter().map(|(r, m)| (r, m.as_slice()))
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn peer_count(&self) -> usize {
        self.member_of.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: PeerId = PeerId::from_raw(0xa);
    const B: PeerId = PeerId::from_raw(0xb);
    const C: PeerId = PeerId::from_raw(0xc);
    const D: PeerId = PeerId::from_raw(0xd);

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    fn grant() -> IceGrant {
        IceGrant {
            servers: json!([{"urls": ["turn:example.org:3478"]}]),
            ttl: Duration::from_secs(600),
        }
    }

    fn joined(r: &str, id: PeerId, peers: &[PeerId]) -> Delivery {
        let msg = ServerMessage::Joined {
            room: room(r),
            id,
            peers: peers.to_vec(),
            ice_servers: grant().servers,
            ttl: 600,
            resume: None,
        };
        Delivery { to: vec![id], msg }
    }

    #[test]
    fn first_peer_gets_an_empty_room() {
        let mut rooms = Rooms::new(2);
        assert_eq!(
            rooms.join(A, room("r"), grant(), false),
            Ok(vec![joined("r", A, &[])])
        );
        assert_eq!(rooms.room_of(A), Some(&room("r")));
        assert_eq!((rooms.room_count(), rooms.peer_count()), (1, 1));
    }

    #[test]
    fn second_peer_learns_the_first_and_the_first_is_told() {
        let mut rooms = Rooms::new(2);
        rooms.join(A, room("r"), grant(), false).unwrap();
        let out = rooms.join(B, room("r"), grant(), false).unwrap();
        let announce = Delivery {
            to: vec![A],
            msg: ServerMessage::PeerJoined { id: B },
        };
        assert_eq!(out, vec![joined("r", B, &[A]), announce]);
    }

    #[test]
    fn a_full_room_refuses_and_changes_nothing() {
        let mut rooms = Rooms::new(2);
        rooms.join(A, room("r"), grant(), false).unwrap();
        rooms.join(B, room("r"), grant(), false).unwrap();
        let err = rooms.join(C, room("r"), grant(), false).unwrap_err();
        assert_eq!(err, RoomError::Full(room("r")));
        assert_eq!(err.reply(), ServerMessage::Full { room: room("r") });
        assert_eq!(rooms.room_of(C), None);
        assert_eq!(rooms.members(&room("r")), &[A, B]);
    }

    #[test]
    fn capacity_three_forms_a_mesh() {
        let mut rooms = Rooms::new(3);
        rooms.join(A, room("m"), grant(), false).unwrap();
        rooms.join(B, room("m"), grant(), false).unwrap();
        let out = rooms.join(C, room("m"), grant(), false).unwrap();
        let announce = Delivery {
            to: vec![A, B],
            msg: ServerMessage::PeerJoined { id: C },
        };
        assert_eq!(out, vec![joined("m", C, &[A, B]), announce]);
        assert_eq!(
            rooms.join(D, room("m"), grant(), false),
            Err(RoomError::Full(room("m")))
        );
        for (from, to) in [(A, B), (A, C), (B, C), (C, A)] {
            let d = rooms.route(from, to, json!(1).into()).unwrap();
            assert_eq!(
                d,
                Delivery {
                    to: vec![to],
                    msg: ServerMessage::Signal {
                        from,
                        data: json!(1).into()
                    }
                }
            );
        }
    }

    #[test]
    fn broadcasts_reach_the_other_members_of_the_room_only() {
        let mut rooms = Rooms::new(3);
        rooms.join(A, room("m"), grant(), false).unwrap();
        assert_eq!(
            rooms.broadcast(A, json!("alone").into()).map(|d| d.to),
            Ok(vec![])
        );
        rooms.join(B, room("m"), grant(), false).unwrap();
        rooms.join(C, room("m"), grant(), false).unwrap();
        rooms.join(D, room("other"), grant(), false).unwrap();
        assert_eq!(
            rooms.broadcast(B, json!("hi").into()),
            Ok(Delivery {
                to: vec![A, C],
                msg: ServerMessage::Signal {
                    from: B,
                    data: json!("hi").into()
                }
            })
        );
        assert_eq!(
            rooms.broadcast(D, json!(1).into()).map(|d| d.to),
            Ok(vec![])
        );
        rooms.leave(D).unwrap();
        assert_eq!(
            rooms.broadcast(D, json!(1).into()),
            Err(RoomError::NotJoined)
        );
    }

    #[test]
    fn signals_reach_only_the_same_room() {
        let mut rooms = Rooms::new(2);
        rooms.join(A, room("one"), grant(), false).unwrap();
        rooms.join(B, room("one"), grant(), false).unwrap();
        rooms.join(C, room("two"), grant(), false).unwrap();
        let data: Data = json!({"sdp": "offer"}).into();
        let d = rooms.route(A, B, data.clone()).unwrap();
        assert_eq!(
            d,
            Delivery {
                to: vec![B],
                msg: ServerMessage::Signal {
                    from: A,
                    data: data.clone()
                }
            }
        );
        assert_eq!(rooms.route(A, C, data.clone()), Err(RoomError::UnknownPeer));
        assert_eq!(rooms.route(C, A, data.clone()), Err(RoomError::UnknownPeer));
        assert_eq!(rooms.route(A, D, data.clone()), Err(RoomError::UnknownPeer));
        assert_eq!(rooms.route(A, A, data.clone()), Err(RoomError::UnknownPeer));
        assert_eq!(rooms.route(D, A, data), Err(RoomError::NotJoined));
    }

    #[test]
    fn leave_announces_and_frees_empty_rooms() {
        let mut rooms = Rooms::new(2);
        rooms.join(A, room("r"), grant(), false).unwrap();
        rooms.join(B, room("r"), grant(), false).unwrap();
        let out = rooms.leave(A).unwrap();
        assert_eq!(
            out,
            vec![Delivery {
                to: vec![B],
                msg: ServerMessage::PeerLeft { id: A }
            }]
        );
        assert_eq!(rooms.members(&room("r")), &[B]);
        assert_eq!(rooms.leave(B), Ok(vec![]));
        assert_eq!((rooms.room_count(), rooms.peer_count()), (0, 0));
        assert_eq!(rooms.leave(B), Err(RoomError::NotJoined));
        assert_eq!(rooms.disconnect(B), vec![]);
    }

    #[test]
    fn an_adopted_member_is_announced_to_nobody_and_reachable() {
        let mut rooms = Rooms::new(1);
        rooms.join(A, room("r"), grant(), false).unwrap();
        rooms.adopt(B, room("r"));
        rooms.adopt(B, room("other"));
        assert_eq!(rooms.members(&room("r")), &[A, B]);
        assert!(rooms.route(A, B, json!(1).into()).is_ok());
    }

    #[test]
    fn a_freed_room_can_be_filled_again() {
        let mut rooms = Rooms::new(2);
        for p in [A, B] {
            rooms.join(p, room("r"), grant(), false).unwrap();
        }
        rooms.disconnect(A);
        rooms.disconnect(B);
        for p in [C, D] {
            assert!(rooms.join(p, room("r"), grant(), false).is_ok());
        }
    }

    #[test]
    fn rejoin_after_leave_and_already_joined_before() {
        let mut rooms = Rooms::new(2);
        rooms.join(A, room("r"), grant(), false).unwrap();
        let err = rooms.join(A, room("other"), grant(), false).unwrap_err();
        assert_eq!(err, RoomError::AlreadyJoined(room("r")));
        assert!(matches!(
            err.reply(),
            ServerMessage::Error {
                code: ErrorCode::AlreadyJoined,
                ..
            }
        ));
        rooms.leave(A).unwrap();
        assert_eq!(
            rooms.join(A, room("other"), grant(), false),
            Ok(vec![joined("other", A, &[])])
        );
        assert_eq!(rooms.room_count(), 1);
    }

    #[test]
    fn draining_refuses_joins_but_keeps_rooms_working() {
        let mut rooms = Rooms::new(2);
        rooms.join(A, room("r"), grant(), false).unwrap();
        assert_eq!(
            rooms.join(B, room("r"), grant(), true),
            Err(RoomError::Draining)
        );
        assert!(matches!(
            RoomError::Draining.reply(),
            ServerMessage::Error {
                code: ErrorCode::Draining,
                ..
            }
        ));
        assert_eq!(rooms.leave(A), Ok(vec![]));
        assert!(rooms.join(B, room("r"), grant(), false).is_ok());
    }

    #[test]
    fn a_new_room_past_the_maximum_is_refused_existing_ones_fill() {
        let mut rooms = Rooms::new(2);
        rooms.set_max_rooms(1);
        rooms.join(A, room("one"), grant(), false).unwrap();
        assert_eq!(
            rooms.join(B, room("two"), grant(), false),
            Err(RoomError::TooManyRooms)
        );
        assert!(rooms.join(B, room("one"), grant(), false).is_ok());
    }

    #[test]
    fn lowering_capacity_keeps_current_members() {
        let mut rooms = Rooms::new(3);
        for p in [A, B, C] {
            rooms.join(p, room("r"), grant(), false).unwrap();
        }
        rooms.set_capacity(2);
        assert_eq!(rooms.members(&room("r")).len(), 3);
        rooms.leave(C).unwrap();
        assert_eq!(
            rooms.join(C, room("r"), grant(), false),
            Err(RoomError::Full(room("r")))
        );
    }

    #[test]
    fn joined_reports_ttl_in_whole_seconds() {
        let mut rooms = Rooms::new(2);
        let grant = IceGrant {
            servers: json!([]),
            ttl: Duration::from_millis(1999),
        };
        let out = rooms.join(A, room("r"), grant, false).unwrap();
        assert!(matches!(
            out.first(),
            Some(Delivery {
                msg: ServerMessage::Joined { ttl: 1, .. },
                ..
            })
        ));
    }
}
