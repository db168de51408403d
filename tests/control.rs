//! The control handle seen from outside: what a SIGHUP changes (every key
//! is applied or logged as needing a restart), and a stop that leaves no
//! task behind, against the real binary.

mod common;

use std::time::{Duration, Instant};

use common::stream::StreamTurn;
use common::{auth_section, base_config, Turnkey};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as Ws;

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(tk: &Turnkey) -> WsStream {
    tokio_tungstenite::connect_async(format!("ws://{}/ws", tk.http))
        .await
        .expect("ws connect")
        .0
}

/// The next message of type `ty`, skipping others.
async fn next_of(s: &mut WsStream, ty: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, s.next())
            .await
            .unwrap_or_else(|_| panic!("no {ty} in time"))
            .expect("open")
            .expect("ok");
        if let Ws::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).expect("json");
            if v["type"] == ty || v["type"] == "full" || v["type"] == "error" {
                return v;
            }
        }
    }
}

fn wait_log(tk: &Turnkey, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tk.log_contains(needle) {
        assert!(Instant::now() < deadline, "no log line with {needle:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The test config with `http` lines in place of `http.listen`, lines for
/// `turn`, and more sections after `auth`.
fn config(http: &str, turn: &str, more: &str) -> String {
    let base = base_config(turn).replacen("listen = \"127.0.0.1:0\"\n", http, 1);
    format!("{base}{}{more}", auth_section())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_reloadable_keys_and_names_the_ones_needing_a_restart() {
    let tk = Turnkey::start("sighup-keys", &config("listen = \"127.0.0.1:0\"\n", "", ""));
    let ice = |tk: &Turnkey| -> serde_json::Value {
        let (status, body) = tk.get("/api/ice-servers");
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("json")
    };
    let before = ice(&tk);
    assert_eq!(before["ttl"], 86400);
    assert!(before["iceServers"][0]["urls"][0]
        .as_str()
        .unwrap()
        .starts_with("stun:127.0.0.1:"));

    // Three peers in a room of two: the third is turned away.
    let mut peers = Vec::new();
    for _ in 0..3 {
        let mut p = ws(&tk).await;
        p.send(Ws::text(r#"{"type":"join","room":"grow"}"#))
            .await
            .unwrap();
        let answer = next_of(&mut p, "joined").await;
        peers.push((p, answer["type"].clone()));
    }
    let kinds: Vec<_> = peers.iter().map(|(_, t)| t.as_str().unwrap()).collect();
    assert_eq!(kinds, ["joined", "joined", "full"]);

    std::fs::write(
        &tk.config_path,
        config(
            // Another address needs a restart; the running one stays.
            "listen = \"127.0.0.1:1\"\npublic_host = \"turn.example\"\n",
            "tcp_unauth_per_ip = 1",
            "[signaling]\nroom_capacity = 3\n",
        )
        .replace("[auth]\n", "[auth]\nrest_ttl_secs = 600\n"),
    )
    .unwrap();
    tk.signal(libc::SIGHUP);
    wait_log(&tk, "configuration reloaded");
    wait_log(&tk, "restart needed: http.listen");
    assert!(
        !tk.log_contains("restart needed: auth") && !tk.log_contains("restart needed: signaling"),
        "only http.listen needs a restart"
    );

    // http.public_host and auth.rest_ttl_secs: the next grant.
    let after = ice(&tk);
    assert_eq!(after["ttl"], 600);
    let turn = &after["iceServers"][1];
    assert!(
        turn["urls"][0]
            .as_str()
            .unwrap()
            .starts_with("turn:turn.example:"),
        "{after}"
    );
    let expiry: u64 = turn["username"]
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(expiry.abs_diff(turnkey::ice::unix_now() + 600) <= 5);

    // signaling.room_capacity: a third peer now gets in.
    let mut third = ws(&tk).await;
    third
        .send(Ws::text(r#"{"type":"join","room":"grow"}"#))
        .await
        .unwrap();
    assert_eq!(next_of(&mut third, "joined").await["type"], "joined");

    // turn.tcp_unauth_per_ip = 1: a second connection without an
    // allocation from this address is refused.
    let refused = r#"turnkey_stream_connections_total{result="refused_over_limit"}"#;
    assert_eq!(tk.metric(refused), 0.0);
    let tcp = tk.tcp.unwrap();
    let _first = tokio::net::TcpStream::connect(tcp).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tk.metric(r#"turnkey_stream_connections_total{result="accepted"}"#) < 1.0 {
        assert!(Instant::now() < deadline, "first connection never accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _second = tokio::net::TcpStream::connect(tcp).await.unwrap();
    while tk.metric(refused) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the new per-IP cap did not apply"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // http.listen: still served where it was.
    assert_eq!(tk.get("/healthz").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_at_once_and_leaves_no_task() {
    for round in 0..3 {
        let mut tk = Turnkey::start(
            &format!("stop-{round}"),
            &format!("{}{}", base_config(""), auth_section()),
        );
        // Live: a joined WebSocket peer, an unjoined one, a TURN/TCP
        // allocation, an idle TCP connection and an idle HTTP keep-alive.
        let mut joined = ws(&tk).await;
        joined
            .send(Ws::text(r#"{"type":"join","room":"live"}"#))
            .await
            .unwrap();
        next_of(&mut joined, "joined").await;
        let mut unjoined = ws(&tk).await;
        let tcp = tokio::net::TcpStream::connect(tk.tcp.unwrap())
            .await
            .unwrap();
        let mut turn = StreamTurn::new(tcp, "alice", "wonderland-rabbit");
        turn.allocate().await.expect("allocates over TCP");
        let _idle = tokio::net::TcpStream::connect(tk.tcp.unwrap())
            .await
            .unwrap();
        let mut keepalive = tokio::net::TcpStream::connect(tk.http).await.unwrap();
        use tokio::io::AsyncWriteExt;
        keepalive
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();

        tk.signal(libc::SIGTERM);
        wait_log(&tk, "SIGTERM: draining");
        assert!(
            tk.wait_exit(Duration::from_millis(300)).is_none(),
            "the first SIGTERM drains: live calls keep it up"
        );
        let stopped = Instant::now();
        tk.signal(libc::SIGTERM);
        let status = tk
            .wait_exit(Duration::from_secs(3))
            .expect("exits after the second SIGTERM");
        let took = stopped.elapsed();
        assert!(status.success(), "{status}");
        assert!(took < Duration::from_secs(1), "stop took {took:?}");
        wait_log(&tk, "stopped: 0 tasks alive");
        // The WebSocket peers were told why.
        for s in [&mut joined, &mut unjoined] {
            let end = loop {
                match tokio::time::timeout(Duration::from_secs(2), s.next()).await {
                    Ok(Some(Ok(Ws::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
                    Ok(Some(Ok(_))) => continue,
                    other => panic!("no close frame: {other:?}"),
                }
            };
            assert_eq!(end, Some(1001));
        }
    }
}
