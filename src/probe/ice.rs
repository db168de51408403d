//! What an `/api/ice-servers` answer asks the probe to test: its URLs
//! (RFC 7064 `stun:`, RFC 7065 `turn:`/`turns:`) turned into targets, and
//! its REST credential's expiry held against the local clock.
//!
//! Plain data and functions: the clock is an argument.

use serde::{Deserialize, Serialize};

/// How a target is reached, one row of the report each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A STUN Binding over UDP (`stun:`).
    Stun,
    /// TURN over UDP (`turn:…?transport=udp`).
    Udp,
    /// TURN over TCP (`turn:…?transport=tcp`).
    Tcp,
    /// TURN over TLS (`turns:…?transport=tcp`).
    Tls,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Stun => "stun",
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// The IP protocol the port is opened for in a firewall.
    pub fn ip_protocol(self) -> &'static str {
        match self {
            Transport::Stun | Transport::Udp => "udp",
            Transport::Tcp | Transport::Tls => "tcp",
        }
    }

    pub fn is_turn(self) -> bool {
        self != Transport::Stun
    }
}

/// One URL to test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub transport: Transport,
    pub url: String,
    /// Host name or IP literal, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

impl Target {
    /// `host:port`, with brackets around an IPv6 literal.
    pub fn server(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The long-term credential a TURN URL came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnCredential {
    pub username: String,
    pub password: String,
}

/// Everything to test, in the order browsers try it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub targets: Vec<Target>,
    pub credential: Option<TurnCredential>,
    /// The credential's lifetime as the API states it.
    pub ttl: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IceError {
    #[error("not an ice-servers answer: {0}")]
    Json(String),
    #[error("the answer lists no iceServers")]
    NoServers,
    #[error("the answer lists no TURN URL (only STUN): relayed calls cannot work")]
    NoTurn,
    #[error("`{url}`: {why}")]
    BadUrl { url: String, why: &'static str },
    #[error("`{0}` comes without a username and credential")]
    MissingCredential(String),
    #[error("the TURN URLs carry different credentials; the probe tests one")]
    SeveralCredentials,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "iceServers")]
    ice_servers: Vec<Server>,
    ttl: Option<u64>,
}

#[derive(Deserialize)]
struct Server {
    urls: Urls,
    username: Option<String>,
    credential: Option<String>,
}

/// `urls` is a string or a list of strings (WebRTC's RTCIceServer).
#[derive(Deserialize)]
#[serde(untagged)]
enum Urls {
    One(String),
    Many(Vec<String>),
}

/// Reads an `/api/ice-servers` body into a plan.
pub fn plan(body: &[u8]) -> Result<Plan, IceError> {
    let answer: Answer = serde_json::from_slice(body).map_err(|e| IceError::Json(e.to_string()))?;
    if answer.ice_servers.is_empty() {
        return Err(IceError::NoServers);
    }
    let mut targets = Vec::new();
    let mut credential: Option<TurnCredential> = None;
    for server in answer.ice_servers {
        let urls = match server.urls {
            Urls::One(u) => vec![u],
            Urls::Many(v) => v,
        };
        for url in urls {
            let target = parse_url(&url)?;
            if target.transport.is_turn() {
                let (Some(username), Some(password)) = (&server.username, &server.credential)
                else {
                    return Err(IceError::MissingCredential(url));
                };
                let this = TurnCredential {
                    username: username.clone(),
                    password: password.clone(),
                };
                match &credential {
                    Some(c) if *c != this => return Err(IceError::SeveralCredentials),
                    _ => credential = Some(this),
                }
            }
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
    }
    if credential.is_none() {
        return Err(IceError::NoTurn);
    }
    targets.sort_by_key(|t| t.transport);
    Ok(Plan {
        targets,
        credential,
        ttl: answer.ttl,
    })
}

/// Parses `stun:host[:port]`, `turn:host[:port][?transport=udp|tcp]` and
/// `turns:host[:port][?transport=tcp]`.
pub fn parse_url(url: &str) -> Result<Target, IceError> {
    let bad = |why| IceError::BadUrl {
        url: url.to_string(),
        why,
    };
    let (scheme, rest) = url.split_once(':').ok_or(bad("no scheme"))?;
    let (hostport, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let proto = match query {
        None => None,
        Some(q) => match q.strip_prefix("transport=") {
            Some("udp") => Some("udp"),
            Some("tcp") => Some("tcp"),
            _ => return Err(bad("the query must be transport=udp or transport=tcp")),
        },
    };
    let scheme = scheme.to_ascii_lowercase();
    let (transport, default_port) = match (scheme.as_str(), proto) {
        ("stun", None) => (Transport::Stun, 3478),
        ("stun", Some(_)) => return Err(bad("a stun: URL takes no transport")),
        ("turn", None | Some("udp")) => (Transport::Udp, 3478),
        ("turn", Some(_)) => (Transport::Tcp, 3478),
        ("turns", None | Some("tcp")) => (Transport::Tls, 5349),
        ("turns", Some(_)) => return Err(bad("TURN over DTLS is not supported")),
        ("stuns", _) => return Err(bad("stuns: is not supported")),
        _ => return Err(bad("the scheme must be stun:, turn: or turns:")),
    };
    let (host, port) = split_host_port(hostport).ok_or(bad("bad host or port"))?;
    Ok(Target {
        transport,
        url: url.to_string(),
        host: host.to_string(),
        port: port.unwrap_or(default_port),
    })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let ok_host = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    if !ok_host {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
    };
    Some((host, port))
}

/// The expiry of a TURN REST username (`EXPIRY` or `EXPIRY:user`).
pub fn rest_expiry(username: &str) -> Option<u64> {
    let ts = username.split_once(':').map_or(username, |(ts, _)| ts);
    if ts.is_empty() || ts.len() > 20 || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ts.parse().ok()
}

/// How far the server's clock may be from ours before the probe fails:
/// beyond it, credentials minted by one side expire early or late on the
/// other, and certificates look expired or not yet valid.
pub const MAX_SKEW_SECS: i64 = 60;

/// The credential's expiry against the local clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClockCheck {
    /// Unix time the credential stops working.
    pub expires_at: u64,
    /// Seconds from now (this machine's clock); negative when already past.
    pub expires_in_secs: i64,
    /// The server's clock minus ours, when the API states the credential's
    /// lifetime (the server minted it at `expires_at - ttl`).
    pub server_clock_skew_secs: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClockProblem {
    #[error("the credential expired {0} s ago by this machine's clock")]
    Expired(u64),
    #[error("the server's clock is {0} s off this machine's")]
    Skew(i64),
}

impl ClockCheck {
    /// None for a username that is not a REST one (a static user).
    pub fn new(username: &str, ttl: Option<u64>, now_unix: u64) -> Option<ClockCheck> {
        let expires_at = rest_expiry(username)?;
        let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let expires_in_secs = signed(expires_at).saturating_sub(signed(now_unix));
        let server_clock_skew_secs = ttl.map(|ttl| {
            signed(expires_at)
                .saturating_sub(signed(ttl))
                .saturating_sub(signed(now_unix))
        });
        Some(ClockCheck {
            expires_at,
            expires_in_secs,
            server_clock_skew_secs,
        })
    }

    pub fn problem(&self) -> Option<ClockProblem> {
        if self.expires_in_secs <= 0 {
            return Some(ClockProblem::Expired(self.expires_in_secs.unsigned_abs()));
        }
        match self.server_clock_skew_secs {
            Some(s) if s.abs() > MAX_SKEW_SECS => Some(ClockProblem::Skew(s)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_of_every_kind() {
        let t = parse_url("stun:turn.example.com:3478").unwrap();
        assert_eq!(
            (t.transport, t.host.as_str(), t.port),
            (Transport::Stun, "turn.example.com", 3478)
        );
        let t = parse_url("turn:h:1?transport=udp").unwrap();
        assert_eq!((t.transport, t.port), (Transport::Udp, 1));
        let t = parse_url("turn:h?transport=tcp").unwrap();
        assert_eq!((t.transport, t.port), (Transport::Tcp, 3478));
        let t = parse_url("turn:h").unwrap();
        assert_eq!(t.transport, Transport::Udp);
        let t = parse_url("turns:h:443?transport=tcp").unwrap();
        assert_eq!((t.transport, t.port), (Transport::Tls, 443));
        assert_eq!(parse_url("turns:h").unwrap().port, 5349);
        let t = parse_url("TURN:[::1]:3478?transport=udp").unwrap();
        assert_eq!((t.host.as_str(), t.server()), ("::1", "[::1]:3478".into()));
        assert_eq!(parse_url("stun:[2001:db8::1]").unwrap().port, 3478);
    }

    #[test]
    fn bad_urls_are_named() {
        for u in [
            "turn",
            "http://h",
            "turn:h:0",
            "turn:h:99999",
            "turn:h:x",
            "turn:?transport=udp",
            "turns:h?transport=udp",
            "turn:h?transport=sctp",
            "stun:h?transport=udp",
            "stuns:h",
            "turn:[::1",
            "turn:[::1]x",
            "turn:evil/host",
        ] {
            assert!(
                matches!(parse_url(u), Err(IceError::BadUrl { .. })),
                "{u} should be refused"
            );
        }
    }

    const TURNKEY: &str = r#"{"iceServers":[{"urls":["stun:localhost:3478"]},
        {"urls":["turn:localhost:3478?transport=udp","turn:localhost:3479?transport=tcp",
                 "turns:localhost:5349?transport=tcp"],
         "username":"1795732169:9c1f0e7a5b3d2c11","credential":"pw"}],"ttl":86400}"#;

    #[test]
    fn plan_of_a_turnkey_answer() {
        let p = plan(TURNKEY.as_bytes()).unwrap();
        let kinds: Vec<_> = p.targets.iter().map(|t| t.transport).collect();
        assert_eq!(
            kinds,
            [
                Transport::Stun,
                Transport::Udp,
                Transport::Tcp,
                Transport::Tls
            ]
        );
        assert_eq!(p.targets[2].port, 3479);
        let c = p.credential.unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("1795732169:9c1f0e7a5b3d2c11", "pw")
        );
        assert_eq!(p.ttl, Some(86400));
    }

    #[test]
    fn plan_refusals() {
        assert!(matches!(plan(b"<html>"), Err(IceError::Json(_))));
        assert_eq!(plan(br#"{"iceServers":[]}"#), Err(IceError::NoServers));
        assert_eq!(
            plan(br#"{"iceServers":[{"urls":"stun:h"}]}"#),
            Err(IceError::NoTurn)
        );
        assert_eq!(
            plan(br#"{"iceServers":[{"urls":"turn:h"}]}"#),
            Err(IceError::MissingCredential("turn:h".into()))
        );
        assert_eq!(
            plan(
                br#"{"iceServers":[{"urls":"turn:h","username":"a","credential":"1"},
                                   {"urls":"turns:h","username":"b","credential":"2"}]}"#
            ),
            Err(IceError::SeveralCredentials)
        );
    }

    #[test]
    fn rest_usernames() {
        assert_eq!(rest_expiry("1795732169:abc"), Some(1_795_732_169));
        assert_eq!(rest_expiry("1795732169"), Some(1_795_732_169));
        assert_eq!(rest_expiry("alice"), None);
        assert_eq!(rest_expiry(":x"), None);
        assert_eq!(rest_expiry("123456789012345678901:x"), None);
    }

    #[test]
    fn clock_checks() {
        let now = 1_000_000;
        let fresh = ClockCheck::new("1086400:x", Some(86_400), now).unwrap();
        assert_eq!(fresh.expires_in_secs, 86_400);
        assert_eq!(fresh.server_clock_skew_secs, Some(0));
        assert_eq!(fresh.problem(), None);
        // The server is 10 minutes ahead.
        let ahead = ClockCheck::new("1087000:x", Some(86_400), now).unwrap();
        assert_eq!(ahead.problem(), Some(ClockProblem::Skew(600)));
        let behind = ClockCheck::new("1086300:x", Some(86_400), now).unwrap();
        assert_eq!(behind.problem(), Some(ClockProblem::Skew(-100)));
        // Within the margin, and unknown without a ttl.
        let near = ClockCheck::new("1086430:x", Some(86_400), now).unwrap();
        assert_eq!(near.problem(), None);
        let no_ttl = ClockCheck::new("1000500:x", None, now).unwrap();
        assert_eq!(
            (no_ttl.server_clock_skew_secs, no_ttl.problem()),
            (None, None)
        );
        let expired = ClockCheck::new("999000:x", Some(60), now).unwrap();
        assert_eq!(expired.problem(), Some(ClockProblem::Expired(1000)));
        assert_eq!(ClockCheck::new("alice", Some(60), now), None);
    }
}
