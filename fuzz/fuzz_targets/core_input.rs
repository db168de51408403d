//! Fuzzes the sans-IO TURN core, `turnkey::turn::server::Server`, the part
//! of turnkey that reads every byte a client or peer sends.
//!
//! Random datagrams alone never get past authentication: a request needs a
//! nonce the server issued and a MESSAGE-INTEGRITY under a real key. So the
//! input is a program of small ops (see fuzz/README.md for the byte
//! layout): raw datagrams from one of three clients or from a peer, clock
//! steps, and requests that the harness signs with a known credential and
//! the last nonce the server gave that client. That makes allocations,
//! permissions, channels, EVEN-PORT reservations and their expiry
//! reachable, with the fuzzer choosing the order and the attributes.
//!
//! Besides "no panic", the recording `Io` checks what the core asks of the
//! world: answers decode, relay and reservation sockets are opened and
//! closed in pairs, nothing is relayed from a closed socket, across
//! families or to loopback/private/link-local peers (embedded IPv4 forms
//! included), the allocation counts agree, and once every lifetime has run
//! out nothing is left open, reserved or missing from the port pool.

#![no_main]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use libfuzzer_sys::fuzz_target;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use stun::agent::TransactionId;
use stun::attributes::*;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use turn::proto::peeraddr::PeerAddress;

use turnkey::config::Secret;
use turnkey::turn::allocation::RelayId;
use turnkey::turn::auth::{mint, Credentials};
use turnkey::turn::policy::PeerPolicy;
use turnkey::turn::server::{Clock, CoreConfig, Rules, Server, Shared};
use turnkey::turn::stats::TurnStats;

const REALM: &str = "turnkey";
const SECRET: &str = "fuzz-rest-secret-0123456789";
const RELAY_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const RELAY_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const PORTS: RangeInclusive<u16> = 50000..=50003;
const UNIX0: u64 = 1_700_000_000;

#[path = "core_input/world.rs"]
mod world;
use world::{clients, peer, Rec};

struct Harness {
    s: Server,
    io: Rec,
    shared: Arc<Shared>,
    clock: Clock,
    now: Instant,
    txids: [[u8; 12]; 3],
    serial: u32,
}

impl Harness {
    fn new() -> Self {
        let now = Instant::now();
        let clock = Clock {
            mono0: now,
            unix0: UNIX0,
        };
        let mut users = BTreeMap::new();
        users.insert("alice".to_string(), Secret::new("wonderland"));
        let rules = Rules {
            credentials: Credentials::new(REALM.into(), vec![Secret::new(SECRET)], users),
            policy: PeerPolicy::new(
                vec![],
                vec![],
                vec![RELAY_IP.into(), RELAY_IP6.into()],
                PORTS,
            ),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            user_quota: 2,
            total_quota: 0,
            max_permissions: 3,
            max_channels: 3,
            alternate_server: Some(SocketAddr::new(Ipv4Addr::new(192, 0, 2, 11).into(), 3478)),
            limits: Default::default(),
        };
        let shared = Arc::new(Shared::new(PORTS, Default::default(), &mut SmallRng::seed_from_u64(1)));
        let cfg = CoreConfig {
            relay_v4: Some(RELAY_IP.into()),
            relay_v6: Some(RELAY_IP6.into()),
            nonce_key: [7; 32],
            shards: 1,
            nonce_lifetime: Duration::from_secs(600),
        };
        let s = Server::new(
            cfg,
            clock,
            Arc::new(ArcSwap::from_pointee(rules)),
            shared.clone(),
            Arc::new(TurnStats::default()),
            // Deterministic: a crashing input replays exactly.
            SmallRng::seed_from_u64(7),
        );
        Harness {
            s,
            io: Rec {
                clients: clients(),
                open: Vec::new(),
                reserved: Vec::new(),
                refuse: 0,
                refused_any: false,
                nonce: [None, None, None],
                token: None,
            },
            shared,
            clock,
            now,
            txids: [[0; 12]; 3],
            serial: 0,
        }
    }

    fn client(&mut self, who: usize, data: &[u8]) {
        let ft = self.io.clients[who];
        self.s.handle_client(self.now, ft, data, &mut self.io);
    }

    fn check(&self) {
        let n = self.s.allocation_count();
        let open = &self.io.open;
        let v4_open = open.iter().filter(|r| !r.v6).count();
        assert_eq!(n, self.shared.total_allocations(), "shard vs shared count");
        // Every allocation holds one or two relays (dual-stack: one each).
        assert!(
            n <= open.len() && open.len() <= 2 * n,
            "{n} allocations, relays {open:?}"
        );
        if n > 0 {
            assert!(self.s.poll_timeout().is_some(), "allocations but no timer");
        }
        if !self.io.refused_any {
            let v4_reserved = self.io.reserved.iter().filter(|r| !r.v6).count();
            assert_eq!(
                self.shared.free_ports() + v4_open + v4_reserved,
                PORTS.len(),
                "IPv4 ports neither free, open nor reserved: open {open:?}, reserved {:?}",
                self.io.reserved
            );
        }
    }

