//! The probe's TURN client as plain data (RFC 8489 long-term credentials,
//! RFC 8656 Allocate, CreatePermission, ChannelBind, Refresh): it encodes
//! one request at a time and reads the answers it is handed, re-signing
//! after a 401 challenge or a 438 stale nonce. No sockets, no clock: the
//! shell (`net.rs`) sends, retransmits and keeps the time.
//!
//! Also the framing of TURN over a byte stream (RFC 8656 §3.2): STUN
//! messages by their length field, ChannelData padded to 4 bytes.

use std::net::SocketAddr;
use std::time::Duration;

use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    Getter, Message, MessageType, Method, Setter, CLASS_ERROR_RESPONSE, CLASS_REQUEST,
    CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_BINDING, METHOD_CHANNEL_BIND,
    METHOD_CREATE_PERMISSION, METHOD_REFRESH,
};
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use turn::proto::channum::ChannelNumber;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::PROTO_UDP;

use super::ice::TurnCredential;
use crate::turn::wire;

/// The channel the probe binds to its own relayed address.
pub const PROBE_CHANNEL: u16 = 0x4000;

/// A request the probe makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Binding,
    Allocate,
    CreatePermission(SocketAddr),
    ChannelBind(u16, SocketAddr),
    /// Refresh with this lifetime; 0 deletes the allocation.
    Refresh(u32),
}

impl Request {
    pub fn name(self) -> &'static str {
        match self {
            Request::Binding => "Binding",
            Request::Allocate => "Allocate",
            Request::CreatePermission(_) => "CreatePermission",
            Request::ChannelBind(..) => "ChannelBind",
            Request::Refresh(_) => "Refresh",
        }
    }

    fn method(self) -> Method {
        match self {
            Request::Binding => METHOD_BINDING,
            Request::Allocate => METHOD_ALLOCATE,
            Request::CreatePermission(_) => METHOD_CREATE_PERMISSION,
            Request::ChannelBind(..) => METHOD_CHANNEL_BIND,
            Request::Refresh(_) => METHOD_REFRESH,
        }
    }

    fn attributes(self) -> Vec<Box<dyn Setter>> {
        let peer = |a: SocketAddr| PeerAddress {
            ip: a.ip(),
            port: a.port(),
        };
        match self {
            Request::Binding => Vec::new(),
            Request::Allocate => vec![Box::new(RequestedTransport {
                protocol: PROTO_UDP,
            })],
            Request::CreatePermission(p) => vec![Box::new(peer(p))],
            Request::ChannelBind(n, p) => vec![Box::new(ChannelNumber(n)), Box::new(peer(p))],
            Request::Refresh(secs) => {
                vec![Box::new(Lifetime(Duration::from_secs(u64::from(secs))))]
            }
        }
    }
}

/// A successful answer, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Binding {
        mapped: SocketAddr,
    },
    Allocated {
        relayed: SocketAddr,
        mapped: Option<SocketAddr>,
        lifetime: Duration,
    },
    Done,
}

