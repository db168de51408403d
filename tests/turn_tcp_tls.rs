//! TURN over TCP and TLS, and the one port that serves HTTPS, WSS and
//! TURN over TLS, against the real binary on loopback.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::stream::{
    https_healthz, relay_both_ways, test_pki, tls_connect, tls_setup, udp_side, ws_join,
    StreamTurn, TestPki,
};
use common::{auth_section, base_config, Turnkey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// turnkey with a TLS listener on a test certificate.
fn tls_server(name: &str, turn_extra: &str) -> (Turnkey, TestPki, std::path::PathBuf) {
    let (pki, dir, tls) = tls_setup(name, "turnkey test leaf");
    let cfg = format!(
        "{}{}{tls}handshake_timeout_ms = 1000\n",
        base_config(turn_extra),
        auth_section(),
    );
    (Turnkey::start(name, &cfg), pki, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_over_tcp_relays_and_dies_with_its_connection() {
    let tk = Turnkey::start("tcp", &format!("{}{}", base_config(""), auth_section()));
    let tcp_addr = tk.tcp.expect("TCP listener");
    let tcp = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    let mut a = StreamTurn::new(tcp, "alice", "wonderland-rabbit");
    let ra = a.allocate().await.expect("allocates over TCP");
    let (mut b, rb) = udp_side(&tk);
    relay_both_ways(&mut a, ra, &mut b, rb).await;
    let series = r#"turnkey_turn_relayed_packets_total{direction="peer_to_client",framing="channel_data",transport="tcp"}"#;
    assert!(tk.metric(series) >= 1.0);
    assert_eq!(tk.metric("turnkey_turn_allocations"), 2.0);
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tk.metric("turnkey_turn_allocations") != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the TCP allocation outlived its connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_port_serves_https_wss_and_turn_over_tls() {
    let (tk, pki, _) = tls_server("one-port", "");
    let port = tk.tls.expect("TLS listener");

    // HTTPS.
    let body = https_healthz(&pki, port).await;
    assert!(
        body.starts_with("HTTP/1.1 200") && body.ends_with("ok\n"),
        "{body}"
    );

    // WSS signaling on the same port.
    let tls = tls_connect(&pki, port, &[b"http/1.1"]).await;
    let joined = ws_join(tls, &format!("wss://localhost:{}/ws", port.port()), "tls").await;
    assert_eq!(joined["type"], "joined");
    let urls = joined["iceServers"][1]["urls"].as_array().unwrap();
    assert!(
        urls.iter()
            .any(|u| u == &format!("turns:localhost:{}?transport=tcp", port.port())),
        "{urls:?}"
    );

    // TURN over TLS on the same port, relaying to a UDP client.
    let tls = tls_connect(&pki, port, &[]).await;
    let mut a = StreamTurn::new(tls, "alice", "wonderland-rabbit");
    let ra = a.allocate().await.expect("allocates over TLS");
    let (mut b, rb) = udp_side(&tk);
    relay_both_ways(&mut a, ra, &mut b, rb).await;
    let series = r#"turnkey_turn_relayed_packets_total{direction="client_to_peer",framing="channel_data",transport="tls"}"#;
    assert!(tk.metric(series) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_works_on_the_turn_tcp_port() {
    let tk = Turnkey::start(
        "tcp-http",
        &format!("{}{}", base_config("tcp_http = \"serve\""), auth_section()),
    );
    let (status, body) = common::http_get(tk.tcp.unwrap(), "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_next_while_tls_allocations_relay() {
    let (tk, pki, pki_dir) = tls_server("cert-reload", "");
    let port = tk.tls.unwrap();
    let tls = tls_connect(&pki, port, &[]).await;
    let first_cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let mut a = StreamTurn::new(tls, "alice", "wonderland-rabbit");
    let ra = a.allocate().await.expect("allocates over TLS");
    let (mut b, rb) = udp_side(&tk);
    relay_both_ways(&mut a, ra, &mut b, rb).await;

    // A new certificate from a new CA, written over the old files.
    let next = test_pki("turnkey second leaf");
    next.write(&pki_dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    let second_cert = loop {
        let tcp = tokio::net::TcpStream::connect(port).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        if let Ok(s) = next.connector(&[]).connect(name, tcp).await {
            break s.get_ref().1.peer_certificates().unwrap()[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(first_cert, second_cert);
    // The old TLS connection and its allocation still relay.
    a.channel_data(0x4001, b"still here").await;
    let got = b
        .recv_data(Duration::from_secs(2))
        .expect("relayed after the reload");
    assert_eq!(got.2, b"still here");
    assert!(tk.log_contains("TLS certificate files changed: reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_and_half_open_connections_stays_within_limits() {
    let extra = "tcp_unauth_per_ip = 16\ntcp_unauth_total = 64\ntcp_unauth_timeout_secs = 2";
    let (tk, pki, _) = tls_server("flood", extra);
    let (tcp_port, tls_port) = (tk.tcp.unwrap(), tk.tls.unwrap());
    // 150 idle TCP connections and 150 TLS connections that never say hello.
    let mut held = Vec::new();
    for i in 0..300 {
        let target = if i % 2 == 0 { tcp_port } else { tls_port };
        if let Ok(s) = tokio::net::TcpStream::connect(target).await {
            held.push(s);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    // 16 per address for each listener kind: TCP and TLS count apart.
    while tk.metric(r#"turnkey_stream_connections_total{result="refused_over_limit"}"#) < 268.0 {
        assert!(Instant::now() < deadline, "the per-IP cap did not hold");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        tk.metric(r#"turnkey_stream_connections_total{result="accepted"}"#),
        32.0
    );
    // A legitimate client from another address still allocates and relays.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = sock.connect(tls_port).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = pki
        .connector(&[])
        .connect(name, tcp)
        .await
        .expect("TLS during the flood");
    let mut a = StreamTurn::new(tls, "alice", "wonderland-rabbit");
    let ra = a.allocate().await.expect("allocates during the flood");
    let (mut b, rb) = udp_side(&tk);
    relay_both_ways(&mut a, ra, &mut b, rb).await;
    // Idle and half-open connections are closed after their deadlines.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tk.metric(r#"turnkey_stream_closed_total{reason="timeout"}"#)
        + tk.metric(r#"turnkey_stream_closed_total{reason="handshake_failed"}"#)
        < 16.0
    {
        assert!(
            Instant::now() < deadline,
            "idle connections were not timed out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss = tk.metric("turnkey_process_resident_memory_bytes");
    assert!(rss > 0.0 && rss < 200e6, "RSS {rss}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_from_a_balancer_gives_the_real_client_address() {
    let tk = Turnkey::start(
        "proxy",
        &format!(
            "{}{}",
            base_config("proxy_protocol_from = [\"127.0.0.1/32\"]"),
            auth_section()
        ),
    );
    let mut tcp = tokio::net::TcpStream::connect(tk.tcp.unwrap())
        .await
        .unwrap();
    let real: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    tcp.write_all(&turnkey::proxy_protocol::encode(real, tk.tcp.unwrap()))
        .await
        .unwrap();
    let mut c = StreamTurn::new(tcp, "", "");
    let m = c
        .request(stun::message::METHOD_BINDING, Vec::new)
        .await
        .expect("binding");
    let mut x = stun::xoraddr::XorMappedAddress::default();
    stun::message::Getter::get_from(&mut x, &m).unwrap();
    assert_eq!(SocketAddr::new(x.ip, x.port), real);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_client_that_stops_reading_is_cut_off() {
    let tk = Turnkey::start(
        "slow-reader",
        &format!("{}{}", base_config(""), auth_section()),
    );
    let tcp = tokio::net::TcpStream::connect(tk.tcp.unwrap())
        .await
        .unwrap();
    let mut a = StreamTurn::new(tcp, "alice", "wonderland-rabbit");
    let ra = a.allocate().await.expect("allocates");
    let (mut b, rb) = udp_side(&tk);
    relay_both_ways(&mut a, ra, &mut b, rb).await;
    // Now a never reads again while b floods it.
    let payload = vec![7u8; 1200];
    let deadline = Instant::now() + Duration::from_secs(20);
    while tk.metric("turnkey_turn_stream_overflows_total") < 1.0 {
        for _ in 0..2000 {
            b.channel_data(0x4002, &payload);
        }
        assert!(
            Instant::now() < deadline,
            "a client that stopped reading was never cut off"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its allocation goes with its connection; b's stays.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tk.metric("turnkey_turn_allocations") != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the cut-off connection kept its allocation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Regression for the quiet-allocation bug: the reader armed its read
/// deadline from the "authenticated" flag before the shard had handled the
/// Allocate, so a client that then stayed quiet was cut at the
/// pre-authentication deadline (10 s). A race, so several connections per
/// transport, all quiet for 60 s, with the default deadlines; and the
/// pre-authentication deadline still cuts those that never allocate, quiet
/// or busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_tcp_and_tls_allocations_outlive_the_preauth_deadline() {
    let (tk, pki, _) = tls_server("quiet", "");
    let (tcp_port, tls_port) = (tk.tcp.unwrap(), tk.tls.unwrap());
    let mut tcp_clients = Vec::new();
    let mut tls_clients = Vec::new();
    for i in 0..5 {
        let tcp = tokio::net::TcpStream::connect(tcp_port).await.unwrap();
        let mut a = StreamTurn::new(tcp, "alice", "wonderland-rabbit");
        let ra = a.allocate().await.expect("allocates over TCP");
        tcp_clients.push((a, ra));
        // With and without ALPN: both routes lead to the same reader.
        let alpn: &[&[u8]] = if i % 2 == 0 { &[b"stun.turn"] } else { &[] };
        let tls = tls_connect(&pki, tls_port, alpn).await;
        let mut a = StreamTurn::new(tls, "alice", "wonderland-rabbit");
        let ra = a.allocate().await.expect("allocates over TLS");
        tls_clients.push((a, ra));
    }
    // Connections that never allocate: one silent, one busy with Bindings.
    let opened = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(tcp_port).await.unwrap();
    silent.write_all(&[0x00]).await.unwrap();
    let busy = tokio::net::TcpStream::connect(tcp_port).await.unwrap();
    let busy = tokio::spawn(async move {
        let mut c = StreamTurn::new(busy, "", "");
        loop {
            // Ok while the connection serves; the first failure is the cut.
            let alive =
                tokio::time::timeout(Duration::from_secs(3), c.read_frame_after_binding()).await;
            if !matches!(alive, Ok(true)) {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut byte = [0u8; 1];
    let eof = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut byte)).await;
    assert!(
        matches!(eof, Ok(Ok(0)) | Ok(Err(_))),
        "a connection that never allocated was not closed: {eof:?}"
    );
    let cut = opened.elapsed();
    assert!(
        cut >= Duration::from_secs(9) && cut < Duration::from_secs(13),
        "silent unauthenticated connection cut after {cut:?}, not ~10 s"
    );
    let busy_cut = busy.await.unwrap() - opened;
    assert!(
        busy_cut >= Duration::from_secs(9) && busy_cut < Duration::from_secs(14),
        "busy unauthenticated connection cut after {busy_cut:?}, not ~10 s"
    );

    // The allocated ones have said nothing since their Allocate.
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(opened.elapsed())).await;
    assert_eq!(tk.metric("turnkey_turn_allocations"), 10.0);
    for (i, (a, ra)) in tcp_clients.iter_mut().enumerate() {
        let granted = a
            .refresh(600)
            .await
            .unwrap_or_else(|c| panic!("TCP {i}: refresh {c}"));
        assert_eq!(granted, Duration::from_secs(600));
        let (mut b, rb) = udp_side(&tk);
        relay_both_ways(a, *ra, &mut b, rb).await;
    }
    for (i, (a, ra)) in tls_clients.iter_mut().enumerate() {
        let granted = a
            .refresh(600)
            .await
            .unwrap_or_else(|c| panic!("TLS {i}: refresh {c}"));
        assert_eq!(granted, Duration::from_secs(600));
        let (mut b, rb) = udp_side(&tk);
        relay_both_ways(a, *ra, &mut b, rb).await;
    }
    assert_eq!(
        tk.metric(r#"turnkey_stream_closed_total{reason="timeout"}"#),
        2.0,
        "only the two unauthenticated connections timed out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_allocation_that_ends_closes_its_connection() {
    let tk = Turnkey::start("tcp-end", &format!("{}{}", base_config(""), auth_section()));
    let tcp = tokio::net::TcpStream::connect(tk.tcp.unwrap())
        .await
        .unwrap();
    let mut a = StreamTurn::new(tcp, "alice", "wonderland-rabbit");
    a.allocate().await.expect("allocates over TCP");
    assert_eq!(
        a.refresh(0).await,
        Ok(Duration::ZERO),
        "the answer comes first"
    );
    assert!(
        a.read_frame(Duration::from_secs(5)).await.is_none(),
        "then the connection closes"
    );
    assert_eq!(tk.metric("turnkey_turn_allocations"), 0.0);
}
