//! A small blocking TURN client over a real UDP socket, built on the
//! `stun` and `turn::proto` codecs, for tests that need exact error codes
//! (turn::client hides them).
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::PROTO_UDP;

/// Long-term credentials as a client signs a request with them.
pub struct Auth<'a> {
    pub user: &'a str,
    pub pass: &'a str,
    pub realm: &'a str,
    pub nonce: &'a str,
}

/// Encodes a STUN message with a fresh transaction id: the attributes,
/// then (with `auth`) USERNAME, REALM, NONCE and MESSAGE-INTEGRITY, then
/// FINGERPRINT. Shared by the datagram and the stream test clients.
pub fn build_message(
    method: Method,
    class: MessageClass,
    attrs: Vec<Box<dyn Setter>>,
    auth: Option<Auth<'_>>,
) -> (Vec<u8>, TransactionId) {
    let tid = TransactionId::new();
    let mut setters: Vec<Box<dyn Setter>> =
        vec![Box::new(tid), Box::new(MessageType::new(method, class))];
    setters.extend(attrs);
    if let Some(a) = auth {
        setters.push(Box::new(TextAttribute::new(
            ATTR_USERNAME,
            a.user.to_string(),
        )));
        setters.push(Box::new(TextAttribute::new(
            ATTR_REALM,
            a.realm.to_string(),
        )));
        setters.push(Box::new(TextAttribute::new(
            ATTR_NONCE,
            a.nonce.to_string(),
        )));
        setters.push(Box::new(MessageIntegrity::new_long_term_integrity(
            a.user.to_string(),
            a.realm.to_string(),
            a.pass.to_string(),
        )));
    }
    setters.push(Box::new(FINGERPRINT));
    let mut m = Message::new();
    m.build(&setters).expect("build request");
    (m.raw, tid)
}

pub struct Raw {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub user: String,
    pub pass: String,
    pub realm: String,
    pub nonce: Option<String>,
}

/// An answer: success, or an error code.
pub type Answer = Result<Message, u16>;

pub fn error_code(m: &Message) -> Option<u16> {
    let mut e = ErrorCodeAttribute::default();
    e.get_from(m).ok().map(|_| e.code.0)
}

impl Raw {
    pub fn new(server: SocketAddr, user: &str, pass: &str) -> Raw {
        let local = if server.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        Raw::bound(local, server, user, pass)
    }

    /// A client with a REST credential of `user` labelled `label`, minted
    /// with the tests' secret (`super::SECRET`), valid for ten minutes.
    pub fn labelled(server: SocketAddr, user: &str, label: &str) -> Raw {
        let cred = turnkey::turn::auth::mint_labelled(
            super::SECRET,
            user,
            Some(label),
            turnkey::ice::unix_now(),
            600,
        );
        Raw::new(server, &cred.username, &cred.password)
    }

    /// A client on a chosen local address (another loopback address is
    /// another client IP).
    pub fn bound(local: &str, server: SocketAddr, user: &str, pass: &str) -> Raw {
        let sock = UdpSocket::bind(local).expect("bind client");
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Raw {
            sock,
            server,
            user: user.into(),
            pass: pass.into(),
            realm: "turnkey".into(),
            nonce: None,
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    fn build(
        &self,
        method: Method,
        class: MessageClass,
        attrs: Vec<Box<dyn Setter>>,
        auth: bool,
    ) -> (Vec<u8>, TransactionId) {
        let nonce = self.nonce.clone().unwrap_or_default();
        let creds = auth.then(|| Auth {
            user: &self.user,
            pass: &self.pass,
            realm: &self.realm,
            nonce: &nonce,
        });
        build_message(method, class, attrs, creds)
    }

    /// Sends a request and waits for the answer with its transaction id,
    /// retransmitting as RFC 8489 asks. Other datagrams are skipped.
    pub fn transact(&self, raw: &[u8], tid: TransactionId) -> Message {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            self.sock.send_to(raw, self.server).expect("send");
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                let Ok((n, _)) = self.sock.recv_from(&mut buf) else {
                    break;
                };
                let mut m = Message::new();
                m.raw = buf[..n].to_vec();
                if m.decode().is_ok() && m.transaction_id == tid {
                    return m;
                }
            }
        }
        panic!("no answer from the TURN server");
    }

    /// One request, authenticated (after a 401 challenge or 438 refresh of the nonce).
    pub fn request(&mut self, method: Method, attrs: impl Fn() -> Vec<Box<dyn Setter>>) -> Answer {
        for _ in 0..3 {
            let auth = self.nonce.is_some();
            let (raw, tid) = self.build(method, CLASS_REQUEST, attrs(), auth);
            let m = self.transact(&raw, tid);
            match error_code(&m) {
                None => return Ok(m),
                Some(401) if !auth => {
                    self.nonce = Some(
                        TextAttribute::get_from_as(&m, ATTR_NONCE)
                            .expect("nonce")
                            .text,
                    );
                    self.realm = TextAttribute::get_from_as(&m, ATTR_REALM)
                        .expect("realm")
                        .text;
                }
                Some(code) => return Err(code),
            }
        }
        panic!("authentication loop");
    }

