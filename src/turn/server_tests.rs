//! Deterministic tests of the TURN core: no sockets, time as a parameter.

use super::*;
use crate::config::Secret;
use crate::turn::allocation::{RelayId, Transport};
use crate::turn::auth::{long_term_key, mint, Credentials};
use crate::turn::policy::PeerPolicy;
use rand::SeedableRng;
use std::collections::BTreeMap;
use stun::agent::TransactionId;
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::textattrs::TextAttribute;
use turn::proto::channum::ChannelNumber as ProtoChannelNumber;
use turn::proto::data::Data;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqfamily::REQUESTED_FAMILY_IPV6;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::rsrvtoken::ReservationToken;
use turn::proto::PROTO_UDP;
use turn::proto::{Protocol, PROTO_TCP};

const REALM: &str = "turnkey";
const SECRET: &str = "test-secret-0123456789";
const RELAY_IP: &str = "192.0.2.10";
const RELAY_IP6: &str = "2001:db8::10";

#[derive(Default)]
struct Rec {
    to_client: Vec<(FiveTuple, Vec<u8>)>,
    to_peer: Vec<(u16, SocketAddr, Vec<u8>)>,
    opened: Vec<u16>,
    closed: Vec<u16>,
    closed_clients: Vec<FiveTuple>,
    opened_v6: Vec<u16>,
    unreserved: Vec<u16>,
    refuse_ports: Vec<u16>,
    events: Vec<Event>,
}

impl Io for Rec {
    fn send_to_client(&mut self, to: &FiveTuple, data: &[u8]) {
        self.to_client.push((*to, data.to_vec()));
    }
    fn send_to_peer(&mut self, relay: RelayId, peer: SocketAddr, data: &[u8]) {
        self.to_peer.push((relay.port, peer, data.to_vec()));
    }
    fn open_relay(&mut self, relay: RelayId, _df: bool) -> bool {
        if self.refuse_ports.contains(&relay.port) {
            return false;
        }
        if relay.v6 {
            self.opened_v6.push(relay.port);
        } else {
            self.opened.push(relay.port);
        }
        true
    }
    fn close_relay(&mut self, relay: RelayId) {
        self.closed.push(relay.port);
    }
    fn close_client(&mut self, client: &FiveTuple) {
        assert!(client.transport.is_stream(), "close_client for UDP");
        self.closed_clients.push(*client);
    }
    fn reserve_relay(&mut self, relay: RelayId) -> bool {
        !self.refuse_ports.contains(&relay.port)
    }
    fn unreserve_relay(&mut self, relay: RelayId) {
        self.unreserved.push(relay.port);
    }
    fn event(&mut self, event: Event) {
        self.events.push(event);
    }
}

struct Harness {
    s: Server,
    io: Rec,
    now: Instant,
    clock: Clock,
    shared: Arc<Shared>,
    stats: Arc<TurnStats>,
}

fn rules(user_quota: usize) -> Rules {
    let mut users = BTreeMap::new();
    users.insert("alice".to_string(), Secret::new("wonderland"));
    users.insert("bob".to_string(), Secret::new("builder"));
    Rules {
        credentials: Credentials::new(REALM.into(), vec![Secret::new(SECRET)], users),
        policy: PeerPolicy::new(
            vec![],
            vec![],
            vec![RELAY_IP.parse().unwrap()],
            50000..=50009,
        ),
        default_lifetime: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        user_quota,
        total_quota: 0,
        max_permissions: 4,
        max_channels: 4,
        lifetimes: Default::default(),
        alternate_server: None,
        limits: Default::default(),
    }
}

fn harness_with(rules: Rules, ports: std::ops::RangeInclusive<u16>) -> Harness {
    harness_families(rules, ports, true)
}

fn harness_families(rules: Rules, ports: std::ops::RangeInclusive<u16>, v6: bool) -> Harness {
    let now = Instant::now();
    let clock = Clock {
        mono0: now,
        unix0: 1_700_000_000,
    };
    let shared = Arc::new(Shared::new(
        ports,
        Default::default(),
        &mut SmallRng::seed_from_u64(1),
    ));
    let stats = Arc::new(TurnStats::default());
    let cfg = CoreConfig {
        relay_v4: Some(RELAY_IP.parse().unwrap()),
        relay_v6: v6.then(|| RELAY_IP6.parse().unwrap()),
        nonce_key: [3; 32],
        shards: 1,
        nonce_lifetime: Duration::from_secs(600),
    };
    let s = Server::new(
        cfg,
        clock,
        Arc::new(ArcSwap::from_pointee(rules)),
        shared.clone(),
        stats.clone(),
        SmallRng::seed_from_u64(7),
    );
    Harness {
        s,
        io: Rec::default(),
        now,
        clock,
        shared,
        stats,
    }
}

fn harness() -> Harness {
    harness_with(rules(8), 50000..=50009)
}

fn ft(port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new("198.51.100.20".parse().unwrap(), port),
        server: "192.0.2.10:3478".parse().unwrap(),
        transport: Transport::Udp,
    }
}

struct Cred {
    user: String,
    pass: String,
    nonce: Option<String>,
}

fn cred(user: &str, pass: &str) -> Cred {
    Cred {
        user: user.into(),
        pass: pass.into(),
        nonce: None,
    }
}

