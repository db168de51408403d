//! The two names the signaling protocol deals in: rooms and peers.
//!
//! Both are parsed once at the edge and are valid for as long as they exist,
//! so the registry and the shell never re-check a string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest room name accepted, in bytes (names are ASCII, so also characters).
pub const ROOM_NAME_MAX: usize = 64;

/// A room name: 1–64 characters of `[A-Za-z0-9_.-]`.
///
/// The alphabet is deliberately narrow: names end up in logs, metrics labels
/// and URLs (`/#room`), and a narrow alphabet needs no escaping anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoomName(String);

/// Why a string is not a [`RoomName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("room names are 1-64 characters of A-Z a-z 0-9 _ . -")]
pub struct InvalidRoomName;

impl RoomName {
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidRoomName> {
        let name = name.into();
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
        if name.is_empty() || name.len() > ROOM_NAME_MAX || !name.bytes().all(allowed) {
            return Err(InvalidRoomName);
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RoomName {
    type Error = InvalidRoomName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<RoomName> for String {
    fn from(r: RoomName) -> String {
        r.0
    }
}

impl FromStr for RoomName {
    type Err = InvalidRoomName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An opaque peer id, written on the wire as 16 lowercase hex digits.
///
/// Ids are random rather than sequential so that one peer cannot guess and
/// address peers of rooms it is not in (the registry refuses that anyway;
/// random ids just make the refusal uninformative).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeerId(u64);

/// Why a string is not a [`PeerId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer ids are 16 lowercase hex digits")]
pub struct InvalidPeerId;

impl PeerId {
    /// A fresh random id. Uniqueness among live peers is the caller's job
    /// (the shell retries on the astronomically rare collision).
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// For deterministic tests of the registry.
    #[cfg(test)]
    pub(crate) const fn from_raw(n: u64) -> Self {
        Self(n)
    }
}

impl FromStr for PeerId {
    type Err = InvalidPeerId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Exactly the form we print, so each peer has one spelling.
        let canonical = s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !canonical {
            return Err(InvalidPeerId);
        }
        u64::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| InvalidPeerId)
    }
}

impl TryFrom<String> for PeerId {
    type Error = InvalidPeerId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PeerId> for String {
    fn from(p: PeerId) -> String {
        p.to_string()
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_accept_the_documented_alphabet() {
        for ok in ["a", "Room_1", "my.room-2", &"x".repeat(ROOM_NAME_MAX)] {
            assert_eq!(RoomName::new(ok).map(|r| r.to_string()), Ok(ok.to_string()));
        }
    }

    #[test]
    fn room_names_reject_everything_else() {
        let too_long = "x".repeat(ROOM_NAME_MAX + 1);
        for bad in [
            "",
            "with space",
            "slash/",
            "ünï",
            "a\u{0}",
            "#hash",
            &too_long,
        ] {
            assert_eq!(RoomName::new(bad), Err(InvalidRoomName), "{bad:?}");
        }
    }

    #[test]
    fn peer_ids_round_trip_through_their_wire_form() {
        let id = PeerId::from_raw(0xdead_beef);
        assert_eq!(id.to_string(), "00000000deadbeef");
        assert_eq!("00000000deadbeef".parse(), Ok(id));
        let random = PeerId::random();
        assert_eq!(random.to_string().parse(), Ok(random));
    }

    #[test]
    fn peer_ids_have_one_spelling() {
        for bad in [
            "",
            "deadbeef",
            "00000000DEADBEEF",
            "+0000000deadbeef",
            "00000000deadbeeg",
            "000000000deadbeef",
        ] {
            assert_eq!(bad.parse::<PeerId>(), Err(InvalidPeerId), "{bad:?}");
        }
    }

    #[test]
    fn ids_serialize_as_strings() {
        let id = PeerId::from_raw(1);
        assert_eq!(
            serde_json::to_string(&id).ok().as_deref(),
            Some("\"0000000000000001\"")
        );
        let room = RoomName::new("r").ok();
        assert_eq!(
            room.and_then(|r| serde_json::to_string(&r).ok()).as_deref(),
            Some("\"r\"")
        );
    }
}
