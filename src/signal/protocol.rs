//! The signaling wire protocol: JSON text messages with a `type` field.
//!
//! Client → server: `join`, `signal`, `leave`, `resume`. Server → client:
//! `joined`, `resumed`, `peer-joined`, `peer-left`, `full`, `signal`,
//! `ice-servers`, `error`.
//! Every message is built and read through serde; nothing here assembles
//! JSON by hand.
//!
//! Parsing is two-step on purpose: serde alone reports "missing field",
//! "unknown variant" and "invalid type" as one opaque error, but clients need
//! a stable code to act on. So [`parse_client`] first looks at the message as
//! a generic JSON object (to tell bad JSON, an unknown type and a missing
//! field apart) and only then lets serde build the typed [`ClientMessage`].
//! Fields we do not know are ignored, so clients may send extensions.
//!
//! `signal`, nearly every message, has a fast path: one typed pass that
//! keeps `data` as the JSON text the sender wrote ([`Data`]), checked but
//! never built into a tree, and relayed as that text. Anything it cannot
//! take (another type, a field missing or of the wrong type, an escaped
//! name) goes the two-step way, so errors are classified as before.

use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::ids::{PeerId, RoomName};

/// A message from a client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ClientMessage {
    /// Enter `room`; answered by `joined`, `full` or an error.
    Join { room: RoomName },
    /// Relay `data` (any JSON) to peer `to` in the sender's room.
    Signal { to: PeerId, data: Data },
    /// Leave the current room; the connection stays open.
    Leave,
    /// Take over the session of a lost socket (`resume.rs`); only as a
    /// socket's first message. Answered by `resumed` or `resume-refused`.
    Resume { token: String },
}

/// A message to a client. Deserialize too: the Redis backend carries them
/// between nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServerMessage {
    /// You are in `room` as `id`; `peers` were there before you.
    Joined {
        room: RoomName,
        id: PeerId,
        peers: Vec<PeerId>,
        #[serde(rename = "iceServers")]
        ice_servers: Value,
        /// Seconds the credentials in `ice_servers` stay valid.
        ttl: u64,
        /// The token that resumes this session from another socket
        /// (`/ws` peers only, while `signaling.resume_secs` is not 0).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<String>,
    },
    /// A lost session taken over: the same `id` in the same `room`, fresh
    /// credentials and the next resume token. The messages addressed to
    /// the peer meanwhile follow, in order.
    Resumed {
        room: RoomName,
        id: PeerId,
        #[serde(rename = "iceServers")]
        ice_servers: Value,
        ttl: u64,
        resume: String,
    },
    PeerJoined {
        id: PeerId,
    },
    PeerLeft {
        id: PeerId,
    },
    /// The room is at capacity; the client is not in any room.
    Full {
        room: RoomName,
    },
    Signal {
        from: PeerId,
        data: Data,
    },
    /// Fresh credentials, sent before the previous ones expire.
    IceServers {
        #[serde(rename = "iceServers")]
        ice_servers: Value,
        ttl: u64,
    },
    /// A refused request. Connection and room membership are unaffected.
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl ServerMessage {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
        }
    }
}

/// A signal's `data`: any JSON value, held as its (valid, compact or
/// not) text, so relaying it writes the sender's bytes into the outgoing
/// message instead of building a tree and serialising it again (issue 27:
/// a `Value` per signal was most of signaling's allocations).
#[derive(Clone)]
pub struct Data(Box<RawValue>);

impl Data {
    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// As a tree, for the socket.io shell that hands values to its codec.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.as_str()).unwrap_or(Value::Null)
    }
}

impl From<Value> for Data {
    fn from(v: Value) -> Self {
        // Serialising a `Value` cannot fail (its map keys are strings).
        Data(serde_json::value::to_raw_value(&v).unwrap_or_else(|_| null()))
    }
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".into()).expect("null is JSON")
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The same JSON value, whatever the spacing or key order.
impl PartialEq for Data {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str() || self.to_value() == other.to_value()
    }
}