/// What an incoming STUN message meant for the request in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Not an answer to it (another transaction, or an indication).
    Ignored,
    /// Challenged: send `Client::in_flight()` again, now signed.
    Resend,
    Done(Answer),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("{request} refused: {code} {reason}")]
    Rejected {
        request: &'static str,
        code: u16,
        reason: String,
        /// The request was signed with the credential: a 401 now means
        /// the credential itself was refused.
        authenticated: bool,
    },
    #[error("{request}: {what}")]
    Malformed {
        request: &'static str,
        what: &'static str,
    },
    #[error("{0} needs a credential and the API gave none")]
    NoCredential(&'static str),
    #[error("cannot encode {0}: {1}")]
    Encode(&'static str, String),
}

struct InFlight {
    request: Request,
    tid: TransactionId,
    raw: Vec<u8>,
    signed: bool,
    /// Re-signs left before a challenge loop counts as a refusal.
    resigns_left: u8,
}

/// One client's view of one TURN server: its credential, the realm and
/// nonce it was given, and the request in flight.
pub struct Client {
    credential: Option<TurnCredential>,
    realm: Option<String>,
    nonce: Option<String>,
    in_flight: Option<InFlight>,
}

impl Client {
    pub fn new(credential: Option<TurnCredential>) -> Client {
        Client {
            credential,
            realm: None,
            nonce: None,
            in_flight: None,
        }
    }

    /// Starts `request`; the bytes to send.
    pub fn start(&mut self, request: Request) -> Result<&[u8], ClientError> {
        let needs_auth = request != Request::Binding;
        if needs_auth && self.credential.is_none() {
            return Err(ClientError::NoCredential(request.name()));
        }
        let signed = needs_auth && self.nonce.is_some();
        let (raw, tid) = self.encode(request, signed)?;
        let f = self.in_flight.insert(InFlight {
            request,
            tid,
            raw,
            signed,
            resigns_left: 2,
        });
        Ok(&f.raw)
    }

    /// The bytes of the request in flight (to retransmit).
    pub fn in_flight(&self) -> Option<&[u8]> {
        self.in_flight.as_ref().map(|f| f.raw.as_slice())
    }

    fn encode(
        &self,
        request: Request,
        signed: bool,
    ) -> Result<(Vec<u8>, TransactionId), ClientError> {
        let tid = TransactionId::new();
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(tid),
            Box::new(MessageType::new(request.method(), CLASS_REQUEST)),
        ];
        setters.extend(request.attributes());
        if let (true, Some(c), Some(realm), Some(nonce)) =
            (signed, &self.credential, &self.realm, &self.nonce)
        {
            setters.push(Box::new(TextAttribute::new(
                ATTR_USERNAME,
                c.username.clone(),
            )));
            setters.push(Box::new(TextAttribute::new(ATTR_REALM, realm.clone())));
            setters.push(Box::new(TextAttribute::new(ATTR_NONCE, nonce.clone())));
            setters.push(Box::new(MessageIntegrity::new_long_term_integrity(
                c.username.clone(),
                realm.clone(),
                c.password.clone(),
            )));
        }
        setters.push(Box::new(FINGERPRINT));
        let mut m = Message::new();
        m.build(&setters)
            .map_err(|e| ClientError::Encode(request.name(), e.to_string()))?;
        Ok((m.raw, tid))
    }

    /// Reads a STUN message from the server.
    pub fn handle(&mut self, raw: &[u8]) -> Result<Progress, ClientError> {
        let Some(f) = &self.in_flight else {
            return Ok(Progress::Ignored);
        };
        let request = f.request;
        let mut m = Message::new();
        m.raw = raw.to_vec();
        if m.decode().is_err() || m.transaction_id != f.tid {
            return Ok(Progress::Ignored);
        }
        let malformed = |what| ClientError::Malformed {
            request: request.name(),
            what,
        };
        if m.typ.method != request.method() {
            return Err(malformed("the answer is for another method"));
        }
        if m.typ.class == CLASS_SUCCESS_RESPONSE {
            self.in_flight = None;
            return read_success(request, &m).map(Progress::Done);
        }
        if m.typ.class != CLASS_ERROR_RESPONSE {
            return Ok(Progress::Ignored);
        }
        let mut e = ErrorCodeAttribute::default();
        e.get_from(&m)
            .map_err(|_| malformed("an error answer without ERROR-CODE"))?;
        let code = e.code.0;
        let (signed, resigns_left) = (f.signed, f.resigns_left);
        // 401 to an unsigned request is the challenge; 438 a nonce to renew.
        let challenge = (code == 401 && !signed) || code == 438;
        if challenge && resigns_left > 0 && request != Request::Binding {
            let nonce = TextAttribute::get_from_as(&m, ATTR_NONCE)
                .map_err(|_| malformed("a challenge without NONCE"))?;
            if let Ok(realm) = TextAttribute::get_from_as(&m, ATTR_REALM) {
                self.realm = Some(realm.text);
            }
            if self.realm.is_none() {
                return Err(malformed("a challenge without REALM"));
            }
            self.nonce = Some(nonce.text);
            let (raw, tid) = self.encode(request, true)?;
            self.in_flight = Some(InFlight {
                request,
                tid,
                raw,
                signed: true,
                resigns_left: resigns_left - 1,
            });
            return Ok(Progress::Resend);
        }
        self.in_flight = None;
        Err(ClientError::Rejected {
            request: request.name(),
            code,
            reason: String::from_utf8_lossy(&e.reason).into_owned(),
            authenticated: signed,
        })
    }
}

