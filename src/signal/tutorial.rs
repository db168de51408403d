//! The socket.io "create or join" tutorial's events, mapped onto the room
//! registry, as plain data.
//!
//! The tutorial page (and every page copied from it) speaks a handful of
//! socket.io events: it emits `create or join`(room) and `message`(any),
//! and listens for `created`, `join`, `joined`, `ready`, `full`, `log` and
//! `message`. Here those events become the registry's operations, and the
//! registry's [`ServerMessage`]s become events again, so a socket.io peer
//! and a `/ws` peer meet in one room. `socketio.rs` is the shell that moves
//! them; nothing here touches a socket.
//!
//! Inbound events are parsed from the raw socket.io packet text
//! (`["event", arg, …]`) so the size cap is checked before any JSON parser
//! runs, exactly as on `/ws`, and refusals carry the same error codes.

use serde_json::Value;

use super::ids::RoomName;
use super::protocol::{ParseError, ServerMessage};

/// What a socket.io peer asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// `create or join`(room): join the room, or be told it is full.
    CreateOrJoin(RoomName),
    /// `message`(data): deliver `data` to the other members of the room.
    Message(Value),
}

/// Longest event name quoted back in an `unknown-type` error.
const QUOTED_NAME_MAX: usize = 64;

/// Parses one socket.io event packet's data, `["event", arg, …]`. Extra
/// arguments are ignored (socket.io clients may append an ack callback's
/// place holder); a missing or mistyped first argument is refused.
pub fn parse_event(packet: &str, max_bytes: usize) -> Result<Inbound, ParseError> {
    if packet.len() > max_bytes {
        return Err(ParseError::TooLarge {
            size: packet.len(),
            max: max_bytes,
        });
    }
    let value: Value =
        serde_json::from_str(packet).map_err(|e| ParseError::BadJson(e.to_string()))?;
    let Value::Array(mut items) = value else {
        return Err(ParseError::BadMessage("an event is a JSON array".into()));
    };
    if items.is_empty() {
        return Err(ParseError::MissingField("event"));
    }
    let Value::String(event) = items.remove(0) else {
        return Err(ParseError::BadMessage(
            "the event name must be a string".into(),
        ));
    };
    let arg = items.into_iter().next();
    match event.as_str() {
        "create or join" => match arg {
            Some(Value::String(room)) => Ok(Inbound::CreateOrJoin(RoomName::new(room)?)),
            Some(_) => Err(ParseError::BadMessage("the room must be a string".into())),
            None => Err(ParseError::MissingField("room")),
        },
        "message" => arg
            .map(Inbound::Message)
            .ok_or(ParseError::MissingField("message")),
        _ => Err(ParseError::UnknownType(
            event.chars().take(QUOTED_NAME_MAX).collect(),
        )),
    }
}

/// The arguments of one outgoing event. socket.io spreads them as separate
/// arguments of the listener (`(room, id) => …`).
#[derive(Debug, Clone, PartialEq)]
pub enum Args {
    None,
    One(Value),
    Two(Value, Value),
}

/// One event to emit to a socket.io peer.
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    pub event: &'static str,
    pub args: Args,
}

impl Emit {
    fn new(event: &'static str, args: Args) -> Self {
        Self { event, args }
    }
}

/// Renders registry messages as tutorial events for one connection. It
/// remembers the room the peer joined, because `join`(room) names it while
/// the registry's `peer-joined` does not.
#[derive(Debug, Default)]
pub struct Renderer {
    room: Option<RoomName>,
}

