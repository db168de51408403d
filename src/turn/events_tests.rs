//! The events of whole allocation lives, in order, with the core driven
//! by the same fake world and clock as `server_tests.rs`.

use super::*;

const PEER_A: &str = "8.8.4.4:1";
const PEER_B: &str = "8.8.8.8:5000";

impl Harness {
    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.io.events)
    }

    fn ok(&mut self, from: FiveTuple, method: Method, attrs: Vec<&str>, c: &mut Cred) {
        let r = self.authed(
            from,
            method,
            || attrs.iter().map(|p| peer_attr(p)).collect(),
            c,
        );
        assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", error_code(&r));
    }

    fn bind(&mut self, from: FiveTuple, number: u16, peer: &str, c: &mut Cred) {
        let r = self.authed(
            from,
            METHOD_CHANNEL_BIND,
            || vec![Box::new(ProtoChannelNumber(number)), peer_attr(peer)],
            c,
        );
        assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", error_code(&r));
    }

    fn refresh(&mut self, from: FiveTuple, secs: u64, c: &mut Cred) {
        let r = self.authed(
            from,
            METHOD_REFRESH,
            || vec![Box::new(Lifetime(Duration::from_secs(secs)))],
            c,
        );
        assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", error_code(&r));
    }

    fn sweep_after(&mut self, secs: u64) -> Vec<Event> {
        self.now += Duration::from_secs(secs);
        self.s.handle_timeout(self.now, &mut self.io);
        self.take_events()
    }

    fn peer_sends(&mut self, relayed: SocketAddr, peer: &str, data: &[u8]) {
        let relay = RelayId {
            v6: false,
            port: relayed.port(),
        };
        let peer = peer.parse().unwrap();
        self.s
            .peer_datagram(self.now, relay, peer, data, &mut self.io);
    }
}

fn started(id: u64, client: FiveTuple, relayed: SocketAddr, user: &str) -> Event {
    Event::AllocationStarted {
        id,
        client,
        relayed: [Some(relayed), None],
        username: user.into(),
    }
}

fn send_indication(peer: &str, payload: &[u8]) -> Vec<u8> {
    let peer: SocketAddr = peer.parse().unwrap();
    let setters: Vec<Box<dyn Setter>> = vec![
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
        Box::new(PeerAddress {
            ip: peer.ip(),
            port: peer.port(),
        }),
        Box::new(Data(payload.to_vec())),
    ];
    let mut m = Message::new();
    m.build(&setters).unwrap();
    m.raw
}

fn channel(n: u16) -> crate::turn::allocation::ChannelNumber {
    crate::turn::allocation::ChannelNumber::new(n).unwrap()
}

fn ip(p: &str) -> std::net::IpAddr {
    p.parse::<SocketAddr>().unwrap().ip()
}

