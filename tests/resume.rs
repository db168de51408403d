//! Resuming a signaling session after a network change (issue 27), against
//! the real binary over real sockets: a peer's TCP connection is reset
//! (SO_LINGER 0, no close frame), and a new socket from another loopback
//! address presents the resume token; or the old socket is still open and
//! is taken over. Memory backend, and two nodes on one Redis with the
//! socket coming back through the other node; every wait has a deadline,
//! and the only sleeps are the gaps the scenario names (the 5 s a phone is
//! away).

mod common;
#[allow(dead_code)]
#[path = "../src/signal/redis_server.rs"]
mod redis_server;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::ws::{join, recv, recv_within, send, Ws, WAIT};
use common::{base_config, require, test_dir, Turnkey};
use futures_util::StreamExt;
use redis_server::RedisServer;
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

fn memory_node(name: &str, signaling: &str) -> Turnkey {
    Turnkey::start(name, &base_config(&format!("[signaling]\n{signaling}")))
}

fn redis_node(name: &str, redis: &RedisServer, signaling: &str) -> Turnkey {
    let extra = format!(
        "[signaling]\nbackend = \"redis\"\nredis_url = \"{}\"\n{signaling}",
        redis.url()
    );
    let tk = Turnkey::start(name, &base_config(&extra));
    wait_until(&tk, "the Redis backend to be up", |tk| {
        tk.get("/readyz") == (200, "ready\n".to_string())
    });
    tk
}

/// A socket from `ip` (any 127/8 address is this host's).
async fn connect_from(tk: &Turnkey, ip: &str) -> Ws {
    let ip: IpAddr = ip.parse().expect("ip");
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(ip, 0)).expect("bind");
    let stream = tokio::time::timeout(WAIT, socket.connect(tk.http))
        .await
        .expect("connect in time")
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let url = format!("ws://{}/ws", tk.http);
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    ws
}

/// Cuts the connection as a network change does: a TCP reset, no close
/// frame.
fn cut(ws: Ws) {
    if let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
        socket2::SockRef::from(tcp)
            .set_linger(Some(Duration::ZERO))
            .expect("linger 0");
    }
    drop(ws);
}

fn text<'a>(m: &'a Value, field: &str) -> &'a str {
    m[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {m}"))
}

/// Two peers in `room`, the first told of the second: (a, joined a, b,
/// joined b).
async fn pair(tk: &Turnkey, room: &str) -> (Ws, Value, Ws, Value) {
    let mut a = connect_from(tk, "127.0.0.1").await;
    let mut b = connect_from(tk, "127.0.0.1").await;
    let ja = join(&mut a, room).await;
    let jb = join(&mut b, room).await;
    assert_eq!(recv(&mut a).await["type"], "peer-joined");
    (a, ja, b, jb)
}

fn wait_until(tk: &Turnkey, what: &str, cond: impl Fn(&Turnkey) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond(tk) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the server noticed `n` lost peers.
fn wait_parked(tk: &Turnkey, n: f64) {
    wait_until(tk, "the lost peers to be parked", |tk| {
        tk.metric("turnkey_signaling_parked_peers") == n
    });
}

async fn refused(tk: &Turnkey, token: &str) {
    let mut ws = connect_from(tk, "127.0.0.4").await;
    send(&mut ws, json!({"type": "resume", "token": token})).await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (&m["type"], &m["code"]),
        (&json!("error"), &json!("resume-refused")),
        "{m}"
    );
}