    /// After every lifetime has run out, nothing may be left behind.
    fn check_quiet(&mut self) {
        self.now += Duration::from_secs(2 * 3600);
        self.s.handle_timeout(self.now, &mut self.io);
        assert_eq!(
            self.s.allocation_count(),
            0,
            "allocations outlived their lifetime"
        );
        assert!(
            self.io.open.is_empty(),
            "relays left open: {:?}",
            self.io.open
        );
        assert!(
            self.io.reserved.is_empty(),
            "reservations never released: {:?}",
            self.io.reserved
        );
        self.check();
    }

    /// A request signed the way a client would sign it, with the nonce the
    /// server last gave this client (fetched with an unsigned try first,
    /// as clients do, when there is none yet).
    fn signed(&mut self, who: usize, r: &mut Reader) -> Option<()> {
        let method = match r.u8()? % 5 {
            0 => METHOD_ALLOCATE,
            1 => METHOD_REFRESH,
            2 => METHOD_CREATE_PERMISSION,
            3 => METHOD_CHANNEL_BIND,
            _ => METHOD_BINDING,
        };
        let cred = r.u8()?;
        let flags = r.u8()?;
        let peers = r.u8()?;
        let mut attrs: Vec<Box<dyn Setter>> = Vec::new();
        let raw = |t: AttrType, v: Vec<u8>| -> Box<dyn Setter> {
            Box::new(RawAttribute {
                typ: t,
                length: 0,
                value: v,
            })
        };
        if method == METHOD_ALLOCATE {
            let proto = if flags & 0x20 != 0 { 6 } else { 17 };
            attrs.push(raw(ATTR_REQUESTED_TRANSPORT, vec![proto, 0, 0, 0]));
        }
        if flags & 0x01 != 0 {
            attrs.push(raw(ATTR_LIFETIME, r.u32()?.to_be_bytes().to_vec()));
        }
        if flags & 0x02 != 0 {
            attrs.push(raw(ATTR_EVEN_PORT, vec![r.u8()?]));
        }
        if flags & 0x04 != 0 {
            let t = match self.io.token {
                Some(t) => t,
                None => r.array::<8>()?,
            };
            attrs.push(raw(ATTR_RESERVATION_TOKEN, t.to_vec()));
        }
        if flags & 0x08 != 0 {
            attrs.push(raw(ATTR_DONT_FRAGMENT, vec![]));
        }
        if flags & 0x10 != 0 {
            // Low bits: the family (IPv4, IPv6, or two invalid values); 0x80:
            // as ADDITIONAL-ADDRESS-FAMILY; 0x40: as both attributes.
            let b = r.u8()?;
            let v = vec![[1, 2, 3, 0][usize::from(b & 3)], 0, 0, 0];
            if b & 0x80 == 0 || b & 0x40 != 0 {
                attrs.push(raw(ATTR_REQUESTED_ADDRESS_FAMILY, v.clone()));
            }
            if b & 0x80 != 0 || b & 0x40 != 0 {
                attrs.push(raw(AttrType(0x8000), v));
            }
        }
        if method == METHOD_CHANNEL_BIND {
            let n = r.u16()?;
            attrs.push(raw(
                ATTR_CHANNEL_NUMBER,
                vec![(n >> 8) as u8, n as u8, 0, 0],
            ));
        }
        for _ in 0..peers % 4 {
            let p = peer(r.u8()?);
            attrs.push(Box::new(PeerAddress {
                ip: p.ip(),
                port: p.port(),
            }));
        }
        if flags & 0x40 != 0 {
            let t = r.u16()?;
            let len = usize::from(r.u8()?);
            attrs.push(raw(AttrType(t), r.bytes(len)?.to_vec()));
        }
        let trailer = if flags & 0x80 != 0 {
            let t = r.u16()?;
            let len = usize::from(r.u8()?);
            Some(raw(AttrType(t), r.bytes(len)?.to_vec()))
        } else {
            None
        };

        let unix = self.clock.unix(self.now);
        let (user, pass) = match cred & 7 {
            0 => ("alice".to_string(), "wonderland".to_string()),
            1 => {
                let c = mint(SECRET, "carol", unix, 3600);
                (c.username, c.password)
            }
            2 => {
                let c = mint(SECRET, "carol", unix.saturating_sub(7200), 3600);
                (c.username, c.password)
            }
            3 => ("alice".to_string(), "not-the-password".to_string()),
            _ => ("mallory".to_string(), "anything".to_string()),
        };
        if cred & 0x20 == 0 {
            self.serial += 1;
            let mut id = [0u8; 12];
            id[0] = who as u8;
            id[8..].copy_from_slice(&self.serial.to_be_bytes());
            self.txids[who] = id;
        }
        let txid = self.txids[who];
        let fingerprint = cred & 0x10 == 0;

        if self.io.nonce[who].is_none() {
            if let Some(unsigned) = build(txid, method, &attrs, None, None, fingerprint) {
                self.client(who, &unsigned);
            }
        }
        let nonce = if cred & 0x08 != 0 {
            "0000000000000000deadbeefdeadbeefdeadbeef".to_string()
        } else {
            self.io.nonce[who].clone().unwrap_or_default()
        };
        let integrity = MessageIntegrity::new_long_term_integrity(user.clone(), REALM.into(), pass);
        let mut auth: Vec<Box<dyn Setter>> = vec![
            Box::new(TextAttribute::new(ATTR_USERNAME, user)),
            Box::new(TextAttribute::new(ATTR_REALM, REALM.into())),
            Box::new(TextAttribute::new(ATTR_NONCE, nonce)),
        ];
        attrs.append(&mut auth);
        if let Some(msg) = build(txid, method, &attrs, Some(integrity), trailer, fingerprint) {
            self.client(who, &msg);
        }
        Some(())
    }
}