fn request(method: Method, attrs: Vec<Box<dyn Setter>>, c: Option<&Cred>) -> Vec<u8> {
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(method, CLASS_REQUEST)),
    ];
    setters.extend(attrs);
    if let Some(c) = c {
        setters.push(Box::new(TextAttribute::new(ATTR_USERNAME, c.user.clone())));
        setters.push(Box::new(TextAttribute::new(ATTR_REALM, REALM.into())));
        setters.push(Box::new(TextAttribute::new(
            ATTR_NONCE,
            c.nonce.clone().unwrap_or_default(),
        )));
        setters.push(Box::new(MessageIntegrity::new_long_term_integrity(
            c.user.clone(),
            REALM.into(),
            c.pass.clone(),
        )));
    }
    setters.push(Box::new(FINGERPRINT));
    let mut m = Message::new();
    m.build(&setters).unwrap();
    m.raw
}

fn decode(raw: &[u8]) -> Message {
    let mut m = Message::new();
    m.raw = raw.to_vec();
    m.decode().unwrap();
    m
}

fn error_code(m: &Message) -> Option<u16> {
    let mut e = ErrorCodeAttribute::default();
    e.get_from(m).ok().map(|_| e.code.0)
}

fn udp() -> Box<dyn Setter> {
    Box::new(RequestedTransport {
        protocol: PROTO_UDP,
    })
}

impl Harness {
    fn send(&mut self, from: FiveTuple, raw: &[u8]) -> Option<Message> {
        let before = self.io.to_client.len();
        self.s.handle_client(self.now, from, raw, &mut self.io);
        self.io.to_client.get(before).map(|(_, b)| decode(b))
    }

    /// Sends a request, answering a 401 challenge once with the nonce.
    fn authed(
        &mut self,
        from: FiveTuple,
        method: Method,
        attrs: impl Fn() -> Vec<Box<dyn Setter>>,
        c: &mut Cred,
    ) -> Message {
        if c.nonce.is_none() {
            let r = self
                .send(from, &request(method, attrs(), None))
                .expect("challenge");
            assert_eq!(error_code(&r), Some(401));
            c.nonce = Some(TextAttribute::get_from_as(&r, ATTR_NONCE).unwrap().text);
        }
        self.send(from, &request(method, attrs(), Some(c)))
            .expect("answer")
    }

    fn allocate(&mut self, from: FiveTuple, c: &mut Cred) -> SocketAddr {
        let r = self.authed(from, METHOD_ALLOCATE, || vec![udp()], c);
        assert_eq!(
            r.typ.class,
            CLASS_SUCCESS_RESPONSE,
            "allocate failed: {:?}",
            error_code(&r)
        );
        let key = long_term_key(&c.user, REALM, &c.pass);
        MessageIntegrity(key.to_vec())
            .check(&mut r.clone())
            .expect("answer is signed");
        let mut ra = RelayedAddress::default();
        ra.get_from(&r).unwrap();
        SocketAddr::new(ra.ip, ra.port)
    }
}

fn peer_attr(p: &str) -> Box<dyn Setter> {
    let p: SocketAddr = p.parse().unwrap();
    Box::new(PeerAddress {
        ip: p.ip(),
        port: p.port(),
    })
}

#[test]
fn binding_returns_the_source_address() {
    let mut h = harness();
    let r = h
        .send(ft(4000), &request(METHOD_BINDING, vec![], None))
        .unwrap();
    assert_eq!(
        r.typ,
        MessageType::new(METHOD_BINDING, CLASS_SUCCESS_RESPONSE)
    );
    let mut x = XorMappedAddress::default();
    x.get_from(&r).unwrap();
    assert_eq!(SocketAddr::new(x.ip, x.port), ft(4000).client);
    assert!(r.contains(ATTR_FINGERPRINT));
}

#[test]
fn allocate_challenge_then_success() {
    let mut h = harness();
    let r = h
        .send(ft(4000), &request(METHOD_ALLOCATE, vec![udp()], None))
        .unwrap();
    assert_eq!(error_code(&r), Some(401));
    assert_eq!(
        TextAttribute::get_from_as(&r, ATTR_REALM).unwrap().text,
        REALM
    );
    assert!(!r.contains(ATTR_MESSAGE_INTEGRITY));
    let relayed = h.allocate(ft(4000), &mut cred("alice", "wonderland"));
    assert_eq!(relayed.ip().to_string(), RELAY_IP);
    assert!((50000..=50009).contains(&relayed.port()));
    assert_eq!(h.io.opened, vec![relayed.port()]);
    assert_eq!(h.s.allocation_count(), 1);
    assert_eq!(h.shared.total_allocations(), 1);
}

#[test]
fn wrong_password_and_unknown_user_get_401() {
    let mut h = harness();
    for (u, p) in [("alice", "wrong"), ("mallory", "x")] {
        let r = h.authed(ft(4000), METHOD_ALLOCATE, || vec![udp()], &mut cred(u, p));
        assert_eq!(error_code(&r), Some(401));
    }
    assert_eq!(h.stats.auth_bad_credential.load(Ordering::Relaxed), 2);
    assert_eq!(h.s.allocation_count(), 0);
}

