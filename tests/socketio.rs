//! The socket.io endpoint of the real binary: raw Engine.IO 3 clients over
//! the WebSocket and polling transports meeting `/ws` peers in one room,
//! CORS on polling, garbage refused without disturbing another room, and
//! the tutorial's page, unchanged, calling in Chromium with turnkey's
//! client script and with the real socket.io-client 2.3.0 from another
//! origin (`tests/browser/socketio/tutorial.mjs`).
//!
//! Every wait has a deadline; nothing sleeps to let things settle.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use common::{auth_section, base_config, require, Turnkey};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Deadline for any single expected packet.
const WAIT: Duration = Duration::from_secs(5);
/// The browser harness's own deadlines add up to well under this.
const HARNESS_TIMEOUT: Duration = Duration::from_secs(100);
/// `signaling.max_message_bytes` in the limit tests; the transport takes
/// up to 1024 bytes more before it closes the connection.
const MAX_MESSAGE: usize = 1024;

fn turnkey(name: &str, extra: &str) -> Turnkey {
    Turnkey::start(name, &base_config(&format!("{}\n{extra}", auth_section())))
}

/// Like [`turnkey`], serving the page from `dir` (`http.static_dir`).
fn turnkey_serving(name: &str, dir: &Path) -> Turnkey {
    let config = base_config(&auth_section()).replacen(
        "[http]\n",
        &format!("[http]\nstatic_dir = {:?}\n", dir.display().to_string()),
        1,
    );
    Turnkey::start(name, &config)
}

async fn ws_connect(url: String) -> Ws {
    let connecting = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true);
    let (ws, _) = tokio::time::timeout(WAIT, connecting)
        .await
        .expect("connect in time")
        .expect("connect");
    ws
}

/// The next text frame, or `None` when the server closed the connection.
async fn next_text(ws: &mut Ws) -> Option<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        match timeout_at(deadline, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(text))) => return Some(text.to_string()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(other)) => panic!("unexpected frame {other:?}"),
        }
    }
}

/// A raw socket.io 2.x client on the WebSocket transport: Engine.IO 3
/// packets (`0` open, `2`/`3` ping/pong, `4` message) carrying socket.io 4
/// packets (`0` connect, `2` event).
struct Sio {
    ws: Ws,
    open: Value,
}

impl Sio {
    async fn connect(tk: &Turnkey) -> Sio {
        let mut ws = ws_connect(format!(
            "ws://{}/socket.io/?EIO=3&transport=websocket",
            tk.http
        ))
        .await;
        let open = next_text(&mut ws).await.expect("an open packet");
        let open: Value = serde_json::from_str(open.strip_prefix('0').expect("packet 0: open"))
            .expect("open packet JSON");
        // socket.io 4 connects the default namespace without being asked.
        assert_eq!(next_text(&mut ws).await.as_deref(), Some("40"));
        Sio { ws, open }
    }

    async fn send_raw(&mut self, packet: impl Into<String>) {
        self.ws
            .send(Message::text(packet.into()))
            .await
            .expect("send");
    }

    async fn emit(&mut self, args: Value) {
        self.send_raw(format!("42{args}")).await;
    }

    /// The next event as `[name, args…]`, skipping pongs.
    async fn event(&mut self) -> Value {
        loop {
            let packet = next_text(&mut self.ws)
                .await
                .expect("an event, not a close");
            if packet == "3" {
                continue;
            }
            let data = packet
                .strip_prefix("42")
                .unwrap_or_else(|| panic!("an event packet, got {packet}"));
            return serde_json::from_str(data).expect("event JSON");
        }
    }

    async fn expect_event(&mut self, name: &str) -> Value {
        let ev = self.event().await;
        assert_eq!(ev[0], name, "{ev}");
        ev
    }