fn read_success(request: Request, m: &Message) -> Result<Answer, ClientError> {
    let malformed = |what| ClientError::Malformed {
        request: request.name(),
        what,
    };
    let mapped = || {
        let mut x = XorMappedAddress::default();
        x.get_from(m).ok().map(|_| SocketAddr::new(x.ip, x.port))
    };
    match request {
        Request::Binding => Ok(Answer::Binding {
            mapped: mapped().ok_or(malformed("no XOR-MAPPED-ADDRESS"))?,
        }),
        Request::Allocate => {
            let mut r = RelayedAddress::default();
            r.get_from(m)
                .map_err(|_| malformed("no XOR-RELAYED-ADDRESS"))?;
            let mut l = Lifetime::default();
            let lifetime = l.get_from(m).map(|_| l.0).unwrap_or_default();
            Ok(Answer::Allocated {
                relayed: SocketAddr::new(r.ip, r.port),
                mapped: mapped(),
                lifetime,
            })
        }
        _ => Ok(Answer::Done),
    }
}

/// A ping through the relay: a marker, this probe's id and a sequence
/// number, so an echo is told from anything else on the channel.
pub fn ping_payload(probe_id: u64, seq: u32) -> [u8; 20] {
    let mut p = [0u8; 20];
    p[..8].copy_from_slice(b"tkprobe\0");
    p[8..16].copy_from_slice(&probe_id.to_be_bytes());
    p[16..].copy_from_slice(&seq.to_be_bytes());
    p
}

/// ChannelData carrying `data` on `channel`, padded for streams.
pub fn channel_data(channel: u16, data: &[u8], stream: bool) -> Vec<u8> {
    let mut out = vec![0u8; wire::CHANNEL_HEADER_LEN + data.len() + 3];
    let n = wire::write_channel_data(&mut out, channel, data, stream).unwrap_or(0);
    out.truncate(n);
    out
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Stun(Vec<u8>),
    Channel(u16, Vec<u8>),
}