#[test]
fn rest_credentials_work_until_they_expire() {
    let mut h = harness();
    let unix = h.clock.unix(h.now);
    let good = mint(SECRET, "carol", unix, 3600);
    h.allocate(ft(4000), &mut cred(&good.username, &good.password));
    let old = mint(SECRET, "carol", unix - 7200, 3600);
    let r = h.authed(
        ft(4001),
        METHOD_ALLOCATE,
        || vec![udp()],
        &mut cred(&old.username, &old.password),
    );
    assert_eq!(error_code(&r), Some(401));
    assert_eq!(h.stats.auth_expired.load(Ordering::Relaxed), 1);
    let other = mint("another-secret-0123456", "carol", unix, 3600);
    let r = h.authed(
        ft(4002),
        METHOD_ALLOCATE,
        || vec![udp()],
        &mut cred(&other.username, &other.password),
    );
    assert_eq!(error_code(&r), Some(401));
}

#[test]
fn stale_and_forged_nonces_get_438() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    let r = h
        .send(ft(4000), &request(METHOD_ALLOCATE, vec![udp()], None))
        .unwrap();
    c.nonce = Some(TextAttribute::get_from_as(&r, ATTR_NONCE).unwrap().text);
    h.now += Duration::from_secs(601);
    let r = h
        .send(ft(4000), &request(METHOD_ALLOCATE, vec![udp()], Some(&c)))
        .unwrap();
    assert_eq!(error_code(&r), Some(438));
    assert!(r.contains(ATTR_NONCE) && r.contains(ATTR_REALM));
    // A nonce issued to another client address is refused too.
    let r2 = h
        .send(ft(4001), &request(METHOD_ALLOCATE, vec![udp()], None))
        .unwrap();
    c.nonce = Some(TextAttribute::get_from_as(&r2, ATTR_NONCE).unwrap().text);
    let r = h
        .send(ft(4000), &request(METHOD_ALLOCATE, vec![udp()], Some(&c)))
        .unwrap();
    assert_eq!(error_code(&r), Some(438));
    assert_eq!(h.stats.auth_stale_nonce.load(Ordering::Relaxed), 2);
}

#[test]
fn allocate_errors() {
    let mut h = harness_families(rules(8), 50000..=50009, false);
    let mut c = cred("alice", "wonderland");
    let r = h.authed(ft(4000), METHOD_ALLOCATE, Vec::new, &mut c);
    assert_eq!(error_code(&r), Some(400), "missing REQUESTED-TRANSPORT");
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || {
            vec![Box::new(RequestedTransport {
                protocol: PROTO_TCP,
            })]
        },
        &mut c,
    );
    assert_eq!(error_code(&r), Some(442));
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || vec![udp(), Box::new(REQUESTED_FAMILY_IPV6)],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(440));
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || {
            vec![
                udp(),
                Box::new(RawAttribute {
                    typ: AttrType(0x0031),
                    length: 4,
                    value: vec![0; 4],
                }),
            ]
        },
        &mut c,
    );
    assert_eq!(error_code(&r), Some(420));
    let mut ua = UnknownAttributes(Vec::new());
    ua.get_from(&r).unwrap();
    assert_eq!(ua.0, vec![AttrType(0x0031)]);
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || {
            vec![
                udp(),
                Box::new(ReservationToken(vec![1; 8])),
                Box::new(RawAttribute {
                    typ: ATTR_EVEN_PORT,
                    length: 1,
                    value: vec![0],
                }),
            ]
        },
        &mut c,
    );
    assert_eq!(error_code(&r), Some(400), "token with EVEN-PORT");
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || vec![udp(), Box::new(ReservationToken(vec![1; 8]))],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(508), "unknown token");
    // Non-UDP protocol number that is not TCP either.
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || {
            vec![Box::new(RequestedTransport {
                protocol: Protocol(99),
            })]
        },
        &mut c,
    );
    assert_eq!(error_code(&r), Some(442));
    assert_eq!(h.s.allocation_count(), 0);
}

#[test]
fn second_allocate_on_a_tuple_is_437_but_retransmit_succeeds() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    let r0 = h
        .send(ft(4000), &request(METHOD_ALLOCATE, vec![udp()], None))
        .unwrap();
    c.nonce = Some(TextAttribute::get_from_as(&r0, ATTR_NONCE).unwrap().text);
    let raw = request(METHOD_ALLOCATE, vec![udp()], Some(&c));
    let first = h.send(ft(4000), &raw).unwrap();
    let again = h.send(ft(4000), &raw).unwrap();
    assert_eq!(again.typ.class, CLASS_SUCCESS_RESPONSE);
    assert_eq!(
        first.get(ATTR_XOR_RELAYED_ADDRESS).unwrap(),
        again.get(ATTR_XOR_RELAYED_ADDRESS).unwrap()
    );
    let r = h
        .send(ft(4000), &request(METHOD_ALLOCATE, vec![udp()], Some(&c)))
        .unwrap();
    assert_eq!(error_code(&r), Some(437));
    assert_eq!(h.s.allocation_count(), 1);
}

#[test]
fn requests_without_allocation_get_437_and_other_users_441() {
    let mut h = harness();
    let mut a = cred("alice", "wonderland");
    let r = h.authed(ft(4000), METHOD_REFRESH, Vec::new, &mut a);
    assert_eq!(error_code(&r), Some(437));
    h.allocate(ft(4000), &mut a);
    let mut b = cred("bob", "builder");
    let r = h.authed(ft(4000), METHOD_REFRESH, Vec::new, &mut b);
    assert_eq!(error_code(&r), Some(441));
}