/// Encodes a request; None when the stun crate refuses the attribute list
/// (a fuzzer-chosen FINGERPRINT before MESSAGE-INTEGRITY, say), which no
/// client could send either.
fn build(
    txid: [u8; 12],
    method: Method,
    attrs: &[Box<dyn Setter>],
    integrity: Option<MessageIntegrity>,
    trailer: Option<Box<dyn Setter>>,
    fingerprint: bool,
) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.transaction_id = TransactionId(txid);
    m.typ = MessageType::new(method, CLASS_REQUEST);
    m.write_header();
    for a in attrs {
        a.add_to(&mut m).ok()?;
    }
    if let Some(i) = integrity {
        i.add_to(&mut m).ok()?;
    }
    if let Some(t) = trailer {
        t.add_to(&mut m).ok()?;
    }
    if fingerprint {
        FINGERPRINT.add_to(&mut m).ok()?;
    }
    Some(m.raw)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.array()?))
    }
    /// A length-prefixed chunk; a length past the end takes what is left.
    fn chunk(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u16()?).min(self.0.len());
        self.bytes(n)
    }
}

/// Plays the ops of an input until it runs out.
fn play(h: &mut Harness, data: &[u8]) -> Option<()> {
    let mut r = Reader(data);
    loop {
        let tag = r.u8()?;
        let who = usize::from(tag / 6) % 3;
        match tag % 6 {
            0 => {
                let d = r.chunk()?;
                h.client(who, d);
            }
            1 => {
                let relay = r.u8()?;
                let from = peer(r.u8()?);
                let d = r.chunk()?;
                // Mostly a live relay socket; sometimes any port of the
                // range in either family, live, reserved or free.
                let relay = match h.io.open.len() {
                    n if n > 0 && relay < 0x80 => h.io.open[usize::from(relay) % n],
                    _ => RelayId {
                        v6: relay & 0x40 != 0,
                        port: *PORTS.start() + u16::from(relay) % PORTS.len() as u16,
                    },
                };
                h.s.peer_datagram(h.now, relay, from, d, &mut h.io);
            }
            2 => {
                let step = r.u16()?;
                h.now += if step & 0x8000 != 0 {
                    Duration::from_secs(u64::from(step & 0x7FFF))
                } else {
                    Duration::from_millis(u64::from(step))
                };
                h.s.handle_timeout(h.now, &mut h.io);
            }
            3 => h.signed(who, &mut r)?,
            4 => {
                let ft = h.io.clients[who];
                h.s.connection_closed(&ft, &mut h.io);
            }
            _ => {
                let b = r.u8()?;
                h.io.refuse = b & 3;
                h.shared
                    .draining
                    .store(b & 4 != 0, std::sync::atomic::Ordering::Relaxed);
            }
        }
        h.check();
        // As the shell does: run the timer whenever it is due.
        if h.s.poll_timeout().is_some_and(|t| t <= h.now) {
            h.s.handle_timeout(h.now, &mut h.io);
            h.check();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut h = Harness::new();
    play(&mut h, data);
    h.check_quiet();
});
