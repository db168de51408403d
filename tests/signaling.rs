//! The signaling service over real sockets: `turnkey::signal::router` served
//! by axum on 127.0.0.1, driven by tokio-tungstenite clients. Every wait has
//! a deadline; nothing sleeps to let things settle.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use turnkey::signal::{router, ErrorCode, IceServersFn, SignalConfig, Signaling};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Deadline for any single expected event.
const WAIT: Duration = Duration::from_secs(3);

struct Server {
    url: String,
    sig: Arc<Signaling>,
    draining: Arc<AtomicBool>,
}

/// A stub provider whose usernames count up, so refreshes are recognisable.
fn stub_ice(ttl: Duration) -> IceServersFn {
    let issued = Arc::new(AtomicU64::new(0));
    Arc::new(
        move |host: Option<&str>, _who: &turnkey::access::Admission| {
            let n = issued.fetch_add(1, Ordering::Relaxed) + 1;
            let host = host.unwrap_or("no-host");
            let servers = json!([{
                "urls": [format!("turn:{host}:3478?transport=udp")],
                "username": format!("user{n}"),
                "credential": "secret",
            }]);
            (servers, ttl)
        },
    )
}

async fn start_with(cfg: SignalConfig, ttl: Duration) -> Server {
    let drain = Arc::new(turnkey::lifecycle::Drain::default());
    let draining = drain.flag();
    // Everyone admitted, no mint budget: access rules are tested against
    // the binary.
    let open = turnkey::access::Doorman::new(&turnkey::config::AccessConfig {
        mints_per_minute: 0,
        ..Default::default()
    });
    let sig = Signaling::new(
        cfg,
        stub_ice(ttl),
        open,
        drain,
        tokio_util::sync::CancellationToken::new(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    // As in production: signaling is many small writes, which Nagle's
    // algorithm would hold back for the peer's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = router(sig.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        url: format!("ws://{addr}/ws"),
        sig,
        draining,
    }
}

async fn start() -> Server {
    start_with(SignalConfig::default(), Duration::from_secs(600)).await
}

async fn connect(server: &Server) -> Ws {
    // Nagle off like a browser's signaling socket, so request/answer
    // round trips do not wait for delayed ACKs.
    let connecting = tokio_tungstenite::connect_async_with_config(server.url.as_str(), None, true);
    let (ws, _) = timeout(WAIT, connecting)
        .await
        .expect("connect in time")
        .expect("connect");
    ws
}

async fn send(ws: &mut Ws, msg: Value) {
    ws.send(Message::text(msg.to_string())).await.expect("send");
}

/// The next JSON message, skipping pings (which the client library answers).
async fn recv(ws: &mut Ws) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a message in time");
        match frame {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(&text).expect("server sends JSON")
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

async fn recv_type(ws: &mut Ws, kind: &str) -> Value {
    let msg = recv(ws).await;
    assert_eq!(msg["type"], kind, "{msg}");
    msg
}

/// Joins `room` and returns the `joined` message.
async fn join(ws: &mut Ws, room: &str) -> Value {
    send(ws, json!({"type": "join", "room": room})).await;
    let joined = recv_type(ws, "joined").await;
    assert_eq!(joined["room"], room);
    joined
}

fn id_of(msg: &Value) -> String {
    msg["id"].as_str().expect("an id").to_owned()
}

/// Two peers in `room`: (a, a's id, b, b's id), with a told about b.
async fn pair(server: &Server, room: &str) -> (Ws, String, Ws, String) {
    let mut a = connect(server).await;
    let a_id = id_of(&join(&mut a, room).await);
    let mut b = connect(server).await;
    let b_id = id_of(&join(&mut b, room).await);
    let announced = recv_type(&mut a, "peer-joined").await;
    assert_eq!(announced["id"], b_id.as_str());
    (a, a_id, b, b_id)
}

async fn signal(ws: &mut Ws, to: &str, data: Value) {
    send(ws, json!({"type": "signal", "to": to, "data": data})).await;
}

async fn expect_signal(ws: &mut Ws, from: &str, data: Value) {
    let got = recv_type(ws, "signal").await;
    assert_eq!(got, json!({"type": "signal", "from": from, "data": data}));
}

async fn expect_error(ws: &mut Ws, code: &str) {
    let got = recv_type(ws, "error").await;
    assert_eq!(got["code"], code, "{got}");
    assert!(
        got["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{got}"
    );
}

/// Reads until the server closes the connection; returns the close code, if
/// the server sent one.
async fn expect_closed(ws: &mut Ws) -> Option<CloseCode> {
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

/// Polls a condition on server state until it holds or the deadline passes.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn two_peers_meet_and_signal_and_a_third_finds_the_room_full() {
    let server = start().await;
    let mut a = connect(&server).await;
    let joined_a = join(&mut a, "call").await;
    let a_id = id_of(&joined_a);
    assert!(
        a_id.len() == 16 && a_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{a_id}"
    );
    assert_eq!(joined_a["peers"], json!([]));
    assert_eq!(joined_a["ttl"], 600);
    assert_eq!(
        joined_a["iceServers"][0]["urls"],
        json!(["turn:127.0.0.1:3478?transport=udp"])
    );
    assert_eq!(joined_a["iceServers"][0]["credential"], "secret");

    let mut b = connect(&server).await;
    let joined_b = join(&mut b, "call").await;
    let b_id = id_of(&joined_b);
    assert_ne!(a_id, b_id);
    assert_eq!(joined_b["peers"], json!([a_id]));
    assert_eq!(
        recv_type(&mut a, "peer-joined").await,
        json!({"type": "peer-joined", "id": b_id})
    );

    let offer = json!({"sdp": {"type": "offer", "sdp": "v=0..."}});
    signal(&mut a, &b_id, offer.clone()).await;
    expect_signal(&mut b, &a_id, offer).await;
    let answer = json!({"candidate": "candidate:1 1 udp 1 10.0.0.1 5000 typ host", "sdpMid": "0"});
    signal(&mut b, &a_id, answer.clone()).await;
    expect_signal(&mut a, &b_id, answer).await;

    let mut c = connect(&server).await;
    send(&mut c, json!({"type": "join", "room": "call"})).await;
    assert_eq!(recv(&mut c).await, json!({"type": "full", "room": "call"}));
    join(&mut c, "elsewhere").await;

    let stats = server.sig.stats();
    assert_eq!(stats.joins_total.load(Ordering::Relaxed), 3);
    assert_eq!(stats.full_total.load(Ordering::Relaxed), 1);
    assert_eq!(stats.messages_relayed_total.load(Ordering::Relaxed), 2);
    assert_eq!(stats.rooms.load(Ordering::Relaxed), 2);
    assert_eq!(stats.connected_peers.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn capacity_three_makes_a_mesh() {
    let cfg = SignalConfig {
        room_capacity: 3,
        ..SignalConfig::default()
    };
    let server = start_with(cfg, Duration::from_secs(600)).await;
    let (mut a, a_id, mut b, b_id) = pair(&server, "mesh").await;
    let mut c = connect(&server).await;
    let joined_c = join(&mut c, "mesh").await;
    let c_id = id_of(&joined_c);
    assert_eq!(joined_c["peers"], json!([a_id, b_id]));
    for ws in [&mut a, &mut b] {
        assert_eq!(recv_type(ws, "peer-joined").await["id"], c_id.as_str());
    }

    signal(&mut a, &c_id, json!("a->c")).await;
    expect_signal(&mut c, &a_id, json!("a->c")).await;
    signal(&mut c, &b_id, json!("c->b")).await;
    expect_signal(&mut b, &c_id, json!("c->b")).await;
    signal(&mut b, &a_id, json!("b->a")).await;
    expect_signal(&mut a, &b_id, json!("b->a")).await;

    let mut d = connect(&server).await;
    send(&mut d, json!({"type": "join", "room": "mesh"})).await;
    recv_type(&mut d, "full").await;
}

#[tokio::test]
async fn every_error_is_answered_and_the_session_survives() {
    let cfg = SignalConfig {
        max_message_bytes: 1024,
        ..SignalConfig::default()
    };
    let server = start_with(cfg, Duration::from_secs(600)).await;
    let (mut a, a_id, mut b, b_id) = pair(&server, "r").await;

    let too_large = json!({"type": "signal", "to": b_id, "data": "x".repeat(1200)}).to_string();
    let cases: Vec<(Message, &str)> = vec![
        (Message::text("this is not json"), "bad-json"),
        (Message::text(r#"{"type":"dance"}"#), "unknown-type"),
        (Message::text(r#"{"room":"r"}"#), "missing-field"),
        (
            Message::text(r#"{"type":"signal","data":{}}"#),
            "missing-field",
        ),
        (
            Message::text(r#"{"type":"signal","to":7,"data":{}}"#),
            "bad-message",
        ),
        (
            Message::text(r#"{"type":"signal","to":"0000000000000000","data":{}}"#),
            "unknown-peer",
        ),
        (Message::text(too_large), "too-large"),
        (
            Message::text(r#"{"type":"join","room":"no spaces allowed"}"#),
            "invalid-room",
        ),
        (
            Message::text(r#"{"type":"join","room":"other"}"#),
            "already-joined",
        ),
        (Message::binary(vec![1, 2, 3]), "binary-frame"),
    ];
    for (n, (frame, code)) in cases.into_iter().enumerate() {
        a.send(frame).await.expect("send");
        expect_error(&mut a, code).await;
        // Same socket, same room: the next signal still arrives.
        signal(&mut a, &b_id, json!({"n": n})).await;
        expect_signal(&mut b, &a_id, json!({"n": n})).await;
    }

    // A peer that never joined.
    let mut c = connect(&server).await;
    signal(&mut c, &a_id, json!(1)).await;
    expect_error(&mut c, "not-joined").await;
    send(&mut c, json!({"type": "leave"})).await;
    expect_error(&mut c, "not-joined").await;
    join(&mut c, "c-room").await;

    let stats = server.sig.stats();
    assert_eq!(stats.errors(ErrorCode::MissingField), 2);
    assert_eq!(stats.errors(ErrorCode::NotJoined), 2);
    assert_eq!(stats.errors(ErrorCode::BinaryFrame), 1);
}

#[tokio::test]
async fn far_oversized_messages_close_the_connection() {
    let cfg = SignalConfig {
        max_message_bytes: 1024,
        ..SignalConfig::default()
    };
    let server = start_with(cfg, Duration::from_secs(600)).await;
    let (mut a, a_id, mut b, _) = pair(&server, "r").await;
    // Ignore the send result: the server may close before the write ends.
    let _ = a.send(Message::text("x".repeat(64 * 1024))).await;
    expect_closed(&mut a).await;
    assert_eq!(recv(&mut b).await, json!({"type": "peer-left", "id": a_id}));
}

#[tokio::test]
async fn leave_announces_keeps_the_socket_and_frees_the_room() {
    let server = start().await;
    let (mut a, a_id, mut b, b_id) = pair(&server, "r").await;

    send(&mut a, json!({"type": "leave"})).await;
    assert_eq!(recv(&mut b).await, json!({"type": "peer-left", "id": a_id}));
    // Still connected: a can join again, with the same id.
    let again = join(&mut a, "r").await;
    assert_eq!(
        (id_of(&again), &again["peers"]),
        (a_id.clone(), &json!([b_id]))
    );
    recv_type(&mut b, "peer-joined").await;

    send(&mut a, json!({"type": "leave"})).await;
    recv_type(&mut b, "peer-left").await;
    send(&mut b, json!({"type": "leave"})).await;
    eventually("the room to be freed", || {
        server.sig.stats().rooms.load(Ordering::Relaxed) == 0
    })
    .await;

    // The room was full before; a new pair fits now.
    let (_c, _, _d, _) = pair(&server, "r").await;
    assert_eq!(server.sig.stats().rooms.load(Ordering::Relaxed), 1);
}

/// A close frame is a goodbye, announced at once; a socket that vanishes
/// is a lost peer, announced when its resume window passes.
#[tokio::test]
async fn a_closed_or_vanished_socket_is_announced() {
    let cfg = SignalConfig {
        resume_window: Duration::from_millis(300),
        ..SignalConfig::default()
    };
    let server = start_with(cfg, Duration::from_secs(600)).await;
    let (mut a, a_id, mut b, _) = pair(&server, "r").await;
    a.close(None).await.expect("close");
    assert_eq!(recv(&mut b).await, json!({"type": "peer-left", "id": a_id}));

    // Dropped without a close handshake.
    let mut c = connect(&server).await;
    let c_id = id_of(&join(&mut c, "r").await);
    recv_type(&mut b, "peer-joined").await;
    drop(c);
    assert_eq!(recv(&mut b).await, json!({"type": "peer-left", "id": c_id}));
    eventually("the gauge to drop", || {
        server.sig.stats().connected_peers.load(Ordering::Relaxed) == 1
    })
    .await;
}

#[tokio::test]
async fn a_silent_peer_is_dropped_and_a_responsive_one_is_not() {
    let cfg = SignalConfig {
        ping_interval: Duration::from_millis(100),
        pong_timeout: Duration::from_millis(400),
        // A dropped silent peer is announced at once only without
        // resumption (with it, after the window: tests/resume.rs).
        resume_window: Duration::ZERO,
        ..SignalConfig::default()
    };
    let server = start_with(cfg, Duration::from_secs(600)).await;
    let (silent, silent_id, mut b, b_id) = pair(&server, "r").await;

    // `silent` is never polled again, so it never answers a ping.
    let started = Instant::now();
    assert_eq!(
        recv(&mut b).await,
        json!({"type": "peer-left", "id": silent_id})
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "dropped too early"
    );
    assert_eq!(
        server
            .sig
            .stats()
            .heartbeat_drops_total
            .load(Ordering::Relaxed),
        1
    );
    drop(silent);

    // b keeps answering pings; outlive three timeouts (twelve pings) and
    // check that nothing but pings arrived and b can still be reached.
    let mut c = connect(&server).await;
    let c_id = id_of(&join(&mut c, "r").await);
    recv_type(&mut b, "peer-joined").await;
    let deadline = Instant::now() + WAIT;
    let mut pings = 0;
    while pings < 12 {
        tokio::select! {
            frame = tokio::time::timeout_at(deadline, b.next()) => match frame.expect("pings in time") {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("b got {other:?}"),
            },
            // c must answer its pings too.
            frame = c.next() => assert!(matches!(frame, Some(Ok(Message::Ping(_)))), "c got {frame:?}"),
        }
    }
    signal(&mut c, &b_id, json!("still here")).await;
    expect_signal(&mut b, &c_id, json!("still here")).await;
    assert_eq!(
        server
            .sig
            .stats()
            .heartbeat_drops_total
            .load(Ordering::Relaxed),
        1
    );
}

/// A peer that sends but never reads answers no ping: while it keeps
/// sending, its messages are its signs of life (it is not pinged, so not
/// dropped, for longer than a ping interval plus the pong timeout); once it
/// goes quiet it is pinged and dropped, `pong_timeout` after its last
/// message.
/// This runs the heartbeat timer left early by each message. 3 rounds.
#[tokio::test]
async fn a_busy_peer_lives_on_its_messages_and_is_dropped_once_quiet() {
    let cfg = SignalConfig {
        ping_interval: Duration::from_millis(100),
        pong_timeout: Duration::from_millis(300),
        resume_window: Duration::ZERO,
        ..SignalConfig::default()
    };
    let server = start_with(cfg, Duration::from_secs(600)).await;
    for round in 0..3 {
        let room = format!("busy-{round}");
        let (mut a, a_id, mut b, b_id) = pair(&server, &room).await;
        // 800 ms of sending, twice interval + timeout; `a` never reads,
        // `b` reads all along (so it answers its own pings).
        let sending = async {
            let mut last = Instant::now();
            for i in 0..40 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                signal(&mut a, &b_id, json!(i)).await;
                last = Instant::now();
            }
            last
        };
        let receiving = async {
            for i in 0..40 {
                expect_signal(&mut b, &a_id, json!(i)).await;
            }
        };
        let (quiet_since, ()) = tokio::join!(sending, receiving);
        assert_eq!(
            recv(&mut b).await,
            json!({"type": "peer-left", "id": a_id}),
            "round {round}"
        );
        let after = quiet_since.elapsed();
        assert!(
            after >= Duration::from_millis(300) && after < Duration::from_millis(1500),
            "round {round}: dropped {after:?} after its last message"
        );
        drop(a);
    }
    assert_eq!(
        server
            .sig
            .stats()
            .heartbeat_drops_total
            .load(Ordering::Relaxed),
        3
    );
}

#[tokio::test]
async fn ice_servers_are_refreshed_before_they_expire() {
    let server = start_with(SignalConfig::default(), Duration::from_secs(1)).await;
    let mut a = connect(&server).await;
    let joined = join(&mut a, "r").await;
    assert_eq!(
        (
            joined["ttl"].clone(),
            joined["iceServers"][0]["username"].clone()
        ),
        (json!(1), json!("user1"))
    );

    let started = Instant::now();
    let first = recv_type(&mut a, "ice-servers").await;
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "refresh came after expiry"
    );
    assert_eq!(first["ttl"], 1);
    assert_eq!(first["iceServers"][0]["username"], "user2");
    assert_eq!(
        first["iceServers"][0]["urls"],
        json!(["turn:127.0.0.1:3478?transport=udp"])
    );
    let second = recv_type(&mut a, "ice-servers").await;
    assert_eq!(second["iceServers"][0]["username"], "user3");
    assert_eq!(
        server
            .sig
            .stats()
            .ice_refreshes_total
            .load(Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn draining_refuses_joins_until_lifted() {
    let server = start().await;
    let mut a = connect(&server).await;
    join(&mut a, "r").await;
    server.draining.store(true, Ordering::Relaxed);
    let mut b = connect(&server).await;
    send(&mut b, json!({"type": "join", "room": "r"})).await;
    expect_error(&mut b, "draining").await;
    server.draining.store(false, Ordering::Relaxed);
    join(&mut b, "r").await;
    recv_type(&mut a, "peer-joined").await;
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_going_away() {
    let server = start().await;
    let (mut a, _, mut b, _) = pair(&server, "r").await;
    let mut idle = connect(&server).await;
    server.sig.shutdown();
    for ws in [&mut a, &mut b, &mut idle] {
        assert_eq!(expect_closed(ws).await, Some(CloseCode::Away));
    }
    timeout(WAIT, server.sig.wait_idle())
        .await
        .expect("all connections gone");
    assert_eq!(
        server.sig.stats().connected_peers.load(Ordering::Relaxed),
        0
    );
    assert!(server.sig.is_draining());

    let mut late = connect(&server).await;
    assert_eq!(expect_closed(&mut late).await, Some(CloseCode::Away));
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_dropped_without_stalling_the_sender() {
    // No send budget, so the stalled receiver's queue is what fills (the
    // budget has its own test against the binary, tests/access.rs).
    let server = start_with(
        SignalConfig {
            messages_per_sec: 0,
            bytes_per_sec: 0,
            ..SignalConfig::default()
        },
        Duration::from_secs(600),
    )
    .await;
    let (a, a_id, stalled, stalled_id) = pair(&server, "r").await;
    let (mut a_tx, mut a_rx) = a.split();

    // Read a's side concurrently; the first message must be the peer-left.
    let (left_tx, mut left_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = a_rx.next().await {
            if let Message::Text(text) = frame {
                let _ = left_tx.send(serde_json::from_str::<Value>(&text).ok());
                return;
            }
        }
    });

    // Each signal is well under the cap; keep sending until the server gives
    // up on `stalled`, whose socket buffers and queue fill since it never reads.
    let payload = json!({"blob": "x".repeat(16 * 1024)});
    let frame = json!({"type": "signal", "to": stalled_id, "data": payload}).to_string();
    let deadline = Instant::now() + Duration::from_secs(8);
    let left = loop {
        assert!(Instant::now() < deadline, "stalled peer was never dropped");
        tokio::select! {
            left = &mut left_rx => break left.expect("reader alive"),
            sent = timeout(WAIT, a_tx.send(Message::text(frame.clone()))) => {
                sent.expect("sending never blocks for long").expect("send");
            }
        }
    };
    assert_eq!(left, Some(json!({"type": "peer-left", "id": stalled_id})));
    assert_eq!(
        server
            .sig
            .stats()
            .slow_consumer_drops_total
            .load(Ordering::Relaxed),
        1
    );
    assert_ne!(a_id, stalled_id);
    drop(stalled);
}