#[test]
fn a_full_allocation_life_and_its_usage() {
    let mut h = harness();
    let t0 = h.now;
    let mut c = cred("alice", "wonderland");
    let relayed = h.allocate(ft(4000), &mut c);
    assert_eq!(
        h.take_events(),
        vec![started(1, ft(4000), relayed, "alice")]
    );

    h.ok(ft(4000), METHOD_CREATE_PERMISSION, vec![PEER_A], &mut c);
    assert_eq!(
        h.take_events(),
        vec![Event::PermissionInstalled {
            allocation: 1,
            peer: ip(PEER_A),
        }]
    );
    // A refresh of what is in place is no event.
    h.ok(ft(4000), METHOD_CREATE_PERMISSION, vec![PEER_A], &mut c);
    assert_eq!(h.take_events(), vec![]);

    h.bind(ft(4000), 0x4001, PEER_B, &mut c);
    assert_eq!(
        h.take_events(),
        vec![
            Event::PermissionInstalled {
                allocation: 1,
                peer: ip(PEER_B),
            },
            Event::ChannelBound {
                allocation: 1,
                number: channel(0x4001),
                peer: PEER_B.parse().unwrap(),
            },
        ]
    );

    // Relayed traffic: counted into the allocation, never an event.
    // Client → peer: 3 + 3 bytes over the channel, 5 in a Send indication.
    let abc = [0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c', 0];
    h.s.handle_client(h.now, ft(4000), &abc, &mut h.io);
    h.s.handle_client(h.now, ft(4000), &abc, &mut h.io);
    h.send(ft(4000), &send_indication(PEER_A, b"hello"));
    // Peer → client: 4 bytes over the channel, 6 in a Data indication;
    // and a peer without permission, dropped and not counted.
    h.peer_sends(relayed, PEER_B, b"wxyz");
    h.peer_sends(relayed, PEER_A, b"world!");
    h.peer_sends(relayed, "9.9.9.9:9", b"dropped");
    assert_eq!(h.io.to_peer.len(), 3);
    assert_eq!(h.take_events(), vec![]);

    // The allocation outlives its permissions (300 s) and its channel
    // (600 s), none of them refreshed.
    h.refresh(ft(4000), 3600, &mut c);
    let refreshed = h.now;
    assert_eq!(h.sweep_after(299), vec![]);
    assert_eq!(
        h.sweep_after(2),
        vec![
            Event::PermissionRemoved {
                allocation: 1,
                peer: ip(PEER_A),
                reason: Lapse::Expired,
            },
            Event::PermissionRemoved {
                allocation: 1,
                peer: ip(PEER_B),
                reason: Lapse::Expired,
            },
        ]
    );
    assert_eq!(h.sweep_after(298), vec![]);
    assert_eq!(
        h.sweep_after(2),
        vec![Event::ChannelUnbound {
            allocation: 1,
            number: channel(0x4001),
            peer: PEER_B.parse().unwrap(),
            reason: Lapse::Expired,
        }]
    );

    h.now = refreshed + Duration::from_secs(3599);
    assert_eq!(h.sweep_after(0), vec![]);
    let ended = h.sweep_after(1);
    assert_eq!(
        ended,
        vec![Event::AllocationEnded {
            id: 1,
            client: ft(4000),
            relayed: [Some(relayed), None],
            username: "alice".into(),
            reason: EndReason::Expired,
            duration: h.now - t0,
            usage: Usage {
                bytes_to_peer: 11,
                bytes_to_client: 10,
                packets_to_peer: 3,
                packets_to_client: 2,
            },
        }]
    );
    // The username is told, as the log always did; the password never.
    assert!(!format!("{ended:?}").contains("wonderland"));
    // The core leaves the lifecycle counters to the shell.
    assert_eq!(h.stats.allocations_created.load(Ordering::Relaxed), 0);
    assert_eq!(h.stats.allocations_expired.load(Ordering::Relaxed), 0);
}

#[test]
fn an_operator_ends_an_allocation_with_its_channels_and_permissions() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    let relayed = h.allocate(ft(4000), &mut c);
    h.ok(ft(4000), METHOD_CREATE_PERMISSION, vec![PEER_A], &mut c);
    h.bind(ft(4000), 0x4002, PEER_B, &mut c);
    h.s.handle_client(
        h.now,
        ft(4000),
        &[0x40, 0x02, 0x00, 0x02, b'h', b'i', 0, 0],
        &mut h.io,
    );
    h.take_events();
    h.now += Duration::from_secs(5);
    assert_eq!(h.s.end_allocations(&EndWhich::Id(1), h.now, &mut h.io), 1);
    assert_eq!(
        h.take_events(),
        vec![
            Event::ChannelUnbound {
                allocation: 1,
                number: channel(0x4002),
                peer: PEER_B.parse().unwrap(),
                reason: Lapse::AllocationEnded,
            },
            Event::PermissionRemoved {
                allocation: 1,
                peer: ip(PEER_A),
                reason: Lapse::AllocationEnded,
            },
            Event::PermissionRemoved {
                allocation: 1,
                peer: ip(PEER_B),
                reason: Lapse::AllocationEnded,
            },
            Event::AllocationEnded {
                id: 1,
                client: ft(4000),
                relayed: [Some(relayed), None],
                username: "alice".into(),
                reason: EndReason::Operator,
                duration: Duration::from_secs(5),
                usage: Usage {
                    bytes_to_peer: 2,
                    packets_to_peer: 1,
                    ..Usage::default()
                },
            },
        ]
    );
    // Nothing is left to lapse later.
    assert_eq!(h.sweep_after(700), vec![]);
}

/// The reason of every `AllocationEnded` in `events`.
fn end_reasons(events: &[Event]) -> Vec<EndReason> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::AllocationEnded { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

#[test]
fn a_reload_that_revokes_a_user_ends_their_allocation_as_revoked() {
    let mut h = harness();
    let relayed = h.allocate(ft(4000), &mut cred("alice", "wonderland"));
    h.allocate(ft(4001), &mut cred("bob", "builder"));
    assert_eq!(
        h.take_events()[0],
        started(1, ft(4000), relayed, "alice"),
        "ids count from 1"
    );
    let mut r = rules(8);
    r.limits.revoke_on_reload = true;
    r.credentials = Credentials::new(
        REALM.into(),
        vec![Secret::new(SECRET)],
        BTreeMap::from([("bob".to_string(), Secret::new("builder"))]),
    );
    h.s.rules.store(Arc::new(r));
    let events = h.sweep_after(1);
    assert_eq!(end_reasons(&events), vec![EndReason::Revoked]);
    assert!(matches!(
        &events[..],
        [Event::AllocationEnded { id: 1, username, .. }] if username == "alice"
    ));
    assert_eq!(h.s.allocation_count(), 1);
}

#[test]
fn refresh_zero_ends_an_allocation_as_deleted_by_the_client() {
    let mut h = harness();
    let mut c = cred("alice", "wonderland");
    h.allocate(ft(4000), &mut c);
    h.take_events();
    h.refresh(ft(4000), 0, &mut c);
    assert_eq!(
        end_reasons(&h.take_events()),
        vec![EndReason::ClientDeleted]
    );
}

#[test]
fn other_ends_have_their_own_reasons() {
    // The maximum age, however recently refreshed.
    let mut r = rules(8);
    r.limits.max_allocation_age = Some(Duration::from_secs(10));
    let mut h = harness_with(r, 50000..=50009);
    let mut c = cred("alice", "wonderland");
    h.allocate(ft(4000), &mut c);
    h.now += Duration::from_secs(9);
    h.refresh(ft(4000), 600, &mut c);
    assert_eq!(end_reasons(&h.sweep_after(0)), vec![]);
    assert_eq!(end_reasons(&h.sweep_after(1)), vec![EndReason::MaxAge]);

    // A TCP connection that closes.
    let tcp = FiveTuple {
        transport: Transport::Tcp,
        ..ft(4001)
    };
    h.allocate(tcp, &mut cred("bob", "builder"));
    h.take_events();
    h.s.connection_closed(h.now, &tcp, &mut h.io);
    assert_eq!(
        end_reasons(&h.take_events()),
        vec![EndReason::ConnectionClosed]
    );
}