impl Serialize for Data {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// From any deserializer, through a `Value`: the Redis backend's internally
/// tagged messages are buffered by serde, where raw text is not available.
/// The fast path in [`parse_client`] takes the text directly.
impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        serde_json::value::to_raw_value(&v)
            .map(Data)
            .map_err(D::Error::custom)
    }
}

/// The stable `code` strings of `error` messages. Clients switch on these,
/// so a variant's spelling never changes once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The text frame is not JSON.
    BadJson,
    /// JSON of the wrong shape: not an object, or a field of the wrong type.
    BadMessage,
    /// `type` names no client message.
    UnknownType,
    /// A required field (or `type` itself) is absent.
    MissingField,
    /// `to` is not a peer of the sender's room.
    UnknownPeer,
    /// The message exceeds `max_message_bytes`.
    TooLarge,
    /// A binary frame; the protocol is JSON text only.
    BinaryFrame,
    /// The room name is not 1–64 characters of `[A-Za-z0-9_.-]`.
    InvalidRoom,
    /// `signal` or `leave` without being in a room.
    NotJoined,
    /// `join` while already in a room (send `leave` first).
    AlreadyJoined,
    /// The server is draining and accepts no new joins.
    Draining,
    /// The sender is over its message, byte or join budget; the message
    /// was dropped.
    RateLimited,
    /// The access token allows another room.
    ForbiddenRoom,
    /// The server holds as many rooms as it may (`signaling.max_rooms`).
    TooManyRooms,
    /// The shared room store (Redis) is unreachable: joins, and signals to
    /// peers on other nodes, are refused until it is back.
    BackendUnavailable,
    /// A `resume` that takes over nothing: an unknown, used, forged or
    /// expired token, or not the socket's first message.
    ResumeRefused,
}

impl ErrorCode {
    /// Every code, in index order; exporters iterate this.
    pub const ALL: [ErrorCode; 16] = [
        Self::BadJson,
        Self::BadMessage,
        Self::UnknownType,
        Self::MissingField,
        Self::UnknownPeer,
        Self::TooLarge,
        Self::BinaryFrame,
        Self::InvalidRoom,
        Self::NotJoined,
        Self::AlreadyJoined,
        Self::Draining,
        Self::RateLimited,
        Self::ForbiddenRoom,
        Self::TooManyRooms,
        Self::BackendUnavailable,
        Self::ResumeRefused,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// Position in [`Self::ALL`], for per-code counter arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad-json",
            Self::BadMessage => "bad-message",
            Self::UnknownType => "unknown-type",
            Self::MissingField => "missing-field",
            Self::UnknownPeer => "unknown-peer",
            Self::TooLarge => "too-large",
            Self::BinaryFrame => "binary-frame",
            Self::InvalidRoom => "invalid-room",
            Self::NotJoined => "not-joined",
            Self::AlreadyJoined => "already-joined",
            Self::Draining => "draining",
            Self::RateLimited => "rate-limited",
            Self::ForbiddenRoom => "forbidden-room",
            Self::TooManyRooms => "too-many-rooms",
            Self::BackendUnavailable => "backend-unavailable",
            Self::ResumeRefused => "resume-refused",
        }
    }
}

/// Why an inbound frame did not become a [`ClientMessage`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message is {size} bytes, the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("binary frames are not supported; send JSON text")]
    Binary,
    #[error("not valid JSON: {0}")]
    BadJson(String),
    #[error("{0}")]
    BadMessage(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("missing field {0:?}")]
    MissingField(&'static str),
    #[error("{0}")]
    InvalidRoom(#[from] super::ids::InvalidRoomName),
    #[error("no such peer in your room")]
    UnknownPeer,
}

impl ParseError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::Binary => ErrorCode::BinaryFrame,
            Self::BadJson(_) => ErrorCode::BadJson,
            Self::BadMessage(_) => ErrorCode::BadMessage,
            Self::UnknownType(_) => ErrorCode::UnknownType,
            Self::MissingField(_) => ErrorCode::MissingField,
            Self::InvalidRoom(_) => ErrorCode::InvalidRoom,
            Self::UnknownPeer => ErrorCode::UnknownPeer,
        }
    }

    /// The `error` message that answers this.
    pub fn reply(&self) -> ServerMessage {
        ServerMessage::error(self.code(), self.to_string())
    }
}