    /// Like `request` but returns the raw 438 instead of refreshing.
    pub fn request_once(&self, method: Method, attrs: Vec<Box<dyn Setter>>) -> Answer {
        let (raw, tid) = self.build(method, CLASS_REQUEST, attrs, self.nonce.is_some());
        let m = self.transact(&raw, tid);
        match error_code(&m) {
            None => Ok(m),
            Some(c) => Err(c),
        }
    }

    pub fn binding(&self) -> SocketAddr {
        let (raw, tid) = self.build(METHOD_BINDING, CLASS_REQUEST, vec![], false);
        let m = self.transact(&raw, tid);
        let mut x = XorMappedAddress::default();
        x.get_from(&m).expect("XOR-MAPPED-ADDRESS");
        SocketAddr::new(x.ip, x.port)
    }

    /// Allocate with extra attributes; every XOR-RELAYED-ADDRESS returned.
    pub fn allocate_with(
        &mut self,
        extra: impl Fn() -> Vec<Box<dyn Setter>>,
    ) -> Result<Vec<SocketAddr>, u16> {
        let m = self.request(METHOD_ALLOCATE, || {
            let mut v: Vec<Box<dyn Setter>> = vec![Box::new(RequestedTransport {
                protocol: PROTO_UDP,
            })];
            v.extend(extra());
            v
        })?;
        Ok(m.attributes
            .0
            .iter()
            .filter(|a| a.typ == ATTR_XOR_RELAYED_ADDRESS)
            .map(|a| {
                let mut single = Message::new();
                single.transaction_id = m.transaction_id;
                single.add(ATTR_XOR_RELAYED_ADDRESS, &a.value);
                let mut r = RelayedAddress::default();
                r.get_from(&single).expect("XOR-RELAYED-ADDRESS");
                SocketAddr::new(r.ip, r.port)
            })
            .collect())
    }

    pub fn allocate(&mut self) -> Result<SocketAddr, u16> {
        let m = self.request(METHOD_ALLOCATE, || {
            vec![Box::new(RequestedTransport {
                protocol: PROTO_UDP,
            })]
        })?;
        let mut r = RelayedAddress::default();
        r.get_from(&m).expect("XOR-RELAYED-ADDRESS");
        Ok(SocketAddr::new(r.ip, r.port))
    }

    pub fn refresh(&mut self, secs: u64) -> Answer {
        self.request(METHOD_REFRESH, || {
            vec![Box::new(Lifetime(Duration::from_secs(secs)))]
        })
    }

    pub fn permit(&mut self, peer: SocketAddr) -> Answer {
        self.request(METHOD_CREATE_PERMISSION, || {
            vec![Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            })]
        })
    }

    pub fn bind_channel(&mut self, number: u16, peer: SocketAddr) -> Answer {
        self.request(METHOD_CHANNEL_BIND, || {
            vec![
                Box::new(ChannelNumber(number)),
                Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                }),
            ]
        })
    }

    pub fn send_indication(&self, peer: SocketAddr, data: &[u8]) {
        let (raw, _) = self.build(
            METHOD_SEND,
            CLASS_INDICATION,
            vec![
                Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                }),
                Box::new(Data(data.to_vec())),
            ],
            false,
        );
        self.sock
            .send_to(&raw, self.server)
            .expect("send indication");
    }

    pub fn channel_data(&self, number: u16, data: &[u8]) {
        let mut b = Vec::with_capacity(4 + data.len());
        b.extend_from_slice(&number.to_be_bytes());
        b.extend_from_slice(&(data.len() as u16).to_be_bytes());
        b.extend_from_slice(data);
        self.sock
            .send_to(&b, self.server)
            .expect("send channel data");
    }

    /// The next datagram from the server, decoded: Data indication →
    /// (Some(peer), data); ChannelData → (None, data) with the channel.
    pub fn recv_data(
        &self,
        within: Duration,
    ) -> Option<(Option<SocketAddr>, Option<u16>, Vec<u8>)> {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 65536];
        while Instant::now() < deadline {
            let Ok((n, _)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            let b = &buf[..n];
            if (0x40..=0x7F).contains(&b[0]) && n >= 4 {
                let len = u16::from_be_bytes([b[2], b[3]]) as usize;
                return Some((
                    None,
                    Some(u16::from_be_bytes([b[0], b[1]])),
                    b[4..4 + len].to_vec(),
                ));
            }
            let mut m = Message::new();
            m.raw = b.to_vec();
            if m.decode().is_ok() && m.typ == MessageType::new(METHOD_DATA, CLASS_INDICATION) {
                let mut p = PeerAddress::default();
                let mut d = Data::default();
                if p.get_from(&m).is_ok() && d.get_from(&m).is_ok() {
                    return Some((Some(SocketAddr::new(p.ip, p.port)), None, d.0));
                }
            }
        }
        None
    }
}
