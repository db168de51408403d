//! TURN over UDP against the real binary on loopback, with a raw client
//! (exact error codes) and webrtc-rs's `turn::client` (an independent
//! implementation).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::{auth_section, base_config, Turnkey, SECRET};

fn server(name: &str, extra: &str) -> Turnkey {
    Turnkey::start(name, &format!("{}{}", base_config(extra), auth_section()))
}

fn rest_credential(user: &str, ttl: i64) -> (String, String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let c = turnkey::turn::auth::mint(SECRET, user, (now + ttl - 3600).max(0) as u64, 3600);
    (c.username, c.password)
}

#[test]
fn binding_returns_the_mapped_address() {
    let tk = server("binding", "");
    let c = Raw::new(tk.turn, "", "");
    assert_eq!(c.binding(), c.local());
    assert!(tk.metric("turnkey_stun_binding_requests_total") >= 1.0);
}

/// Sends until the other side receives it (permissions and channels take
/// effect on the server when their answers arrive, and UDP may drop).
fn deliver(send: impl Fn(), recv: &Raw, want: &[u8]) -> (Option<SocketAddr>, Option<u16>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        send();
        if let Some((peer, ch, data)) = recv.recv_data(Duration::from_millis(300)) {
            assert_eq!(data, want);
            return (peer, ch);
        }
    }
    panic!("data never arrived");
}

#[test]
fn two_clients_relay_through_indications_and_channels() {
    let tk = server("relay", "");
    let mut a = Raw::new(tk.turn, "alice", "wonderland-rabbit");
    let mut b = Raw::new(tk.turn, "bob", "builder-of-things");
    let ra = a.allocate().expect("alice allocates");
    let rb = b.allocate().expect("bob allocates");
    assert_ne!(ra, rb);
    assert_eq!(ra.ip().to_string(), "127.0.0.1");
    a.permit(rb).expect("permission to bob's relay");
    b.permit(ra).expect("permission to alice's relay");

    // Send indication out, Data indication in.
    let (from, ch) = deliver(|| a.send_indication(rb, b"ping"), &b, b"ping");
    assert_eq!((from, ch), (Some(ra), None));
    let (from, _) = deliver(|| b.send_indication(ra, b"pong"), &a, b"pong");
    assert_eq!(from, Some(rb));

    // Channels both ways: ChannelData out and in.
    a.bind_channel(0x4001, rb).expect("alice binds");
    b.bind_channel(0x4002, ra).expect("bob binds");
    let (_, ch) = deliver(
        || a.channel_data(0x4001, b"over a channel"),
        &b,
        b"over a channel",
    );
    assert_eq!(ch, Some(0x4002), "bob receives on his channel for alice");
    let (_, ch) = deliver(|| b.channel_data(0x4002, b"and back"), &a, b"and back");
    assert_eq!(ch, Some(0x4001));

    let m = |s: &str| tk.metric(s);
    assert!(
        m(
            r#"turnkey_turn_relayed_packets_total{direction="client_to_peer",framing="indication",transport="udp"}"#
        ) >= 2.0
    );
    assert!(
        m(
            r#"turnkey_turn_relayed_packets_total{direction="peer_to_client",framing="indication",transport="udp"}"#
        ) >= 2.0
    );
    assert!(
        m(
            r#"turnkey_turn_relayed_packets_total{direction="client_to_peer",framing="channel_data",transport="udp"}"#
        ) >= 2.0
    );
    assert!(
        m(
            r#"turnkey_turn_relayed_packets_total{direction="peer_to_client",framing="channel_data",transport="udp"}"#
        ) >= 2.0
    );
    assert_eq!(m("turnkey_turn_allocations"), 2.0);
}