/// Parses one text frame, enforcing the size cap first so oversized input
/// is never handed to the JSON parser.
pub fn parse_client(text: &str, max_bytes: usize) -> Result<ClientMessage, ParseError> {
    if text.len() > max_bytes {
        return Err(ParseError::TooLarge {
            size: text.len(),
            max: max_bytes,
        });
    }
    if let Some(signal) = parse_signal(text) {
        return signal;
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| ParseError::BadJson(e.to_string()))?;
    let Value::Object(fields) = &value else {
        return Err(ParseError::BadMessage(
            "a message must be a JSON object".into(),
        ));
    };
    let kind = match fields.get("type") {
        None => return Err(ParseError::MissingField("type")),
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(ParseError::BadMessage("\"type\" must be a string".into())),
    };
    let required: &[&'static str] = match kind {
        "join" => &["room"],
        "signal" => &["to", "data"],
        "leave" => &[],
        "resume" => &["token"],
        other => return Err(ParseError::UnknownType(truncated(other))),
    };
    if let Some(missing) = required.iter().find(|f| !fields.contains_key(**f)) {
        return Err(ParseError::MissingField(missing));
    }
    check_names(kind, fields)?;
    // Everything serde can still object to is a field of the wrong JSON type.
    serde_json::from_value(value).map_err(|e| ParseError::BadMessage(e.to_string()))
}

/// A well-formed `signal` in one typed pass, `data` kept as text; `None`
/// for anything else, which the general path then parses and classifies.
fn parse_signal(text: &str) -> Option<Result<ClientMessage, ParseError>> {
    #[derive(Deserialize)]
    struct Signal<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        to: &'a str,
        data: Box<RawValue>,
    }
    let frame: Signal<'_> = serde_json::from_str(text).ok()?;
    if frame.kind != "signal" {
        return None;
    }
    Some(match frame.to.parse::<PeerId>() {
        Ok(to) => Ok(ClientMessage::Signal {
            to,
            data: Data(frame.data),
        }),
        Err(_) => Err(ParseError::UnknownPeer),
    })
}

/// The largest message the transport accepts for a cap of
/// `max_message_bytes`: a bit more, so that a message slightly over the cap
/// is read and answered with `too-large` (by [`parse_client`]) rather than
/// closing the connection. Both shells configure their transport with it.
pub fn transport_limit(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_add((max_message_bytes / 4).max(1024))
}

/// Names that are well-typed strings but not valid names get their own
/// codes: a bad room name is a user typo, a bad peer id is a peer that
/// cannot exist.
fn check_names(kind: &str, fields: &Map<String, Value>) -> Result<(), ParseError> {
    match (kind, fields.get("room"), fields.get("to")) {
        ("join", Some(Value::String(room)), _) => {
            RoomName::new(room.as_str())?;
        }
        ("signal", _, Some(Value::String(to))) => {
            to.parse::<PeerId>().map_err(|_| ParseError::UnknownPeer)?;
        }
        _ => {}
    }
    Ok(())
}