#[test]
fn user_quota_gives_486() {
    let mut h = harness_with(rules(1), 50000..=50009);
    let mut a = cred("alice", "wonderland");
    h.allocate(ft(4000), &mut a);
    let r = h.authed(
        ft(4001),
        METHOD_ALLOCATE,
        || vec![udp()],
        &mut cred("alice", "wonderland"),
    );
    assert_eq!(error_code(&r), Some(486));
    h.allocate(ft(4002), &mut cred("bob", "builder"));
    assert_eq!(h.stats.quota_rejections.load(Ordering::Relaxed), 1);
}

#[test]
fn a_spent_budget_gives_486_to_its_user_or_label_only() {
    use crate::turn::auth::mint_labelled;
    use crate::turn::revoked::Revokee;
    let mut h = harness();
    let unix = h.clock.unix(h.now);
    h.shared
        .set_over_budget(vec![Revokee::Label("acme".into())]);
    let spent = mint_labelled(SECRET, "carol", Some("acme"), unix, 3600);
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || vec![udp()],
        &mut cred(&spent.username, &spent.password),
    );
    assert_eq!(error_code(&r), Some(486));
    assert_eq!(h.stats.budget_rejections.load(Ordering::Relaxed), 1);
    let other = mint_labelled(SECRET, "carol", Some("globex"), unix, 3600);
    h.allocate(ft(4001), &mut cred(&other.username, &other.password));
    h.shared.set_over_budget(Vec::new());
    h.allocate(ft(4002), &mut cred(&spent.username, &spent.password));
}

#[test]
fn a_label_past_its_concurrent_allocations_gets_486_until_one_ends() {
    use crate::turn::auth::mint_labelled;
    use crate::turn::revoked::Revokee;
    let mut r = rules(0);
    r.limits.allocation_caps = vec![(Revokee::Label("acme".into()), 2)];
    let mut h = harness_with(r, 50000..=50009);
    let unix = h.clock.unix(h.now);
    let mint = |user| mint_labelled(SECRET, user, Some("acme"), unix, 3600);
    let (a, b, c) = (mint("ann"), mint("ben"), mint("cat"));
    let mut first = cred(&a.username, &a.password);
    h.allocate(ft(4000), &mut first);
    h.allocate(ft(4001), &mut cred(&b.username, &b.password));
    let third = |h: &mut Harness| {
        let r = h.authed(
            ft(4002),
            METHOD_ALLOCATE,
            || vec![udp()],
            &mut cred(&c.username, &c.password),
        );
        error_code(&r)
    };
    assert_eq!(third(&mut h), Some(486), "the third of the label");
    assert_eq!(h.stats.budget_rejections.load(Ordering::Relaxed), 1);
    let other = mint_labelled(SECRET, "cat", Some("globex"), unix, 3600);
    h.allocate(ft(4003), &mut cred(&other.username, &other.password));
    // Ann's ends: the label has room again.
    let r = h.authed(
        ft(4000),
        METHOD_REFRESH,
        || vec![Box::new(Lifetime(Duration::from_secs(0)))],
        &mut first,
    );
    assert_eq!(error_code(&r), None);
    assert_eq!(third(&mut h), None);
}

#[test]
fn a_revoked_user_gets_401_even_on_its_own_allocation() {
    use crate::turn::revoked::Revokee;
    let mut h = harness();
    let unix = h.clock.unix(h.now);
    let mut a = cred("alice", "wonderland");
    h.allocate(ft(4000), &mut a);
    h.shared
        .revoke(Revokee::User("alice".into()), unix + 600, unix);
    let r = h.authed(
        ft(4000),
        METHOD_REFRESH,
        || vec![Box::new(Lifetime(Duration::from_secs(600)))],
        &mut a,
    );
    assert_eq!(error_code(&r), Some(401));
    assert_eq!(h.stats.auth_revoked.load(Ordering::Relaxed), 1);
    h.allocate(ft(4001), &mut cred("bob", "builder"));
}

#[test]
fn exhausted_ports_give_508_and_taken_ports_are_skipped() {
    let mut h = harness_with(rules(8), 50000..=50001);
    h.io.refuse_ports = vec![50000];
    let relayed = h.allocate(ft(4000), &mut cred("alice", "wonderland"));
    assert_eq!(relayed.port(), 50001);
    let r = h.authed(
        ft(4001),
        METHOD_ALLOCATE,
        || vec![udp()],
        &mut cred("bob", "builder"),
    );
    assert_eq!(error_code(&r), Some(508));
}

#[test]
fn permissions_follow_the_peer_policy() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    h.allocate(ft(4000), &mut c);
    for denied in [
        "127.0.0.1:5000",
        "169.254.169.254:80",
        "10.0.0.1:1",
        "192.168.1.1:2",
    ] {
        let r = h.authed(
            ft(4000),
            METHOD_CREATE_PERMISSION,
            || vec![peer_attr(denied)],
            &mut c,
        );
        assert_eq!(error_code(&r), Some(403), "{denied}");
    }
    // One bad address refuses the whole request and installs nothing.
    let r = h.authed(
        ft(4000),
        METHOD_CREATE_PERMISSION,
        || vec![peer_attr("8.8.8.8:1"), peer_attr("127.0.0.1:1")],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(403));
    let r = h.authed(
        ft(4000),
        METHOD_CREATE_PERMISSION,
        || {
            vec![
                peer_attr("8.8.8.8:1"),
                peer_attr("1.1.1.1:1"),
                peer_attr(&format!("{RELAY_IP}:50003")),
            ]
        },
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    let r = h.authed(
        ft(4000),
        METHOD_CREATE_PERMISSION,
        || vec![peer_attr("[2606:4700::1111]:1")],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(443));
    let r = h.authed(ft(4000), METHOD_CREATE_PERMISSION, Vec::new, &mut c);
    assert_eq!(error_code(&r), Some(400));
    let r = h.authed(
        ft(4000),
        METHOD_CREATE_PERMISSION,
        || vec![peer_attr("9.9.9.9:1"), peer_attr("9.9.9.10:1")],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(508), "max_permissions is 4");
}