/// Two relay-only peers on one server send to each other's relayed
/// addresses: the relay hands those datagrams over in memory
/// (`relay/shortcut.rs`), between shards too, and the receiving
/// allocation's permissions still decide what gets through.
#[test]
fn relay_to_relay_is_handed_over_in_memory_across_shards_and_permissions_hold() {
    // Four shards: the kernel spreads 16 clients' source ports over them,
    // so most pairs span two shards (all 8 on one shard: odds 4^-15).
    let cfg = format!(
        "{}{}",
        base_config("").replace("threads = 1", "threads = 4"),
        auth_section()
    );
    let tk = Turnkey::start("handover", &cfg);
    let handed = || tk.metric("turnkey_turn_handed_over_packets_total");
    let mut pairs = Vec::new();
    for _ in 0..8 {
        let mut a = Raw::new(tk.turn, "alice", "wonderland-rabbit");
        let mut b = Raw::new(tk.turn, "bob", "builder-of-things");
        let ra = a.allocate().expect("alice allocates");
        let rb = b.allocate().expect("bob allocates");
        a.permit(rb).expect("alice permits bob's relay");
        b.permit(ra).expect("bob permits alice's relay");
        a.bind_channel(0x4001, rb).expect("alice binds");
        b.bind_channel(0x4002, ra).expect("bob binds");
        pairs.push((a, ra, b, rb));
    }
    for (a, ra, b, rb) in &pairs {
        // Each side hears the other on its own channel for the other's
        // relayed address: the sender is that address, as over the kernel.
        let (_, ch) = deliver(|| a.channel_data(0x4001, b"a to b"), b, b"a to b");
        assert_eq!(ch, Some(0x4002));
        let (_, ch) = deliver(|| b.channel_data(0x4002, b"b to a"), a, b"b to a");
        assert_eq!(ch, Some(0x4001));
        // A Send indication to a relayed address takes the same way.
        let (from, _) = deliver(|| a.send_indication(*rb, b"indicated"), b, b"indicated");
        assert_eq!(from, None, "bob has a channel for alice: ChannelData");
        let _ = ra;
    }
    assert!(handed() >= 24.0, "handed over: {}", handed());

    // Quiet: every shard asleep, one datagram, sent once, must arrive well
    // within the shard's 1 s poll timeout, so the post itself woke the
    // receiving shard. Ten rounds, every pair, both ways.
    for round in 0..10 {
        std::thread::sleep(Duration::from_millis(30));
        for (i, (a, _, b, _)) in pairs.iter().enumerate() {
            for (from, to, ch) in [(a, b, 0x4001), (b, a, 0x4002)] {
                let sent = Instant::now();
                from.channel_data(ch, b"quiet");
                let got = to.recv_data(Duration::from_millis(250));
                assert!(
                    matches!(&got, Some((_, _, d)) if d == b"quiet"),
                    "round {round}, pair {i}: {got:?} after {:?}",
                    sent.elapsed()
                );
            }
        }
    }

    // A third allocation that gave alice no permission hears nothing of
    // her, and its core counts the drops.
    let (a, _, _, _) = &mut pairs[0];
    let mut c = Raw::new(tk.turn, "bob", "builder-of-things");
    let rc = c.allocate().expect("carol allocates");
    a.permit(rc).expect("alice permits carol");
    a.bind_channel(0x4003, rc).expect("alice binds to carol");
    let no_perm = r#"turnkey_turn_dropped_packets_total{reason="no_permission"}"#;
    let (before, handed_before) = (tk.metric(no_perm), handed());
    for _ in 0..5 {
        a.channel_data(0x4003, b"unwanted");
    }
    assert!(c.recv_data(Duration::from_millis(500)).is_none());
    let deadline = Instant::now() + Duration::from_secs(5);
    while tk.metric(no_perm) < before + 5.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tk.metric(no_perm), before + 5.0);
    assert_eq!(handed(), handed_before + 5.0);
    // Once carol permits alice, it flows.
    c.permit(pairs[0].1).expect("carol permits alice");
    let a = &pairs[0].0;
    let (from, _) = deliver(|| a.channel_data(0x4003, b"welcome"), &c, b"welcome");
    assert_eq!(
        from,
        Some(pairs[0].1),
        "a Data indication from alice's relay"
    );
}