/// Echoing an unknown `type` helps debugging, but a peer must not be able to
/// make us send back (and log) an arbitrarily long string.
fn truncated(s: &str) -> String {
    const MAX: usize = 32;
    let mut short: String = s.chars().take(MAX).collect();
    if short.len() < s.len() {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MAX: usize = 1024;

    fn code_of(text: &str) -> ErrorCode {
        match parse_client(text, MAX) {
            Ok(msg) => panic!("{text} parsed as {msg:?}"),
            Err(e) => e.code(),
        }
    }

    #[test]
    fn parses_the_three_client_messages() {
        let room = RoomName::new("lobby").unwrap();
        assert_eq!(
            parse_client(r#"{"type":"join","room":"lobby"}"#, MAX),
            Ok(ClientMessage::Join { room })
        );
        let to: PeerId = "00000000000000ff".parse().unwrap();
        let signal = r#"{"type":"signal","to":"00000000000000ff","data":{"sdp":"v=0"}}"#;
        assert_eq!(
            parse_client(signal, MAX),
            Ok(ClientMessage::Signal {
                to,
                data: json!({"sdp":"v=0"}).into()
            })
        );
        assert_eq!(
            parse_client(r#"{"type":"leave"}"#, MAX),
            Ok(ClientMessage::Leave)
        );
        assert_eq!(
            parse_client(r#"{"type":"resume","token":"x"}"#, MAX),
            Ok(ClientMessage::Resume { token: "x".into() })
        );
        assert_eq!(code_of(r#"{"type":"resume"}"#), ErrorCode::MissingField);
    }

    #[test]
    fn data_may_be_any_json_and_unknown_fields_are_ignored() {
        for data in ["null", "1", "\"x\"", "[1,2]", "{}"] {
            let text =
                format!(r#"{{"type":"signal","to":"0000000000000001","data":{data},"v":2}}"#);
            assert!(parse_client(&text, MAX).is_ok(), "{text}");
        }
        assert_eq!(
            parse_client(r#"{"type":"leave","reason":"bye"}"#, MAX),
            Ok(ClientMessage::Leave)
        );
    }

    #[test]
    fn a_signal_relays_the_senders_data_text() {
        let text = r#"{"to":"00000000000000ff","data":{"n":1.50,"big":123456789012345678901234567890},"type":"signal"}"#;
        let Ok(ClientMessage::Signal { to, data }) = parse_client(text, MAX) else {
            panic!("{text} is a signal");
        };
        assert_eq!(
            data.as_str(),
            r#"{"n":1.50,"big":123456789012345678901234567890}"#
        );
        let out = serde_json::to_string(&ServerMessage::Signal { from: to, data }).unwrap();
        assert_eq!(
            out,
            r#"{"type":"signal","from":"00000000000000ff","data":{"n":1.50,"big":123456789012345678901234567890}}"#
        );
        // What the fast path does not take, the general path still does.
        let escaped = r#"{"type":"sig\u006eal","to":"00000000000000ff","data":[1]}"#;
        assert!(matches!(
            parse_client(escaped, MAX),
            Ok(ClientMessage::Signal { data, .. }) if data == Data::from(json!([1]))
        ));
        let twice = r#"{"type":"signal","to":"00000000000000ff","data":1,"data":2}"#;
        assert!(matches!(
            parse_client(twice, MAX),
            Ok(ClientMessage::Signal { data, .. }) if data == Data::from(json!(2))
        ));
    }

    #[test]
    fn classifies_malformed_input() {
        let cases = [
            ("not json", ErrorCode::BadJson),
            ("{\"type\":\"join\"", ErrorCode::BadJson),
            ("[1,2]", ErrorCode::BadMessage),
            (r#"{"type":7}"#, ErrorCode::BadMessage),
            (r#"{"room":"a"}"#, ErrorCode::MissingField),
            (r#"{"type":"dance"}"#, ErrorCode::UnknownType),
            (r#"{"type":"JOIN","room":"a"}"#, ErrorCode::UnknownType),
            (r#"{"type":"join"}"#, ErrorCode::MissingField),
            (
                r#"{"type":"signal","to":"0000000000000001"}"#,
                ErrorCode::MissingField,
            ),
            (r#"{"type":"signal","data":{}}"#, ErrorCode::MissingField),
            (r#"{"type":"join","room":5}"#, ErrorCode::BadMessage),
            (
                r#"{"type":"signal","to":1,"data":{}}"#,
                ErrorCode::BadMessage,
            ),
            (
                r#"{"type":"join","room":"no spaces"}"#,
                ErrorCode::InvalidRoom,
            ),
            (r#"{"type":"join","room":""}"#, ErrorCode::InvalidRoom),
            (
                r#"{"type":"signal","to":"alice","data":{}}"#,
                ErrorCode::UnknownPeer,
            ),
        ];
        for (text, code) in cases {
            assert_eq!(code_of(text), code, "{text}");
        }
    }

    #[test]
    fn enforces_the_size_cap_before_parsing() {
        let big = format!(r#"{{"type":"leave","pad":"{}"}}"#, "x".repeat(MAX));
        assert_eq!(
            parse_client(&big, MAX),
            Err(ParseError::TooLarge {
                size: big.len(),
                max: MAX
            })
        );
        assert_eq!(code_of(&"{".repeat(MAX + 1)), ErrorCode::TooLarge);
    }

    #[test]
    fn transport_limit_leaves_room_for_a_polite_refusal() {
        assert_eq!(transport_limit(64 * 1024), 80 * 1024);
        assert_eq!(transport_limit(100), 1124);
        assert_eq!(transport_limit(usize::MAX), usize::MAX);
    }

    #[test]
    fn unknown_type_is_echoed_truncated() {
        let long = "ü".repeat(100);
        let err = parse_client(&format!(r#"{{"type":"{long}"}}"#), MAX).unwrap_err();
        assert!(
            matches!(&err, ParseError::UnknownType(t) if t.chars().count() == 33),
            "{err:?}"
        );
    }

    #[test]
    fn server_messages_have_the_documented_shape() {
        let id: PeerId = "000000000000000a".parse().unwrap();
        let room = RoomName::new("r").unwrap();
        let joined = ServerMessage::Joined {
            room: room.clone(),
            id,
            peers: vec![],
            ice_servers: json!([{"urls": ["stun:x"]}]),
            ttl: 60,
            resume: None,
        };
        let cases = [
            (
                joined,
                json!({"type":"joined","room":"r","id":"000000000000000a","peers":[],"iceServers":[{"urls":["stun:x"]}],"ttl":60}),
            ),
            (
                ServerMessage::Resumed {
                    room: room.clone(),
                    id,
                    ice_servers: json!([]),
                    ttl: 60,
                    resume: "t".into(),
                },
                json!({"type":"resumed","room":"r","id":"000000000000000a","iceServers":[],"ttl":60,"resume":"t"}),
            ),
            (
                ServerMessage::PeerJoined { id },
                json!({"type":"peer-joined","id":"000000000000000a"}),
            ),
            (
                ServerMessage::PeerLeft { id },
                json!({"type":"peer-left","id":"000000000000000a"}),
            ),
            (
                ServerMessage::Full { room },
                json!({"type":"full","room":"r"}),
            ),
            (
                ServerMessage::Signal {
                    from: id,
                    data: json!({"a":1}).into(),
                },
                json!({"type":"signal","from":"000000000000000a","data":{"a":1}}),
            ),
            (
                ServerMessage::IceServers {
                    ice_servers: json!([]),
                    ttl: 5,
                },
                json!({"type":"ice-servers","iceServers":[],"ttl":5}),
            ),
            (
                ServerMessage::error(ErrorCode::NotJoined, "join first"),
                json!({"type":"error","code":"not-joined","message":"join first"}),
            ),
        ];
        for (msg, want) in cases {
            assert_eq!(serde_json::to_value(&msg).unwrap(), want);
        }
    }

    #[test]
    fn error_codes_index_and_spell_consistently() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i);
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        }
    }
}