    /// `create or join` answered by `created` or `joined`; the peer id.
    async fn create_or_join(&mut self, room: &str, answer: &str) -> String {
        self.emit(json!(["create or join", room])).await;
        let ev = self.expect_event(answer).await;
        assert_eq!(ev[1], room);
        let ice = self.expect_event("ice-servers").await;
        assert!(ice[1].as_array().is_some_and(|a| !a.is_empty()), "{ice}");
        assert!(ice[2].as_u64().is_some_and(|ttl| ttl > 0), "{ice}");
        if answer == "joined" {
            assert_eq!(self.event().await, json!(["ready"]));
        }
        ev[2].as_str().expect("an id").to_owned()
    }

    /// Whether the server closed the connection (within the deadline).
    async fn closed(&mut self) -> bool {
        let deadline = Instant::now() + WAIT;
        loop {
            match timeout_at(deadline, self.ws.next()).await {
                Err(_) => return false,
                Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

/// A `/ws` peer.
struct Plain(Ws);

impl Plain {
    async fn connect(tk: &Turnkey) -> Plain {
        Plain(ws_connect(format!("ws://{}/ws", tk.http)).await)
    }

    async fn send(&mut self, msg: Value) {
        self.0
            .send(Message::text(msg.to_string()))
            .await
            .expect("send");
    }

    async fn recv(&mut self) -> Value {
        let text = next_text(&mut self.0).await.expect("a message");
        serde_json::from_str(&text).expect("JSON")
    }
}

#[tokio::test]
async fn a_socketio_peer_and_a_ws_peer_share_a_room() {
    let tk = turnkey("sio-mixed", "");
    let mut sio = Sio::connect(&tk).await;
    assert_eq!(sio.open["upgrades"], json!([]), "no upgrade from WebSocket");
    assert!(sio.open["sid"].is_string() && sio.open["pingInterval"].is_u64());
    // Engine.IO 3: the client pings, the server answers.
    sio.send_raw("2").await;
    assert_eq!(next_text(&mut sio.ws).await.as_deref(), Some("3"));

    let sio_id = sio.create_or_join("mixed", "created").await;

    let mut plain = Plain::connect(&tk).await;
    plain.send(json!({"type": "join", "room": "mixed"})).await;
    let joined = plain.recv().await;
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["peers"], json!([sio_id]));
    let plain_id = joined["id"].as_str().expect("id").to_owned();
    assert_eq!(sio.event().await, json!(["join", "mixed"]));
    assert_eq!(sio.event().await, json!(["ready"]));

    // `/ws` → socket.io: a signal arrives as `message`(data).
    let offer = json!({"type": "offer", "sdp": "v=0\r\n"});
    plain
        .send(json!({"type": "signal", "to": sio_id, "data": offer}))
        .await;
    assert_eq!(sio.event().await, json!(["message", offer]));

    // socket.io → `/ws`: `message`(data) arrives as a signal from its id.
    let answer = json!({"type": "answer", "sdp": "v=0\r\n"});
    sio.emit(json!(["message", answer])).await;
    assert_eq!(
        plain.recv().await,
        json!({"type": "signal", "from": sio_id, "data": answer})
    );
    assert_eq!(
        tk.metric("turnkey_signaling_socketio_peers"),
        1.0,
        "one socket.io peer open"
    );
    assert_eq!(tk.metric("turnkey_signaling_peers"), 2.0);
    assert_eq!(
        tk.metric("turnkey_signaling_socketio_messages_relayed_total"),
        1.0
    );
    assert_eq!(tk.metric("turnkey_signaling_messages_relayed_total"), 2.0);
    assert_eq!(tk.metric("turnkey_signaling_socketio_events_total"), 2.0);

    // The `/ws` peer leaving is `peer-left` for the socket.io peer; the
    // socket.io peer closing is `peer-left` for a `/ws` peer.
    plain.send(json!({"type": "leave"})).await;
    assert_eq!(sio.event().await, json!(["peer-left", plain_id]));
    plain.send(json!({"type": "join", "room": "mixed"})).await;
    assert_eq!(plain.recv().await["type"], "joined");
    sio.expect_event("join").await;
    sio.ws.close(None).await.expect("close");
    assert_eq!(
        plain.recv().await,
        json!({"type": "peer-left", "id": sio_id})
    );
}

#[tokio::test]
async fn a_third_socketio_peer_is_told_full() {
    let tk = turnkey("sio-full", "");
    let mut a = Sio::connect(&tk).await;
    let mut b = Sio::connect(&tk).await;
    let mut c = Sio::connect(&tk).await;
    let a_id = a.create_or_join("foo", "created").await;
    let b_id = b.create_or_join("foo", "joined").await;
    assert_ne!(a_id, b_id);
    assert_eq!(a.event().await, json!(["join", "foo"]));
    assert_eq!(a.event().await, json!(["ready"]));
    c.emit(json!(["create or join", "foo"])).await;
    assert_eq!(c.event().await, json!(["full", "foo"]));
    // Not in a room: its messages reach no one and are refused.
    c.emit(json!(["message", "got user media"])).await;
    let err = c.expect_event("error").await;
    assert_eq!(err[1]["code"], "not-joined", "{err}");
    // The room's own messages still go only between its members.
    a.emit(json!(["message", "got user media"])).await;
    assert_eq!(b.event().await, json!(["message", "got user media"]));
    assert_eq!(tk.metric("turnkey_signaling_full_total"), 1.0);
}

/// A blocking HTTP/1.1 request with extra headers: (status, headers, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// Engine.IO 3 polling payload: `<length>:<packet>` repeated.
fn eio3_payload(packets: &[&str]) -> String {
    packets
        .iter()
        .map(|p| format!("{}:{p}", p.chars().count()))
        .collect()
}

#[test]
fn polling_works_across_origins_with_credentials() {
    let tk = turnkey("sio-polling", "");
    let origin = "http://127.0.0.1:9";
    let cors = [("Origin", origin)];
    let allows = |head: &str| {
        head.contains(&format!("access-control-allow-origin: {origin}"))
            && head.contains("access-control-allow-credentials: true")
    };

    let (status, head, body) = http(
        tk.http,
        "GET",
        "/socket.io/?EIO=3&transport=polling&t=a",
        &cors,
        "",
    );
    assert_eq!(status, 200, "{head}{body}");
    assert!(
        allows(&head),
        "handshake without CORS for {origin}:\n{head}"
    );
    let (_, open) = body.split_once(":0").expect("an open packet");
    let open: Value = serde_json::from_str(open).expect("open JSON");
    assert_eq!(open["upgrades"], json!(["websocket"]));
    let sid = open["sid"].as_str().expect("sid").to_owned();
    let path = format!("/socket.io/?EIO=3&transport=polling&sid={sid}");

    // A browser's preflight (sent when a page adds headers) is answered too.
    let (status, head, _) = http(
        tk.http,
        "OPTIONS",
        &path,
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
        "",
    );
    assert!((200..300).contains(&status), "preflight answered {status}");
    assert!(allows(&head), "{head}");

    let (status, head, body) = http(tk.http, "GET", &path, &cors, "");
    assert_eq!((status, body.as_str()), (200, "2:40"), "{head}");
    let post = eio3_payload(&[r#"42["create or join","polled"]"#, "2"]);
    let (status, head, body) = http(
        tk.http,
        "POST",
        &path,
        &[
            ("Origin", origin),
            ("Content-Type", "text/plain;charset=UTF-8"),
        ],
        &post,
    );
    assert_eq!((status, body.as_str()), (200, "ok"), "{head}");
    assert!(allows(&head), "POST without CORS:\n{head}");
    let (status, _, body) = http(tk.http, "GET", &path, &cors, "");
    assert_eq!(status, 200);
    assert!(
        body.contains(r#"42["created","polled","#) && body.contains(r#"42["ice-servers",["#),
        "polled events: {body}"
    );
    assert!(body.contains(":3"), "the ping was answered: {body}");

    // A malformed payload is refused and ends the session.
    let (status, _, _) = http(tk.http, "POST", &path, &cors, "12:not a packet");
    assert!(status >= 400, "garbage POST answered {status}");
    let (status, _, _) = http(tk.http, "GET", &path, &cors, "");
    assert!(status >= 400, "the session outlived garbage: {status}");
}

#[tokio::test]
async fn garbage_is_refused_and_another_rooms_call_goes_on() {
    let tk = turnkey(
        "sio-garbage",
        &format!("[signaling]\nmax_message_bytes = {MAX_MESSAGE}\n"),
    );
    // The call: a socket.io peer and a `/ws` peer in room "calm".
    let mut calm = Sio::connect(&tk).await;
    let calm_id = calm.create_or_join("calm", "created").await;
    let mut other = Plain::connect(&tk).await;
    other.send(json!({"type": "join", "room": "calm"})).await;
    let other_id = other.recv().await["id"].as_str().expect("id").to_owned();
    calm.expect_event("join").await;
    calm.expect_event("ready").await;
    exchange(&mut calm, &mut other, &calm_id, 1).await;

    // Event-level garbage: an `error` event each, the connection stays.
    let mut noisy = Sio::connect(&tk).await;
    let refusals = [
        (json!(["message", "before joining"]), "not-joined"),
        (json!(["bye"]), "unknown-type"),
        (json!(["create or join", 42]), "bad-message"),
        (json!(["create or join", {"room": "x"}]), "bad-message"),
        (json!(["create or join"]), "missing-field"),
        (
            json!(["create or join", "no spaces allowed"]),
            "invalid-room",
        ),
        (json!(["message", "x".repeat(MAX_MESSAGE)]), "too-large"),
    ];
    for (packet, code) in &refusals {
        noisy.emit(packet.clone()).await;
        let err = noisy.expect_event("error").await;
        assert_eq!(err[1]["code"], *code, "{packet} → {err}");
    }
    noisy.create_or_join("noisy", "created").await;
    noisy.emit(json!(["create or join", "calm"])).await;
    assert_eq!(
        noisy.expect_event("error").await[1]["code"],
        "already-joined"
    );
    exchange(&mut calm, &mut other, &calm_id, 2).await;

    // Transport-level garbage: the connection is closed.
    let fatal = [
        "42[\"message\",".to_owned(), // bad socket.io JSON
        "9garbage".to_owned(),        // no such Engine.IO packet type
        "47[\"message\"]".to_owned(), // no such socket.io packet type
        "42[7,\"foo\"]".to_owned(),   // an event name that is no string
        format!("42[\"message\",\"{}\"]", "y".repeat(4 * MAX_MESSAGE)), // past the transport limit
    ];
    for packet in fatal {
        let mut bad = Sio::connect(&tk).await;
        bad.send_raw(packet.clone()).await;
        assert!(
            bad.closed().await,
            "still open after {}",
            &packet[..packet.len().min(40)]
        );
    }
    // The call must not have noticed any of this.
    exchange(&mut calm, &mut other, &calm_id, 3).await;
    assert_eq!(tk.metric("turnkey_signaling_rooms"), 2.0);
    let refused = tk.metric(r#"turnkey_signaling_errors_total{code="unknown-type"}"#);
    assert_eq!(refused, 1.0);
    assert_eq!(
        tk.metric(r#"turnkey_signaling_errors_total{code="too-large"}"#),
        1.0
    );
    // Nothing else reached the call: its next messages are its own.
    other
        .send(json!({"type": "signal", "to": calm_id, "data": "last"}))
        .await;
    assert_eq!(calm.event().await, json!(["message", "last"]));
    calm.emit(json!(["message", "last"])).await;
    assert_eq!(other.recv().await["from"], calm_id);
    drop(noisy);
    let _ = other_id;
}

/// One message each way between the two peers of the call.
async fn exchange(calm: &mut Sio, other: &mut Plain, calm_id: &str, round: u32) {
    calm.emit(json!(["message", {"round": round}])).await;
    assert_eq!(
        other.recv().await,
        json!({"type": "signal", "from": calm_id, "data": {"round": round}})
    );
    other
        .send(json!({"type": "signal", "to": calm_id, "data": {"back": round}}))
        .await;
    assert_eq!(calm.event().await, json!(["message", {"back": round}]));
}

fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/socketio")
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/socketio-tutorial")
}

/// Runs tutorial.mjs in `mode` against a turnkey serving the fixture page:
/// its summary and turnkey's origin.
fn tutorial_call(mode: &str) -> (Value, String) {
    require("chromium", "chromium");
    require("node", "nodejs");
    require("npm", "npm");
    let dir = harness_dir();
    common::ensure_node_modules(&dir);
    let tk = turnkey_serving(&format!("sio-browser-{mode}"), &fixture_dir());
    let mut node = Command::new("node");
    node.arg(dir.join("tutorial.mjs"))
        .arg(mode)
        .arg(tk.url(""))
        .arg(fixture_dir())
        .current_dir(&dir);
    let (ok, stdout, stderr) = common::run_with_timeout(node, HARNESS_TIMEOUT);
    eprintln!("{stdout}{stderr}");
    assert!(
        ok,
        "the tutorial harness failed (see its output above); turnkey's log:\n{}",
        tk.log.lock().unwrap().join("\n")
    );
    let summary: Value = stdout
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON summary line");
    assert_eq!(summary["ok"], true, "{summary}");
    // turnkey saw what the pages did: two joins, one full, three socket.io
    // peers, and the call's offer, answer and candidates relayed.
    assert_eq!(tk.metric("turnkey_signaling_joins_total"), 2.0);
    assert_eq!(tk.metric("turnkey_signaling_full_total"), 1.0);
    assert!(tk.metric("turnkey_signaling_socketio_messages_relayed_total") >= 4.0);
    (summary, format!("http://{}", tk.http))
}

#[test]
fn the_tutorial_page_calls_through_turnkey_with_its_client_script() {
    let (summary, turnkey) = tutorial_call("same-origin");
    assert_eq!(summary["pageOrigin"], turnkey);
}

#[test]
fn the_tutorial_page_calls_with_the_real_client_from_another_origin() {
    let (summary, turnkey) = tutorial_call("cross-origin");
    let page = summary["pageOrigin"].as_str().expect("the page's origin");
    assert!(
        page.starts_with("http://127.0.0.1:") && page != turnkey,
        "{summary}"
    );
}

#[test]
fn the_served_client_is_socketio_client_2_3_0_unchanged() {
    let dir = harness_dir();
    common::ensure_node_modules(&dir);
    let npm = std::fs::read_to_string(dir.join("node_modules/socket.io-client/dist/socket.io.js"))
        .expect("socket.io-client's dist/socket.io.js");
    let tk = turnkey("sio-client-js", "");
    let (status, served) = tk.get("/socket.io/socket.io.js");
    assert_eq!(status, 200);
    assert!(served.starts_with("/*!\n * Socket.IO v2.3.0"));
    assert!(
        served == npm,
        "the served script differs from the npm package's"
    );
}

/// The access rules apply to socket.io as to `/ws`: in token mode a socket
/// without a valid token is disconnected before it is connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_applies_to_socketio() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let secret = "token-secret-for-the-tests-0123456789";
    let tk = turnkey(
        "sio-token",
        &format!("[access]\nmode = \"token\"\ntoken_secret = [\"{secret}\"]\n"),
    );
    // Refused at the handshake, before any session exists: an HTTP 401,
    // on either transport, and counted.
    let url = format!("ws://{}/socket.io/?EIO=3&transport=websocket", tk.http);
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("served without a token: {:?}", other.map(|_| ())),
    }
    let (status, _, body) = http(
        tk.http,
        "GET",
        "/socket.io/?EIO=3&transport=polling&t=x",
        &[],
        "",
    );
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("sid"), "{body}");
    assert!(tk.metric(r#"turnkey_access_refused_total{reason="no_token"}"#) >= 2.0);

    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "tutorial-user", "exp": turnkey::ice::unix_now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap();
    // The token as `?token=`, and as `Authorization: Bearer` (as the API
    // takes it).
    let by_query = ws_connect(format!(
        "ws://{}/socket.io/?EIO=3&transport=websocket&token={token}",
        tk.http
    ))
    .await;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (by_header, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("a Bearer token admits a socket.io handshake");
    for (how, mut ws) in [("query", by_query), ("bearer", by_header)] {
        assert!(next_text(&mut ws).await.is_some_and(|p| p.starts_with('0')));
        assert_eq!(next_text(&mut ws).await.as_deref(), Some("40"));
        let mut sio = Sio {
            ws,
            open: Value::Null,
        };
        sio.emit(json!(["create or join", how])).await;
        sio.expect_event("created").await;
        let ice = sio.expect_event("ice-servers").await;
        let user = ice[1][1]["username"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(user.ends_with(":tutorial-user"), "{how}: {ice}");
    }
}

/// In origin mode the polling transport answers only the allowed origins
/// with CORS headers, and a foreign origin's handshake gets no session.
#[test]
fn origin_mode_polling_gives_foreign_origins_no_cors_and_no_session() {
    let allowed = "https://app.example";
    let tk = turnkey(
        "sio-origin-cors",
        &format!("[access]\nmode = \"origin\"\nallowed_origins = [\"{allowed}\"]\n"),
    );
    let path = "/socket.io/?EIO=3&transport=polling&t=a";
    for foreign in ["https://evil.example", "null"] {
        let (status, head, body) = http(tk.http, "GET", path, &[("Origin", foreign)], "");
        assert_eq!(status, 403, "{head}{body}");
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("access-control-allow-origin"),
            "CORS for {foreign}:\n{head}"
        );
        let (_, head, _) = http(
            tk.http,
            "OPTIONS",
            path,
            &[
                ("Origin", foreign),
                ("Access-Control-Request-Method", "GET"),
            ],
            "",
        );
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("access-control-allow-origin"),
            "preflight CORS for {foreign}:\n{head}"
        );
    }
    let (status, _, _) = http(tk.http, "GET", path, &[], "");
    assert_eq!(status, 403, "no Origin at all is refused too");
    let (status, head, body) = http(tk.http, "GET", path, &[("Origin", allowed)], "");
    assert_eq!(status, 200, "{head}{body}");
    assert!(
        head.contains(&format!("access-control-allow-origin: {allowed}")),
        "{head}"
    );
    assert!(body.contains("\"sid\""), "{body}");
}

/// The 5 s follow-up deadline for new polling sessions closes only those
/// whose client never came back: sessions that polled once and then stay
/// quiet past the deadline live on, three at once.
#[test]
fn quiet_polling_sessions_outlive_the_follow_up_deadline() {
    let tk = turnkey("sio-quiet", "");
    let mut sids = Vec::new();
    for i in 0..3 {
        let (status, head, body) = http(
            tk.http,
            "GET",
            &format!("/socket.io/?EIO=3&transport=polling&t=q{i}"),
            &[],
            "",
        );
        assert_eq!(status, 200, "{head}{body}");
        let (_, open) = body.split_once(":0").expect("an open packet");
        let open: Value = serde_json::from_str(open).expect("open JSON");
        let sid = open["sid"].as_str().expect("sid").to_owned();
        // The one follow-up a client sends at once: it receives the connect.
        let path = format!("/socket.io/?EIO=3&transport=polling&sid={sid}");
        let (status, _, body) = http(tk.http, "GET", &path, &[], "");
        assert_eq!((status, body.as_str()), (200, "2:40"));
        sids.push(path);
    }
    // Quiet past the deadline (5 s), with a margin.
    std::thread::sleep(Duration::from_millis(6500));
    for path in &sids {
        let (status, _, body) = http(tk.http, "POST", path, &[], &eio3_payload(&["2"]));
        assert_eq!((status, body.as_str()), (200, "ok"), "{path}");
        let (status, _, body) = http(tk.http, "GET", path, &[], "");
        assert_eq!(
            (status, body.as_str()),
            (200, "1:3"),
            "{path}: the ping is answered"
        );
    }
    assert_eq!(
        tk.metric("turnkey_signaling_socketio_abandoned_total"),
        0.0,
        "no session that came back was closed as abandoned"
    );
}