#[test]
fn channel_bind_rules() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    h.allocate(ft(4000), &mut c);
    let num = |n: u16| -> Box<dyn Setter> { Box::new(ProtoChannelNumber(n)) };
    let r = h.authed(
        ft(4000),
        METHOD_CHANNEL_BIND,
        || vec![num(0x3FFF), peer_attr("8.8.8.8:53")],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(400));
    let r = h.authed(
        ft(4000),
        METHOD_CHANNEL_BIND,
        || vec![num(0x8000), peer_attr("8.8.8.8:53")],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(400));
    let r = h.authed(ft(4000), METHOD_CHANNEL_BIND, || vec![num(0x4000)], &mut c);
    assert_eq!(error_code(&r), Some(400));
    let r = h.authed(
        ft(4000),
        METHOD_CHANNEL_BIND,
        || vec![num(0x4000), peer_attr("127.0.0.1:53")],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(403));
    let r = h.authed(
        ft(4000),
        METHOD_CHANNEL_BIND,
        || vec![num(0x4000), peer_attr(&format!("{RELAY_IP}:22"))],
        &mut c,
    );
    assert_eq!(
        error_code(&r),
        Some(403),
        "own address outside the relay range"
    );
    let r = h.authed(
        ft(4000),
        METHOD_CHANNEL_BIND,
        || vec![num(0x4000), peer_attr("8.8.8.8:53")],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    let r = h.authed(
        ft(4000),
        METHOD_CHANNEL_BIND,
        || vec![num(0x4000), peer_attr("8.8.8.8:53")],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "refresh");
    let r = h.authed(
        ft(4000),
        METHOD_CHANNEL_BIND,
        || vec![num(0x4000), peer_attr("8.8.4.4:53")],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(400), "number bound to another peer");
    let r = h.authed(
        ft(4000),
        METHOD_CHANNEL_BIND,
        || vec![num(0x4001), peer_attr("8.8.8.8:53")],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(400), "peer bound to another number");
}