impl Renderer {
    /// The events that tell a socket.io peer what `msg` tells a `/ws` peer.
    ///
    /// The first member of a room gets `created`(room, id); a newcomer gets
    /// `joined`(room, id) then `ready`, and the member already there gets
    /// `join`(room) then `ready`, as the tutorial's server sent them. Both
    /// `created` and `joined` are followed by `ice-servers`(iceServers,
    /// ttl), which the tutorial page ignores and a page that wants TURN
    /// passes to `RTCPeerConnection`.
    pub fn render(&mut self, msg: ServerMessage) -> Vec<Emit> {
        match msg {
            ServerMessage::Joined {
                room,
                id,
                peers,
                ice_servers,
                ttl,
                ..
            } => {
                let first = peers.is_empty();
                let greeting = Args::Two(room.as_str().into(), id.to_string().into());
                self.room = Some(room);
                let mut out = vec![
                    Emit::new(if first { "created" } else { "joined" }, greeting),
                    Emit::new("ice-servers", Args::Two(ice_servers, ttl.into())),
                ];
                if !first {
                    out.push(Emit::new("ready", Args::None));
                }
                out
            }
            ServerMessage::PeerJoined { .. } => {
                let room = self.room.as_ref().map_or("", RoomName::as_str);
                vec![
                    Emit::new("join", Args::One(room.into())),
                    Emit::new("ready", Args::None),
                ]
            }
            ServerMessage::PeerLeft { id } => {
                vec![Emit::new("peer-left", Args::One(id.to_string().into()))]
            }
            ServerMessage::Full { room } => {
                vec![Emit::new("full", Args::One(room.as_str().into()))]
            }
            ServerMessage::Signal { data, .. } => {
                vec![Emit::new("message", Args::One(data.to_value()))]
            }
            ServerMessage::IceServers { ice_servers, ttl } => {
                vec![Emit::new("ice-servers", Args::Two(ice_servers, ttl.into()))]
            }
            // socket.io peers are never given a resume token (their 2.x
            // client cannot present one), so never resumed.
            ServerMessage::Resumed { .. } => Vec::new(),
            ServerMessage::Error { code, message } => vec![Emit::new(
                "error",
                Args::One(serde_json::json!({ "code": code, "message": message })),
            )],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::ids::PeerId;
    use crate::signal::protocol::ErrorCode;
    use serde_json::json;

    const A: PeerId = PeerId::from_raw(0xa);
    const B: PeerId = PeerId::from_raw(0xb);

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    fn joined(peers: Vec<PeerId>) -> ServerMessage {
        ServerMessage::Joined {
            room: room("foo"),
            id: B,
            peers,
            ice_servers: json!([{"urls": ["turn:t:3478"]}]),
            ttl: 600,
            resume: None,
        }
    }

    #[test]
    fn the_tutorials_events_parse() {
        assert_eq!(
            parse_event(r#"["create or join","foo"]"#, 100),
            Ok(Inbound::CreateOrJoin(room("foo")))
        );
        assert_eq!(
            parse_event(r#"["message","got user media"]"#, 100),
            Ok(Inbound::Message(json!("got user media")))
        );
        assert_eq!(
            parse_event(r#"["message",{"type":"offer","sdp":"v=0"},1]"#, 100),
            Ok(Inbound::Message(json!({"type":"offer","sdp":"v=0"})))
        );
    }

    #[test]
    fn bad_events_get_the_codes_ws_uses() {
        let code = |p: &str| parse_event(p, 64).unwrap_err().code();
        assert_eq!(code("[\"message\""), ErrorCode::BadJson);
        assert_eq!(code(r#"{"message":1}"#), ErrorCode::BadMessage);
        assert_eq!(code("[]"), ErrorCode::MissingField);
        assert_eq!(code("[7,\"foo\"]"), ErrorCode::BadMessage);
        assert_eq!(code(r#"["create or join"]"#), ErrorCode::MissingField);
        assert_eq!(code(r#"["create or join",42]"#), ErrorCode::BadMessage);
        assert_eq!(code(r#"["create or join",["foo"]]"#), ErrorCode::BadMessage);
        assert_eq!(
            code(r#"["create or join","no spaces"]"#),
            ErrorCode::InvalidRoom
        );
        assert_eq!(code(r#"["message"]"#), ErrorCode::MissingField);
        assert_eq!(code(r#"["bye","foo"]"#), ErrorCode::UnknownType);
        let big = format!(r#"["message","{}"]"#, "x".repeat(64));
        assert_eq!(code(&big), ErrorCode::TooLarge);
    }

    #[test]
    fn unknown_event_names_are_quoted_short() {
        let name = "e".repeat(500);
        let err = parse_event(&format!(r#"["{name}"]"#), 1000).unwrap_err();
        assert_eq!(err, ParseError::UnknownType("e".repeat(QUOTED_NAME_MAX)));
    }

    #[test]
    fn the_first_member_is_told_created_then_ice_servers() {
        let mut r = Renderer::default();
        let out = r.render(joined(vec![]));
        assert_eq!(
            out,
            vec![
                Emit::new("created", Args::Two(json!("foo"), json!(B.to_string()))),
                Emit::new(
                    "ice-servers",
                    Args::Two(json!([{"urls": ["turn:t:3478"]}]), json!(600))
                ),
            ]
        );
    }

    #[test]
    fn a_newcomer_is_told_joined_then_ready_and_the_member_join_then_ready() {
        let mut newcomer = Renderer::default();
        let events: Vec<_> = newcomer
            .render(joined(vec![A]))
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(events, ["joined", "ice-servers", "ready"]);

        let mut member = Renderer::default();
        member.render(ServerMessage::Joined {
            room: room("foo"),
            id: A,
            peers: vec![],
            ice_servers: json!([]),
            ttl: 0,
            resume: None,
        });
        assert_eq!(
            member.render(ServerMessage::PeerJoined { id: B }),
            vec![
                Emit::new("join", Args::One(json!("foo"))),
                Emit::new("ready", Args::None)
            ]
        );
    }

    #[test]
    fn signals_full_refreshes_and_errors_become_events() {
        let mut r = Renderer::default();
        assert_eq!(
            r.render(ServerMessage::Signal {
                from: A,
                data: json!({"type": "answer"}).into()
            }),
            vec![Emit::new("message", Args::One(json!({"type": "answer"})))]
        );
        assert_eq!(
            r.render(ServerMessage::Full { room: room("foo") }),
            vec![Emit::new("full", Args::One(json!("foo")))]
        );
        assert_eq!(
            r.render(ServerMessage::IceServers {
                ice_servers: json!([]),
                ttl: 60
            }),
            vec![Emit::new("ice-servers", Args::Two(json!([]), json!(60)))]
        );
        assert_eq!(
            r.render(ServerMessage::error(ErrorCode::NotJoined, "join first")),
            vec![Emit::new(
                "error",
                Args::One(json!({"code": "not-joined", "message": "join first"}))
            )]
        );
        assert_eq!(
            r.render(ServerMessage::PeerLeft { id: A }),
            vec![Emit::new("peer-left", Args::One(json!(A.to_string())))]
        );
    }
}