/// A datagram from the server as a frame; None for anything else.
pub fn datagram_frame(b: &[u8]) -> Option<Frame> {
    match wire::classify(b) {
        wire::Kind::Stun => Some(Frame::Stun(b.to_vec())),
        wire::Kind::ChannelData => wire::parse_channel_data(b)
            .ok()
            .map(|(n, d)| Frame::Channel(n, d.to_vec())),
        wire::Kind::Other => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the server sent {0}")]
pub struct FramingError(#[from] pub wire::FrameError);

/// Splits a TURN byte stream into frames (RFC 8656 §3.2).
#[derive(Default)]
pub struct StreamFramer {
    buf: Vec<u8>,
}

impl StreamFramer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if the buffer holds one.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FramingError> {
        let Some(total) = wire::stream_frame_len(&self.buf)? else {
            return Ok(None);
        };
        let frame: Vec<u8> = self.buf.drain(..total).collect();
        Ok(datagram_frame(&frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use stun::error_code::ErrorCode;

    fn cred() -> TurnCredential {
        TurnCredential {
            username: "1795732169:probe".into(),
            password: "secret".into(),
        }
    }

    fn decode(raw: &[u8]) -> Message {
        let mut m = Message::new();
        m.raw = raw.to_vec();
        m.decode().unwrap();
        m
    }

    /// An answer to `req` with the given class and attributes.
    fn answer(
        req: &[u8],
        class: stun::message::MessageClass,
        attrs: Vec<Box<dyn Setter>>,
    ) -> Vec<u8> {
        let r = decode(req);
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(r.transaction_id),
            Box::new(MessageType::new(r.typ.method, class)),
        ];
        setters.extend(attrs);
        let mut m = Message::new();
        m.build(&setters).unwrap();
        m.raw
    }

    fn error(req: &[u8], code: u16, extra: Vec<Box<dyn Setter>>) -> Vec<u8> {
        let mut attrs: Vec<Box<dyn Setter>> = vec![Box::new(ErrorCodeAttribute {
            code: ErrorCode(code),
            reason: b"Because".to_vec(),
        })];
        attrs.extend(extra);
        answer(req, CLASS_ERROR_RESPONSE, attrs)
    }

    fn challenge(req: &[u8], code: u16, nonce: &str) -> Vec<u8> {
        error(
            req,
            code,
            vec![
                Box::new(TextAttribute::new(ATTR_REALM, "turnkey".into())),
                Box::new(TextAttribute::new(ATTR_NONCE, nonce.into())),
            ],
        )
    }

    const RELAYED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 50000);

    fn allocated(req: &[u8]) -> Vec<u8> {
        answer(
            req,
            CLASS_SUCCESS_RESPONSE,
            vec![
                Box::new(RelayedAddress {
                    ip: RELAYED.ip(),
                    port: RELAYED.port(),
                }),
                Box::new(XorMappedAddress {
                    ip: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
                    port: 4242,
                }),
                Box::new(Lifetime(Duration::from_secs(600))),
            ],
        )
    }

    #[test]
    fn allocate_after_the_challenge_is_signed() {
        let mut c = Client::new(Some(cred()));
        let first = c.start(Request::Allocate).unwrap().to_vec();
        assert!(!decode(&first).contains(ATTR_USERNAME));
        assert_eq!(
            c.handle(&challenge(&first, 401, "n1")).unwrap(),
            Progress::Resend
        );
        let signed = c.in_flight().unwrap().to_vec();
        let m = decode(&signed);
        assert_eq!(
            TextAttribute::get_from_as(&m, ATTR_USERNAME).unwrap().text,
            "1795732169:probe"
        );
        assert_eq!(
            TextAttribute::get_from_as(&m, ATTR_NONCE).unwrap().text,
            "n1"
        );
        // The server can check the integrity with the long-term key.
        let mut m = m;
        MessageIntegrity::new_long_term_integrity(
            "1795732169:probe".into(),
            "turnkey".into(),
            "secret".into(),
        )
        .check(&mut m)
        .unwrap();
        // The old transaction's answers no longer count.
        assert_eq!(c.handle(&allocated(&first)).unwrap(), Progress::Ignored);
        match c.handle(&allocated(&signed)).unwrap() {
            Progress::Done(Answer::Allocated {
                relayed,
                mapped,
                lifetime,
            }) => {
                assert_eq!(relayed, RELAYED);
                assert_eq!(mapped.map(|m| m.port()), Some(4242));
                assert_eq!(lifetime, Duration::from_secs(600));
            }
            other => panic!("{other:?}"),
        }
        // Later requests are signed from the start.
        let perm = c
            .start(Request::CreatePermission(RELAYED))
            .unwrap()
            .to_vec();
        assert!(decode(&perm).contains(ATTR_USERNAME));
    }

    #[test]
    fn a_401_to_a_signed_request_is_a_refused_credential() {
        let mut c = Client::new(Some(cred()));
        let first = c.start(Request::Allocate).unwrap().to_vec();
        c.handle(&challenge(&first, 401, "n1")).unwrap();
        let signed = c.in_flight().unwrap().to_vec();
        let err = c.handle(&challenge(&signed, 401, "n2")).unwrap_err();
        assert_eq!(
            err,
            ClientError::Rejected {
                request: "Allocate",
                code: 401,
                reason: "Because".into(),
                authenticated: true
            }
        );
    }

    #[test]
    fn stale_nonces_are_renewed_a_bounded_number_of_times() {
        let mut c = Client::new(Some(cred()));
        let mut raw = c.start(Request::Allocate).unwrap().to_vec();
        for _ in 0..2 {
            assert_eq!(
                c.handle(&challenge(&raw, 438, "n")).unwrap(),
                Progress::Resend
            );
            raw = c.in_flight().unwrap().to_vec();
        }
        assert!(matches!(
            c.handle(&challenge(&raw, 438, "n")),
            Err(ClientError::Rejected { code: 438, .. })
        ));
    }

    #[test]
    fn refusals_and_malformed_answers() {
        let mut c = Client::new(Some(cred()));
        let raw = c
            .start(Request::CreatePermission(RELAYED))
            .unwrap()
            .to_vec();
        assert_eq!(
            c.handle(&error(&raw, 403, vec![])).unwrap_err(),
            ClientError::Rejected {
                request: "CreatePermission",
                code: 403,
                reason: "Because".into(),
                authenticated: false
            }
        );
        let raw = c.start(Request::Allocate).unwrap().to_vec();
        assert!(matches!(
            c.handle(&answer(&raw, CLASS_SUCCESS_RESPONSE, vec![])),
            Err(ClientError::Malformed {
                what: "no XOR-RELAYED-ADDRESS",
                ..
            })
        ));
        let raw = c.start(Request::Allocate).unwrap().to_vec();
        assert!(matches!(
            c.handle(&error(&raw, 401, vec![])),
            Err(ClientError::Malformed {
                what: "a challenge without NONCE",
                ..
            })
        ));
        // Garbage and truncated input is ignored, never a panic.
        c.start(Request::Binding).unwrap();
        for junk in [&b""[..], &[0, 1, 0, 8], &[0u8; 20], &[0xFF; 64]] {
            assert_eq!(c.handle(junk).unwrap(), Progress::Ignored);
        }
        assert_eq!(
            Client::new(None).start(Request::Allocate).unwrap_err(),
            ClientError::NoCredential("Allocate")
        );
    }

    #[test]
    fn binding_reads_the_mapped_address() {
        let mut c = Client::new(None);
        let raw = c.start(Request::Binding).unwrap().to_vec();
        let mapped = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 4242);
        let ok = answer(
            &raw,
            CLASS_SUCCESS_RESPONSE,
            vec![Box::new(XorMappedAddress {
                ip: mapped.ip(),
                port: mapped.port(),
            })],
        );
        assert_eq!(
            c.handle(&ok).unwrap(),
            Progress::Done(Answer::Binding { mapped })
        );
    }

    #[test]
    fn stream_framing_splits_and_pads() {
        let mut c = Client::new(None);
        let stun = c.start(Request::Binding).unwrap().to_vec();
        let ping = ping_payload(7, 1);
        let chan = channel_data(PROBE_CHANNEL, &ping[..17], true);
        assert_eq!(chan.len(), 4 + 20);
        let mut all = stun.clone();
        all.extend_from_slice(&chan);
        all.extend_from_slice(&stun);
        let mut f = StreamFramer::default();
        // Byte by byte: frames appear only when complete.
        let mut frames = Vec::new();
        for b in &all {
            f.push(&[*b]);
            while let Some(fr) = f.next_frame().unwrap() {
                frames.push(fr);
            }
        }
        assert_eq!(
            frames,
            vec![
                Frame::Stun(stun.clone()),
                Frame::Channel(PROBE_CHANNEL, ping[..17].to_vec()),
                Frame::Stun(stun)
            ]
        );
        f.push(b"<html>");
        assert_eq!(
            f.next_frame(),
            Err(FramingError(wire::FrameError::NotTurn(b'<')))
        );
        // Datagrams are not padded.
        assert_eq!(channel_data(PROBE_CHANNEL, &ping[..17], false).len(), 21);
        assert_eq!(
            datagram_frame(&channel_data(PROBE_CHANNEL, &ping, false)),
            Some(Frame::Channel(PROBE_CHANNEL, ping.to_vec()))
        );
        assert_eq!(datagram_frame(&[0x40, 0, 0, 9, 1]), None);
    }
}