#[test]
fn data_flows_both_ways_through_indications_and_channels() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    let relayed = h.allocate(ft(4000), &mut c);
    let peer: SocketAddr = "8.8.8.8:5000".parse().unwrap();
    let send = |payload: &[u8]| -> Vec<u8> {
        let mut m = Message::new();
        let setters: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
            Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            }),
            Box::new(Data(payload.to_vec())),
        ];
        m.build(&setters).unwrap();
        m.raw
    };
    // No permission yet: dropped.
    h.send(ft(4000), &send(b"early"));
    assert!(h.io.to_peer.is_empty());
    assert_eq!(h.stats.dropped_no_permission.load(Ordering::Relaxed), 1);
    // Peer traffic without permission is dropped too.
    h.s.peer_datagram(
        h.now,
        RelayId {
            v6: false,
            port: relayed.port(),
        },
        peer,
        b"nope",
        &mut h.io,
    );
    assert!(h.io.to_client.iter().all(|(_, b)| b[0] < 0x40));
    let r = h.authed(
        ft(4000),
        METHOD_CREATE_PERMISSION,
        || vec![peer_attr("8.8.8.8:1")],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    h.send(ft(4000), &send(b"hello"));
    assert_eq!(
        h.io.to_peer,
        vec![(relayed.port(), peer, b"hello".to_vec())]
    );
    // Peer → client as a Data indication.
    let n = h.io.to_client.len();
    h.s.peer_datagram(
        h.now,
        RelayId {
            v6: false,
            port: relayed.port(),
        },
        peer,
        b"world",
        &mut h.io,
    );
    let di = decode(&h.io.to_client[n].1);
    assert_eq!(di.typ.value(), wire::DATA_INDICATION);
    let mut d = Data::default();
    d.get_from(&di).unwrap();
    assert_eq!(d.0, b"world");
    // Bind a channel: both directions switch to ChannelData.
    let r = h.authed(
        ft(4000),
        METHOD_CHANNEL_BIND,
        || {
            vec![
                Box::new(ProtoChannelNumber(0x4001)),
                peer_attr("8.8.8.8:5000"),
            ]
        },
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    h.s.handle_client(
        h.now,
        ft(4000),
        &[0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c', 0],
        &mut h.io,
    );
    assert_eq!(
        h.io.to_peer.last().unwrap(),
        &(relayed.port(), peer, b"abc".to_vec())
    );
    h.s.peer_datagram(
        h.now,
        RelayId {
            v6: false,
            port: relayed.port(),
        },
        peer,
        b"xyz",
        &mut h.io,
    );
    assert_eq!(
        h.io.to_client.last().unwrap().1,
        vec![0x40, 0x01, 0x00, 0x03, b'x', b'y', b'z']
    );
    // Unbound channel and truncated ChannelData are dropped.
    h.s.handle_client(h.now, ft(4000), &[0x40, 0x02, 0x00, 0x01, 0], &mut h.io);
    h.s.handle_client(h.now, ft(4000), &[0x40, 0x01, 0x00, 0x09, 0], &mut h.io);
    assert_eq!(h.io.to_peer.len(), 2);
    use crate::turn::stats::{Direction, Framing};
    let udp = Transport::Udp;
    let c2p = h
        .stats
        .flow(udp, Direction::ClientToPeer, Framing::ChannelData);
    assert_eq!(c2p.packets.load(Ordering::Relaxed), 1);
    let p2c = h
        .stats
        .flow(udp, Direction::PeerToClient, Framing::ChannelData);
    assert_eq!(p2c.bytes.load(Ordering::Relaxed), 3);
    // After 300 s without refresh the permission lapses (the channel lives on).
    h.now += Duration::from_secs(301);
    h.s.handle_client(h.now, ft(4000), &[0x40, 0x01, 0x00, 0x01, b'q'], &mut h.io);
    assert_eq!(h.io.to_peer.len(), 2);
}

#[test]
fn refresh_zero_deletes_and_frees_the_port() {
    let mut h = harness_with(rules(8), 50000..=50000);
    let mut c = cred("alice", "wonderland");
    let relayed = h.allocate(ft(4000), &mut c);
    let r = h.authed(
        ft(4000),
        METHOD_REFRESH,
        || vec![Box::new(Lifetime(Duration::from_secs(0)))],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    let mut l = Lifetime::default();
    l.get_from(&r).unwrap();
    assert_eq!(l.0, Duration::ZERO);
    assert_eq!(h.io.closed, vec![relayed.port()]);
    assert_eq!(h.s.allocation_count(), 0);
    assert_eq!(h.shared.free_ports(), 1);
    // The only port is usable again.
    h.allocate(ft(4001), &mut cred("bob", "builder"));
}

#[test]
fn a_stream_allocation_that_ends_closes_its_connection() {
    let mut h = harness();
    let tcp = |port| FiveTuple {
        transport: Transport::Tcp,
        ..ft(port)
    };
    // Refresh 0 over TCP: the answer is sent, then the connection closes.
    let mut c = cred("alice", "wonderland");
    h.allocate(tcp(4000), &mut c);
    let r = h.authed(
        tcp(4000),
        METHOD_REFRESH,
        || vec![Box::new(Lifetime(Duration::from_secs(0)))],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    assert_eq!(h.io.closed_clients, vec![tcp(4000)]);
    // Expiry of a quiet TCP allocation closes it too; UDP ones have no
    // connection to close.
    h.allocate(tcp(4001), &mut cred("bob", "builder"));
    h.allocate(ft(4002), &mut cred("bob", "builder"));
    h.now += Duration::from_secs(601);
    h.s.handle_timeout(h.now, &mut h.io);
    assert_eq!(h.s.allocation_count(), 0);
    assert_eq!(h.io.closed_clients, vec![tcp(4000), tcp(4001)]);
}

#[test]
fn the_last_port_of_the_range_is_usable() {
    // Debug builds panicked computing the neighbour of port 65535.
    let mut h = harness_with(rules(8), 65535..=65535);
    let relayed = h.allocate(ft(4000), &mut cred("alice", "wonderland"));
    assert_eq!(relayed.port(), 65535);
}

#[test]
fn refresh_caps_lifetime_and_expiry_deletes() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    let relayed = h.allocate(ft(4000), &mut c);
    let r = h.authed(
        ft(4000),
        METHOD_REFRESH,
        || vec![Box::new(Lifetime(Duration::from_secs(99999)))],
        &mut c,
    );
    let mut l = Lifetime::default();
    l.get_from(&r).unwrap();
    assert_eq!(l.0, Duration::from_secs(3600));
    assert!(h.s.poll_timeout().is_some());
    h.now += Duration::from_secs(3599);
    h.s.handle_timeout(h.now, &mut h.io);
    assert_eq!(h.s.allocation_count(), 1);
    h.now += Duration::from_secs(2);
    h.s.handle_timeout(h.now, &mut h.io);
    assert_eq!(h.s.allocation_count(), 0);
    assert_eq!(h.io.closed, vec![relayed.port()]);
    assert!(matches!(
        h.io.events.last(),
        Some(Event::AllocationEnded {
            reason: EndReason::Expired,
            ..
        })
    ));
    assert_eq!(h.shared.total_allocations(), 0);
    assert!(h.s.poll_timeout().is_none());
}

#[test]
fn even_port_with_reservation() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    let even_r = || -> Vec<Box<dyn Setter>> {
        vec![
            udp(),
            Box::new(RawAttribute {
                typ: ATTR_EVEN_PORT,
                length: 1,
                value: vec![0x80],
            }),
        ]
    };
    let r = h.authed(ft(4000), METHOD_ALLOCATE, even_r, &mut c);
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    let mut ra = RelayedAddress::default();
    ra.get_from(&r).unwrap();
    assert_eq!(ra.port % 2, 0);
    let mut token = ReservationToken::default();
    token.get_from(&r).unwrap();
    let mut b = cred("bob", "builder");
    let tok = token.0.clone();
    let r = h.authed(
        ft(4001),
        METHOD_ALLOCATE,
        || vec![udp(), Box::new(ReservationToken(tok.clone()))],
        &mut b,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    let mut rb = RelayedAddress::default();
    rb.get_from(&r).unwrap();
    assert_eq!(rb.port, ra.port + 1);
}

#[test]
fn unreserved_pair_port_returns_after_30s() {
    let mut h = harness_with(rules(8), 50000..=50001);
    let mut c = cred("alice", "wonderland");
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || {
            vec![
                udp(),
                Box::new(RawAttribute {
                    typ: ATTR_EVEN_PORT,
                    length: 1,
                    value: vec![0x80],
                }),
            ]
        },
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    assert_eq!(h.shared.free_ports(), 0);
    h.now += Duration::from_secs(31);
    h.s.handle_timeout(h.now, &mut h.io);
    assert_eq!(h.shared.free_ports(), 1);
}

#[test]
fn draining_refuses_new_allocations() {
    let mut h = harness();
    h.shared.draining.store(true, Ordering::Relaxed);
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || vec![udp()],
        &mut cred("alice", "wonderland"),
    );
    assert_eq!(error_code(&r), Some(403));
}
#[test]
fn draining_with_an_alternate_answers_300() {
    let mut r = rules(8);
    r.alternate_server = Some("203.0.113.8:3478".parse().unwrap());
    let mut h = harness_with(r, 50000..=50009);
    h.shared.draining.store(true, Ordering::Relaxed);
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || vec![udp()],
        &mut cred("alice", "wonderland"),
    );
    assert_eq!(error_code(&r), Some(300));
    let mut alt = stun::addr::MappedAddress::default();
    alt.get_from_as(&r, ATTR_ALTERNATE_SERVER).unwrap();
    assert_eq!(
        SocketAddr::new(alt.ip, alt.port),
        "203.0.113.8:3478".parse::<SocketAddr>().unwrap()
    );
}

#[test]
fn garbage_never_panics() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    let relayed = h.allocate(ft(4000), &mut c);
    let seeds: Vec<Vec<u8>> = vec![
        request(METHOD_ALLOCATE, vec![udp()], Some(&c)),
        request(
            METHOD_CREATE_PERMISSION,
            vec![peer_attr("8.8.8.8:1")],
            Some(&c),
        ),
        request(
            METHOD_CHANNEL_BIND,
            vec![Box::new(ProtoChannelNumber(0x4000)), peer_attr("8.8.8.8:1")],
            Some(&c),
        ),
        request(
            METHOD_REFRESH,
            vec![Box::new(Lifetime(Duration::from_secs(60)))],
            Some(&c),
        ),
        request(METHOD_BINDING, vec![], None),
        vec![0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4],
    ];
    let mut rng = SmallRng::seed_from_u64(7);
    for i in 0..20_000 {
        let mut m = seeds[i % seeds.len()].clone();
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..m.len());
            match rng.random_range(0..4) {
                0 => m[at] = rng.random(),
                1 => m.truncate(at),
                2 => m.insert(at, rng.random()),
                _ => {
                    if m.len() > 3 {
                        m[2] = rng.random();
                        m[3] = rng.random();
                    }
                }
            }
            if m.is_empty() {
                break;
            }
        }
        h.s.handle_client(h.now, ft(4000 + (i % 3) as u16), &m, &mut h.io);
        h.s.peer_datagram(
            h.now,
            RelayId {
                v6: false,
                port: relayed.port(),
            },
            "8.8.8.8:1".parse().unwrap(),
            &m,
            &mut h.io,
        );
    }
}