/// Ten times: `a`'s connection is reset, its mate sends three signals,
/// and five seconds later `a` resumes from another address (through the
/// next of `nodes`): same id and room, the three signals in order, and the
/// mate saw nothing.
async fn ten_rounds_of_cut_and_resume(nodes: &[&Turnkey]) {
    let mut on = nodes[0];
    let (mut a, ja, mut b, jb) = pair(on, "call").await;
    let (a_id, b_id) = (text(&ja, "id").to_string(), text(&jb, "id").to_string());
    let mut token = text(&ja, "resume").to_string();
    for round in 0..10 {
        cut(a);
        wait_parked(on, 1.0);
        for k in 0..3 {
            send(
                &mut b,
                json!({"type": "signal", "to": a_id, "data": {"round": round, "k": k}}),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        on = nodes[(round + 1) % nodes.len()];
        a = connect_from(on, &format!("127.0.0.{}", 2 + round % 2)).await;
        send(&mut a, json!({"type": "resume", "token": token})).await;
        let r = recv(&mut a).await;
        assert_eq!(r["type"], "resumed", "round {round}: {r}");
        assert_eq!((text(&r, "id"), text(&r, "room")), (a_id.as_str(), "call"));
        assert!(
            r["iceServers"].as_array().is_some_and(|s| !s.is_empty()),
            "{r}"
        );
        for k in 0..3 {
            assert_eq!(
                recv(&mut a).await,
                json!({"type": "signal", "from": b_id, "data": {"round": round, "k": k}}),
                "round {round}"
            );
        }
        let fresh = text(&r, "resume").to_string();
        assert_ne!(fresh, token);
        if round == 0 {
            // A token works once; the refusal does not disturb the session.
            for node in nodes {
                refused(node, &token).await;
            }
        }
        token = fresh;
        // The mate's next message is a's, not a peer-left.
        send(
            &mut a,
            json!({"type": "signal", "to": b_id, "data": {"back": round}}),
        )
        .await;
        assert_eq!(
            recv(&mut b).await,
            json!({"type": "signal", "from": a_id, "data": {"back": round}}),
            "round {round}"
        );
    }
    let total = |series: &str| nodes.iter().map(|n| n.metric(series)).sum::<f64>();
    assert_eq!(
        total("turnkey_signaling_resumes_total{outcome=\"resumed\"}"),
        10.0
    );
    assert_eq!(
        total("turnkey_signaling_resumes_total{outcome=\"expired\"}"),
        0.0
    );
    assert_eq!(total("turnkey_signaling_parked_peers"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_peer_resumes_from_another_address_ten_times() {
    let tk = memory_node("resume-rounds", "");
    ten_rounds_of_cut_and_resume(&[&tk]).await;
}

/// With Redis, the peer comes back through the other node every other
/// round: that node claims the session, the old one hands over what it
/// buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_peer_resumes_ten_times_across_two_redis_nodes() {
    require("redis-server", "redis-server");
    let redis = RedisServer::start(test_dir("resume-redis"));
    let one = redis_node("resume-redis-1", &redis, "");
    let two = redis_node("resume-redis-2", &redis, "");
    ten_rounds_of_cut_and_resume(&[&one, &two]).await;
}

/// Without a resume, the mate hears `peer-left` when the window ends
/// (± 1 s), whether it was quiet or kept signaling to the lost peer; then
/// the token, a forged one and garbage are all refused. Three rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_resume_the_mate_hears_peer_left_when_the_window_ends() {
    const WINDOW: Duration = Duration::from_secs(2);
    let tk = memory_node("resume-expiry", "resume_secs = 2\n");
    for round in 0..3 {
        let (quiet_a, quiet_ja, mut quiet_b, _) = pair(&tk, &format!("quiet{round}")).await;
        let (busy_a, busy_ja, mut busy_b, _) = pair(&tk, &format!("busy{round}")).await;
        let cut_at = Instant::now();
        cut(quiet_a);
        cut(busy_a);
        let busy_id = text(&busy_ja, "id").to_string();
        let busy = async {
            // Signals to the gone peer until it is announced gone.
            let mut k = 0;
            loop {
                let tick = tokio::time::sleep(Duration::from_millis(50));
                tokio::select! {
                    frame = busy_b.next() => {
                        let Some(Ok(Message::Text(t))) = frame else { continue };
                        let m: Value = serde_json::from_str(&t).expect("json");
                        return (m, cut_at.elapsed());
                    }
                    () = tick => {
                        k += 1;
                        send(&mut busy_b, json!({"type": "signal", "to": busy_id, "data": k})).await;
                    }
                }
            }
        };
        let quiet = async {
            let m = recv_within(&mut quiet_b, WINDOW + WAIT).await;
            (m, cut_at.elapsed())
        };
        let ((busy_left, busy_after), (quiet_left, quiet_after)) =
            tokio::time::timeout(WINDOW + WAIT, async { tokio::join!(busy, quiet) })
                .await
                .expect("peer-left in time");
        for (m, after, ja) in [
            (busy_left, busy_after, &busy_ja),
            (quiet_left, quiet_after, &quiet_ja),
        ] {
            assert_eq!(m, json!({"type": "peer-left", "id": text(ja, "id")}));
            assert!(
                after + Duration::from_secs(1) >= WINDOW
                    && after <= WINDOW + Duration::from_secs(1),
                "round {round}: peer-left {after:?} after the cut"
            );
            refused(&tk, text(ja, "resume")).await;
        }
        // Said goodbye, so they are not parked and counted as expired.
        quiet_b.close(None).await.expect("close");
        busy_b.close(None).await.expect("close");
    }
    assert_eq!(
        tk.metric("turnkey_signaling_resumes_total{outcome=\"expired\"}"),
        6.0
    );
    // Forgeries: a live peer's id with a made-up secret, and garbage. The
    // live peer is not disturbed.
    let (mut a, ja, mut b, jb) = pair(&tk, "forged").await;
    refused(&tk, &format!("{}.{}", text(&jb, "id"), "0".repeat(32))).await;
    refused(&tk, "not-a-token").await;
    refused(&tk, &format!("{}.", text(&jb, "id"))).await;
    send(
        &mut b,
        json!({"type": "signal", "to": text(&ja, "id"), "data": 1}),
    )
    .await;
    assert_eq!(
        recv(&mut a).await,
        json!({"type": "signal", "from": text(&jb, "id"), "data": 1})
    );
    // Only a socket's first message may resume.
    send(
        &mut b,
        json!({"type": "resume", "token": text(&jb, "resume")}),
    )
    .await;
    assert_eq!(recv(&mut b).await["code"], "resume-refused");
}

/// A mate flooding a lost peer passes its buffer's bound: that session
/// ends (counted, peer-left), the flooder and another room carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_to_a_lost_peer_ends_its_session_and_nobody_elses() {
    let tk = memory_node(
        "resume-overflow",
        "resume_buffer_bytes = 4096\nmessages_per_sec = 1000\n",
    );
    let (a, ja, mut b, _) = pair(&tk, "flood").await;
    let (mut c, jc, mut d, jd) = pair(&tk, "calm").await;
    let a_id = text(&ja, "id").to_string();
    cut(a);
    wait_parked(&tk, 1.0);
    let pad = "x".repeat(500);
    for k in 0..12 {
        send(
            &mut b,
            json!({"type": "signal", "to": a_id, "data": {"k": k, "pad": pad}}),
        )
        .await;
    }
    assert_eq!(recv(&mut b).await, json!({"type": "peer-left", "id": a_id}));
    assert_eq!(
        tk.metric("turnkey_signaling_resumes_total{outcome=\"overflow\"}"),
        1.0
    );
    assert_eq!(tk.metric("turnkey_signaling_parked_peers"), 0.0);
    refused(&tk, text(&ja, "resume")).await;
    // The other room never noticed.
    send(
        &mut c,
        json!({"type": "signal", "to": text(&jd, "id"), "data": "hi"}),
    )
    .await;
    assert_eq!(
        recv(&mut d).await,
        json!({"type": "signal", "from": text(&jc, "id"), "data": "hi"})
    );
    // The flooder is still connected and can be joined again.
    let mut e = connect_from(&tk, "127.0.0.1").await;
    join(&mut e, "flood").await;
    let m = loop {
        let m = recv(&mut b).await;
        if m["type"] != "error" {
            break m;
        }
    };
    assert_eq!(m["type"], "peer-joined", "{m}");
}

/// A close frame is a goodbye: the mate hears `peer-left` at once, and the
/// token is void.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_socket_leaves_at_once() {
    let tk = memory_node("resume-close", "");
    let (mut a, ja, mut b, _) = pair(&tk, "bye").await;
    a.close(None).await.expect("close");
    assert_eq!(
        recv_within(&mut b, Duration::from_secs(2)).await,
        json!({"type": "peer-left", "id": text(&ja, "id")})
    );
    refused(&tk, text(&ja, "resume")).await;
}

/// A resume while the old socket is still open (its loss not noticed yet):
/// the new socket takes the session over, the old one is closed, the mate
/// sees nothing. On one node, and from one Redis node to another.
async fn take_over_an_open_socket(old_node: &Turnkey, new_node: &Turnkey, room: &str) {
    let (mut a, ja, mut b, jb) = pair(old_node, room).await;
    let (a_id, b_id) = (text(&ja, "id"), text(&jb, "id"));
    let mut fresh = connect_from(new_node, "127.0.0.3").await;
    send(
        &mut fresh,
        json!({"type": "resume", "token": text(&ja, "resume")}),
    )
    .await;
    let r = recv(&mut fresh).await;
    assert_eq!(
        (&r["type"], text(&r, "id")),
        (&json!("resumed"), a_id),
        "{r}"
    );
    // The old socket ends (a close frame or a reset, whichever the
    // server's abort leaves), within the deadline.
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match a.next().await {
                Some(Ok(Message::Text(t))) => panic!("the old socket got {t}"),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the old socket stayed open");
    send(
        &mut b,
        json!({"type": "signal", "to": a_id, "data": "here?"}),
    )
    .await;
    assert_eq!(
        recv(&mut fresh).await,
        json!({"type": "signal", "from": b_id, "data": "here?"})
    );
    send(
        &mut fresh,
        json!({"type": "signal", "to": b_id, "data": "here"}),
    )
    .await;
    assert_eq!(
        recv(&mut b).await,
        json!({"type": "signal", "from": a_id, "data": "here"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_closes_a_socket_still_open() {
    let tk = memory_node("resume-takeover", "");
    take_over_an_open_socket(&tk, &tk, "takeover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_through_another_node_closes_a_socket_still_open() {
    require("redis-server", "redis-server");
    let redis = RedisServer::start(test_dir("resume-takeover-redis"));
    let one = redis_node("resume-takeover-1", &redis, "");
    let two = redis_node("resume-takeover-2", &redis, "");
    take_over_an_open_socket(&one, &two, "takeover").await;
}

/// With Redis, a mate on another node hears `peer-left` when the lost
/// peer's window ends (± 1 s), and the token is refused on both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_redis_nodes_the_window_ends_with_peer_left_on_the_other_node() {
    const WINDOW: Duration = Duration::from_secs(2);
    require("redis-server", "redis-server");
    let redis = RedisServer::start(test_dir("resume-expiry-redis"));
    let one = redis_node("resume-expiry-1", &redis, "resume_secs = 2\n");
    let two = redis_node("resume-expiry-2", &redis, "resume_secs = 2\n");
    let mut a = connect_from(&one, "127.0.0.1").await;
    let mut b = connect_from(&two, "127.0.0.1").await;
    let ja = join(&mut a, "far").await;
    join(&mut b, "far").await;
    assert_eq!(recv(&mut a).await["type"], "peer-joined");
    let cut_at = Instant::now();
    cut(a);
    let m = recv_within(&mut b, WINDOW + WAIT).await;
    let after = cut_at.elapsed();
    assert_eq!(m, json!({"type": "peer-left", "id": text(&ja, "id")}));
    assert!(
        after + Duration::from_secs(1) >= WINDOW && after <= WINDOW + Duration::from_secs(1),
        "peer-left {after:?} after the cut"
    );
    refused(&one, text(&ja, "resume")).await;
    refused(&two, text(&ja, "resume")).await;
}