#[test]
fn wrong_password_and_expired_rest_credential_get_401() {
    let tk = server("auth401", "");
    let mut c = Raw::new(tk.turn, "alice", "not-the-password");
    assert_eq!(c.allocate(), Err(401));
    let (user, pass) = rest_credential("carol", -10);
    let mut c = Raw::new(tk.turn, &user, &pass);
    assert_eq!(c.allocate(), Err(401));
    let (user, pass) = rest_credential("carol", 600);
    let mut c = Raw::new(tk.turn, &user, &pass);
    assert!(c.allocate().is_ok(), "a valid REST credential allocates");
    assert_eq!(
        tk.metric(r#"turnkey_turn_auth_failures_total{reason="bad_credential"}"#),
        1.0
    );
    assert_eq!(
        tk.metric(r#"turnkey_turn_auth_failures_total{reason="expired"}"#),
        1.0
    );
}

#[test]
fn stale_nonce_gets_438_and_a_fresh_nonce_works() {
    let tk = server("nonce", "nonce_lifetime_secs = 1");
    let mut c = Raw::new(tk.turn, "alice", "wonderland-rabbit");
    c.allocate().expect("allocates");
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        match c.request_once(stun::message::METHOD_REFRESH, vec![]) {
            Err(438) => break 438,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("expected 438, got {:?}", other.map(|_| ())),
        }
    };
    assert_eq!(code, 438);
    // The 438 carried a new nonce; the client retries with it.
    c.nonce = None;
    c.refresh(600).expect("refresh with a fresh nonce");
}

#[test]
fn refresh_zero_frees_the_allocation_and_its_port() {
    let tk = server("refresh0", "relay_port_min = 61000\nrelay_port_max = 61000");
    let mut a = Raw::new(tk.turn, "alice", "wonderland-rabbit");
    let relayed = a.allocate().expect("allocates");
    assert_eq!(relayed.port(), 61000);
    let mut b = Raw::new(tk.turn, "bob", "builder-of-things");
    assert_eq!(b.allocate(), Err(508), "the only port is taken");
    a.refresh(0).expect("refresh 0");
    assert_eq!(tk.metric("turnkey_turn_allocations"), 0.0);
    // The socket is closed: the port can be bound again, then reused.
    drop(std::net::UdpSocket::bind(relayed).expect("port is free again"));
    assert_eq!(b.allocate().map(|r| r.port()), Ok(61000));
    // The old 5-tuple has no allocation any more.
    assert_eq!(a.refresh(600).map(|_| ()), Err(437));
}

#[test]
fn permissions_to_private_and_metadata_addresses_get_403() {
    // The relay is on 127.0.0.2, so 127.0.0.1 is not one of our relays.
    let tk = server("policy", r#"relay_ip = "127.0.0.2""#);
    let mut c = Raw::new(tk.turn, "alice", "wonderland-rabbit");
    let relayed = c.allocate().expect("allocates");
    assert_eq!(relayed.ip().to_string(), "127.0.0.2");
    for peer in [
        "127.0.0.1:9",
        "169.254.169.254:80",
        "10.1.2.3:5000",
        "192.168.0.1:1",
    ] {
        assert_eq!(
            c.permit(peer.parse().unwrap()).map(|_| ()),
            Err(403),
            "{peer}"
        );
    }
    assert!(
        c.permit(relayed).is_ok(),
        "our own relay address is allowed"
    );
    assert_eq!(
        tk.metric(r#"turnkey_turn_peer_denied_total{reason="loopback"}"#),
        1.0
    );
    assert_eq!(
        tk.metric(r#"turnkey_turn_peer_denied_total{reason="metadata"}"#),
        1.0
    );
    assert_eq!(
        tk.metric(r#"turnkey_turn_peer_denied_total{reason="private"}"#),
        2.0
    );
}

#[test]
fn garbage_is_dropped_and_the_server_keeps_serving() {
    let tk = server("garbage", "");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = 0x1234_5678_u64;
    for i in 0..2000u32 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let len = (rng % 120) as usize;
        let mut d: Vec<u8> = (0..len).map(|j| (rng >> (j % 56)) as u8).collect();
        if let Some(b) = d.first_mut() {
            // Aim at both parsers: STUN (00..03) and ChannelData (40..7F).
            *b = if i % 2 == 0 {
                *b & 0x03
            } else {
                0x40 | (*b & 0x3F)
            };
        }
        if d.len() >= 8 && i % 4 == 0 {
            d[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
        }
        let _ = sock.send_to(&d, tk.turn);
    }
    let c = Raw::new(tk.turn, "", "");
    assert_eq!(c.binding(), c.local(), "still answering");
    assert!(tk.metric(r#"turnkey_turn_dropped_packets_total{reason="malformed"}"#) > 0.0);
}

async fn turn_client(server: SocketAddr, user: &str, pass: &str) -> turn::client::Client {
    let conn = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let cfg = turn::client::ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: user.into(),
        password: pass.into(),
        realm: "turnkey".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    };
    let c = turn::client::Client::new(cfg).await.expect("client");
    c.listen().await.expect("listen");
    c
}

/// webrtc-rs's own TURN client, one with a static user and one with a REST
/// credential: allocate, then exchange data (the client creates
/// permissions and binds channels by itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_rs_turn_clients_exchange_data() {
    use webrtc_util::Conn;
    let tk = server("webrtc-rs", "");
    let (user, pass) = rest_credential("dave", 600);
    let a = turn_client(tk.turn, "alice", "wonderland-rabbit").await;
    let b = turn_client(tk.turn, &user, &pass).await;
    let ra = a.allocate().await.expect("static user allocates");
    let rb = b.allocate().await.expect("REST user allocates");
    let addr_a = ra.local_addr().unwrap();
    let addr_b = rb.local_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got_a = false;
    let mut got_b = false;
    let mut buf = vec![0u8; 1500];
    let mut i = 0u32;
    while !(got_a && got_b) {
        assert!(
            Instant::now() < deadline,
            "no data exchanged (a={got_a}, b={got_b})"
        );
        i += 1;
        ra.send_to(format!("from a {i}").as_bytes(), addr_b)
            .await
            .expect("a sends");
        rb.send_to(format!("from b {i}").as_bytes(), addr_a)
            .await
            .expect("b sends");
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(200), rb.recv_from(&mut buf)).await
        {
            assert!(buf[..n].starts_with(b"from a "));
            assert_eq!(from, addr_a);
            got_b = true;
        }
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(200), ra.recv_from(&mut buf)).await
        {
            assert!(buf[..n].starts_with(b"from b "));
            assert_eq!(from, addr_b);
            got_a = true;
        }
    }
    // Keep sending until the client has moved to channels.
    let deadline = Instant::now() + Duration::from_secs(10);
    let series = r#"turnkey_turn_relayed_packets_total{direction="client_to_peer",framing="channel_data",transport="udp"}"#;
    loop {
        ra.send_to(b"more", addr_b).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(100), rb.recv_from(&mut buf)).await;
        if tk.metric(series) > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "turn::client never used a channel"
        );
    }
    // Before its channel was bound the client sent Send indications. (Its
    // peer had bound a channel by the time data arrived, so Data
    // indications are exercised by the raw-client test above.)
    let sends = r#"turnkey_turn_relayed_packets_total{direction="client_to_peer",framing="indication",transport="udp"}"#;
    assert!(tk.metric(sends) > 0.0, "no Send indication relayed");
    let _ = ra.close().await;
    let _ = rb.close().await;
    a.close().await.ok();
    b.close().await.ok();
}