fn family(v6: bool) -> Box<dyn Setter> {
    Box::new(RawAttribute {
        typ: ATTR_REQUESTED_ADDRESS_FAMILY,
        length: 4,
        value: vec![if v6 { 2 } else { 1 }, 0, 0, 0],
    })
}

fn additional_v6() -> Box<dyn Setter> {
    Box::new(RawAttribute {
        typ: AttrType(0x8000),
        length: 4,
        value: vec![2, 0, 0, 0],
    })
}

fn relayed_addresses(r: &Message) -> Vec<SocketAddr> {
    r.attributes
        .0
        .iter()
        .filter(|a| a.typ == ATTR_XOR_RELAYED_ADDRESS)
        .map(|a| wire::decode_xor_addr(&a.value, &r.transaction_id.0).unwrap())
        .collect()
}

#[test]
fn ipv6_allocation_relays_to_ipv6_peers_only() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || vec![udp(), family(true)],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    let relayed = relayed_addresses(&r);
    assert_eq!(relayed.len(), 1);
    assert_eq!(relayed[0].ip().to_string(), RELAY_IP6);
    assert_eq!(h.io.opened_v6, vec![relayed[0].port()]);
    let r = h.authed(
        ft(4000),
        METHOD_CREATE_PERMISSION,
        || vec![peer_attr("8.8.8.8:1")],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(443), "IPv4 peer on an IPv6 allocation");
    let r = h.authed(
        ft(4000),
        METHOD_CREATE_PERMISSION,
        || vec![peer_attr("[2606:4700::1111]:1")],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    for denied in [
        "[::1]:1",
        "[::ffff:127.0.0.1]:1",
        "[fe80::1]:1",
        "[fd00::1]:1",
    ] {
        let r = h.authed(
            ft(4000),
            METHOD_CREATE_PERMISSION,
            || vec![peer_attr(denied)],
            &mut c,
        );
        assert_eq!(error_code(&r), Some(403), "{denied}");
    }
}

#[test]
fn dual_allocation_returns_both_relayed_addresses() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || vec![udp(), additional_v6()],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    let relayed = relayed_addresses(&r);
    assert_eq!(relayed.len(), 2);
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6());
    // Both families relay; refresh 0 closes both sockets.
    for peer in ["8.8.8.8:1", "[2606:4700::1111]:1"] {
        let r = h.authed(
            ft(4000),
            METHOD_CREATE_PERMISSION,
            || vec![peer_attr(peer)],
            &mut c,
        );
        assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "{peer}");
    }
    let r = h.authed(
        ft(4000),
        METHOD_REFRESH,
        || vec![Box::new(Lifetime(Duration::ZERO))],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    assert_eq!(h.io.closed.len(), 2);
}

#[test]
fn families_that_are_not_configured() {
    let mut h = harness_families(rules(8), 50000..=50009, false);
    let mut c = cred("alice", "wonderland");
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || vec![udp(), family(true)],
        &mut c,
    );
    assert_eq!(error_code(&r), Some(440));
    // A dual request is served for IPv4, with ADDRESS-ERROR-CODE for IPv6.
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || vec![udp(), additional_v6()],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    assert_eq!(relayed_addresses(&r).len(), 1);
    let err = r.get(AttrType(0x8001)).unwrap();
    assert_eq!((err[0], err[2], err[3]), (2, 4, 40));
    // Both family attributes at once is a bad request.
    let r = h.authed(
        ft(4001),
        METHOD_ALLOCATE,
        || vec![udp(), family(false), additional_v6()],
        &mut cred("bob", "builder"),
    );
    assert_eq!(error_code(&r), Some(400));
}

#[test]
fn an_allocation_outlives_its_rest_credential() {
    let mut h = harness();
    let unix = h.clock.unix(h.now);
    let short = mint(SECRET, "carol", unix, 60);
    let mut c = cred(&short.username, &short.password);
    h.allocate(ft(4000), &mut c);
    // Two minutes later the credential has expired, but the allocation
    // made with it still refreshes (Chrome keeps the original credential).
    h.now += Duration::from_secs(120);
    c.nonce = None;
    let r = h.authed(
        ft(4000),
        METHOD_REFRESH,
        || vec![Box::new(Lifetime(Duration::from_secs(600)))],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", error_code(&r));
    let r = h.authed(
        ft(4000),
        METHOD_CREATE_PERMISSION,
        || vec![peer_attr("8.8.8.8:1")],
        &mut c,
    );
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    // A new allocation with it is refused.
    let r = h.authed(
        ft(4001),
        METHOD_ALLOCATE,
        || vec![udp()],
        &mut cred(&short.username, &short.password),
    );
    assert_eq!(error_code(&r), Some(401));
}

#[test]
fn even_port_reservation_with_a_dual_allocation_is_refused() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    let r = h.authed(
        ft(4000),
        METHOD_ALLOCATE,
        || {
            vec![
                udp(),
                additional_v6(),
                Box::new(RawAttribute {
                    typ: ATTR_EVEN_PORT,
                    length: 1,
                    value: vec![0x80],
                }),
            ]
        },
        &mut c,
    );
    assert_eq!(error_code(&r), Some(400));
    assert!(
        h.io.opened.is_empty() && h.io.opened_v6.is_empty(),
        "nothing was bound"
    );
}

#[test]
fn unauthenticated_udp_requests_have_a_budget_per_address_and_streams_do_not() {
    use crate::budget::Rate;
    let mut r = rules(8);
    r.limits.unauth_rate = Rate {
        per_sec: 1,
        burst: 3,
    };
    r.limits.binding_rate = Rate {
        per_sec: 1,
        burst: 2,
    };
    let mut h = harness_with(r, 50000..=50009);
    let allocate = request(METHOD_ALLOCATE, vec![udp()], None);
    for _ in 0..10 {
        h.s.handle_client(h.now, ft(4000), &allocate, &mut h.io);
    }
    assert_eq!(h.io.to_client.len(), 3, "the burst is answered, no more");
    // Another address has its own budget; a second later one more passes.
    let other = FiveTuple {
        client: "198.51.100.99:4000".parse().unwrap(),
        ..ft(4000)
    };
    h.s.handle_client(h.now, other, &allocate, &mut h.io);
    h.s.handle_client(
        h.now + Duration::from_secs(1),
        ft(4000),
        &allocate,
        &mut h.io,
    );
    assert_eq!(h.io.to_client.len(), 5);
    // Bindings have their own budget.
    let binding = request(METHOD_BINDING, vec![], None);
    for _ in 0..5 {
        h.s.handle_client(h.now, ft(4001), &binding, &mut h.io);
    }
    assert_eq!(h.io.to_client.len(), 7);
    assert_eq!(h.stats.rate_limited.load(Ordering::Relaxed), 7 + 3);
    // Over TCP the client never retransmits: every request is answered.
    let tcp = FiveTuple {
        transport: Transport::Tcp,
        ..ft(4002)
    };
    h.io.to_client.clear();
    for _ in 0..10 {
        h.s.handle_client(h.now, tcp, &allocate, &mut h.io);
    }
    assert_eq!(h.io.to_client.len(), 10);
}

#[path = "events_tests.rs"]
mod events_tests;
