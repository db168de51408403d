//! Who may get a TURN credential, and a public listener that cannot be
//! worn down, against the real binary on loopback: the origin and token
//! access modes (also in Chromium), the open mode's mint budget, slowloris
//! and idle-connection floods, a flooding signaling sender, and the VPS
//! config keeping /metrics and HTTP off the public ports.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{auth_section, base_config, Turnkey};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

const TOKEN_SECRET: &str = "token-secret-for-the-tests-0123456789";

/// A GET from `from` (a loopback address) with extra header lines:
/// (status, head, body).
fn get_from(from: &str, to: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    sock.bind(&local.into()).unwrap();
    sock.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap();
    let mut s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

fn jwt(claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn exp(secs: i64) -> i64 {
    turnkey::ice::unix_now() as i64 + secs
}

/// The test config with more lines in its `[http]` section.
fn with_http(lines: &str) -> String {
    base_config("").replacen(
        "[http]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[http]\nlisten = \"127.0.0.1:0\"\n{lines}\n"),
        1,
    )
}

fn start(name: &str, access: &str, more: &str) -> Turnkey {
    Turnkey::start(
        name,
        &format!(
            "{}{}[access]\n{access}\n{more}",
            base_config(""),
            auth_section()
        ),
    )
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A `/ws` connection with an Origin header and query: the stream, or the
/// HTTP status of the refusal.
async fn ws(tk: &Turnkey, query: &str, origin: Option<&str>) -> Result<WsStream, u16> {
    let mut req = format!("ws://{}/ws{query}", tk.http)
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((s, _)) => Ok(s),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("ws connect: {e}"),
    }
}

async fn send(s: &mut WsStream, v: serde_json::Value) {
    s.send(Ws::text(v.to_string())).await.unwrap();
}

/// The next JSON message, skipping pings.
async fn next(s: &mut WsStream) -> serde_json::Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("a message in time")
        {
            Some(Ok(Ws::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => continue,
            other => panic!("no message: {other:?}"),
        }
    }
}

async fn next_of(s: &mut WsStream, ty: &str) -> serde_json::Value {
    loop {
        let m = next(s).await;
        if m["type"] == ty {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_mode_admits_only_the_listed_origins() {
    let tk = start(
        "access-origin",
        "mode = \"origin\"\nallowed_origins = [\"https://app.example\"]",
        "",
    );
    let (status, _, _) = get_from(
        "127.0.0.1",
        tk.http,
        "/api/ice-servers",
        "Origin: https://evil.example\r\n",
    );
    assert_eq!(status, 403);
    let (status, _, _) = get_from("127.0.0.1", tk.http, "/api/ice-servers", "");
    assert_eq!(status, 403, "no origin at all");
    let (status, head, body) = get_from(
        "127.0.0.1",
        tk.http,
        "/api/ice-servers",
        "Origin: https://app.example\r\n",
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    assert_eq!(
        ws(&tk, "", Some("https://evil.example")).await.err(),
        Some(403)
    );
    let mut ok = ws(&tk, "", Some("https://app.example"))
        .await
        .expect("allowed origin");
    send(&mut ok, serde_json::json!({"type": "join", "room": "r"})).await;
    assert_eq!(next(&mut ok).await["type"], "joined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_admits_the_apps_users_to_their_rooms() {
    let tk = start(
        "access-token",
        &format!("mode = \"token\"\ntoken_secret = [\"{TOKEN_SECRET}\"]"),
        "",
    );
    let api = |headers: &str, query: &str| {
        get_from(
            "127.0.0.1",
            tk.http,
            &format!("/api/ice-servers{query}"),
            headers,
        )
    };
    assert_eq!(api("", "").0, 401, "no token");
    let expired = jwt(
        serde_json::json!({"sub": "ana", "exp": exp(-10)}),
        TOKEN_SECRET,
    );
    assert_eq!(
        api(&format!("Authorization: Bearer {expired}\r\n"), "").0,
        401
    );
    let forged = jwt(
        serde_json::json!({"sub": "ana", "exp": exp(600)}),
        "not-the-secret-0123456789abcdef0123",
    );
    assert_eq!(api("", &format!("?token={forged}")).0, 401);
    let good = jwt(
        serde_json::json!({"sub": "ana", "exp": exp(600)}),
        TOKEN_SECRET,
    );
    for (headers, query) in [
        (format!("Authorization: Bearer {good}\r\n"), String::new()),
        (String::new(), format!("?token={good}")),
    ] {
        let (status, _, body) = api(&headers, &query);
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let user = v["iceServers"][1]["username"].as_str().unwrap();
        assert!(user.ends_with(":ana"), "{user}");
    }

    assert_eq!(ws(&tk, "", None).await.err(), Some(401));
    assert_eq!(
        ws(&tk, &format!("?token={forged}"), None).await.err(),
        Some(401)
    );
    let room_a = jwt(
        serde_json::json!({"sub": "ben", "exp": exp(600), "room": "a"}),
        TOKEN_SECRET,
    );
    let mut s = ws(&tk, &format!("?token={room_a}"), None)
        .await
        .expect("token accepted");
    send(&mut s, serde_json::json!({"type": "join", "room": "b"})).await;
    let refused = next(&mut s).await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("forbidden-room"))
    );
    send(&mut s, serde_json::json!({"type": "join", "room": "a"})).await;
    let joined = next_of(&mut s, "joined").await;
    let user = joined["iceServers"][1]["username"].as_str().unwrap();
    assert!(user.ends_with(":ben"), "{user}");
}

/// One reading of "who is calling": `/ws` takes `Authorization: Bearer`
/// as the API does; a token not valid yet (`nbf`) or with a `room` that is
/// no string is refused everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_takes_a_bearer_token_and_tokens_are_read_strictly() {
    let tk = start(
        "access-bearer",
        &format!("mode = \"token\"\ntoken_secret = [\"{TOKEN_SECRET}\"]"),
        "",
    );
    let good = jwt(
        serde_json::json!({"sub": "cleo", "exp": exp(600), "room": "r1"}),
        TOKEN_SECRET,
    );
    let mut req = format!("ws://{}/ws", tk.http)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {good}").parse().unwrap());
    let (mut s, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("a Bearer token admits /ws");
    send(&mut s, serde_json::json!({"type": "join", "room": "r1"})).await;
    let joined = next_of(&mut s, "joined").await;
    let user = joined["iceServers"][1]["username"].as_str().unwrap();
    assert!(user.ends_with(":cleo"), "{user}");

    let not_yet = jwt(
        serde_json::json!({"sub": "cleo", "exp": exp(600), "nbf": exp(300)}),
        TOKEN_SECRET,
    );
    let null_room = jwt(
        serde_json::json!({"sub": "cleo", "exp": exp(600), "room": null}),
        TOKEN_SECRET,
    );
    for bad in [&not_yet, &null_room] {
        let (status, _, body) = get_from(
            "127.0.0.1",
            tk.http,
            "/api/ice-servers",
            &format!("Authorization: Bearer {bad}\r\n"),
        );
        assert_eq!(status, 401, "{body}");
        assert_eq!(
            ws(&tk, &format!("?token={bad}"), None).await.err(),
            Some(401)
        );
    }
    assert!(tk.metric(r#"turnkey_access_refused_total{reason="bad_token"}"#) >= 4.0);
}

/// `/api/ice-servers` answers a CORS preflight for `Authorization` from an
/// origin the rules allow, and only from one.
#[test]
fn the_api_answers_cors_preflights_for_allowed_origins() {
    let allowed = "https://app.example";
    // A browser's preflight: (status, head in lowercase).
    let options = |tk: &Turnkey, origin: &str| {
        let mut s = std::net::TcpStream::connect(tk.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "OPTIONS /api/ice-servers HTTP/1.1\r\nHost: {}\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: authorization\r\n\
             Connection: close\r\n\r\n",
            tk.http
        )
        .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, text.to_ascii_lowercase())
    };
    for (mode, extra) in [
        ("origin", format!("allowed_origins = [\"{allowed}\"]")),
        (
            "token",
            format!("token_secret = [\"{TOKEN_SECRET}\"]\nallowed_origins = [\"{allowed}\"]"),
        ),
    ] {
        let tk = start(
            &format!("access-preflight-{mode}"),
            &format!("mode = \"{mode}\"\n{extra}"),
            "",
        );
        let (status, head) = options(&tk, allowed);
        assert!(matches!(status, 200 | 204), "{mode}: {head}");
        assert!(
            head.contains(&format!("access-control-allow-origin: {allowed}")),
            "{mode}: {head}"
        );
        assert!(
            head.contains("access-control-allow-headers: authorization"),
            "{mode}: {head}"
        );
        let (status, head) = options(&tk, "https://evil.example");
        assert!(
            !head.contains("access-control-allow-origin"),
            "{mode}: CORS for a foreign origin ({status}): {head}"
        );
    }
}

/// A page on another origin fetches `/api/ice-servers` with a Bearer token
/// in Chromium (preflight, then the GET), in token mode with no origin
/// listed (any origin may, the token is the proof).
#[test]
fn chromium_on_another_origin_fetches_ice_servers_with_a_bearer_token() {
    common::require("chromium", "chromium");
    common::require("node", "nodejs");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    common::ensure_node_modules(&dir);
    let tk = start(
        "access-cors-browser",
        &format!("mode = \"token\"\ntoken_secret = [\"{TOKEN_SECRET}\"]"),
        "",
    );
    let token = jwt(
        serde_json::json!({"sub": "dana", "exp": exp(600)}),
        TOKEN_SECRET,
    );
    let mut node = Command::new("node");
    node.arg(dir.join("cors_fetch.mjs"))
        .arg(tk.url("/api/ice-servers"))
        .arg(&token)
        .current_dir(&dir);
    let (ok, out, err) = common::run_with_timeout(node, Duration::from_secs(70));
    assert!(ok, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!(v["status"], 200, "{v}");
    let user = v["body"]["iceServers"][1]["username"]
        .as_str()
        .unwrap_or("");
    assert!(user.ends_with(":dana"), "{v}");
}

#[test]
fn open_mode_has_a_mint_budget_per_address() {
    let tk = start("access-open", "mode = \"open\"", "");
    let mut ok = 0;
    let mut too_many = 0;
    let started = Instant::now();
    for _ in 0..1000 {
        match get_from("127.0.0.1", tk.http, "/api/ice-servers", "").0 {
            200 => ok += 1,
            429 => too_many += 1,
            other => panic!("status {other}"),
        }
    }
    let took = started.elapsed().as_secs_f64();
    // 30 a minute, all of them at once: the budget, and what trickled in.
    assert!(
        (30..=30 + (took / 2.0).ceil() as usize).contains(&ok),
        "{ok} served in {took:.1} s"
    );
    assert_eq!(ok + too_many, 1000);
    assert_eq!(
        get_from("127.0.0.2", tk.http, "/api/ice-servers", "").0,
        200,
        "another address is served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_and_the_page_answers_throughout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tk = Turnkey::start(
        "slowloris",
        &format!("{}{}", with_http("header_timeout_secs = 2"), auth_section()),
    );
    let mut held = Vec::new();
    for i in 0..200u32 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("127.0.2.{}:0", 1 + i % 4).parse().unwrap())
            .unwrap();
        let mut s = sock.connect(tk.http).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        held.push(s);
    }
    let opened = Instant::now();
    // They trickle a header byte every 500 ms, and must all be cut.
    let mut closed = vec![None; held.len()];
    while closed.iter().any(Option::is_none) {
        assert!(
            opened.elapsed() < Duration::from_secs(6),
            "{} slowloris connections still open after {:?}",
            closed.iter().filter(|c| c.is_none()).count(),
            opened.elapsed()
        );
        for (i, s) in held.iter_mut().enumerate() {
            if closed[i].is_some() {
                continue;
            }
            let mut buf = [0u8; 512];
            let gone = match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await
            {
                Ok(Ok(0)) | Ok(Err(_)) => true,
                Ok(Ok(_)) => true, // an error answer, then the close
                Err(_) => s.write_all(b"X").await.is_err(),
            };
            if gone {
                closed[i] = Some(opened.elapsed());
            }
        }
        assert_eq!(
            tk.get("/healthz").0,
            200,
            "the page answers during the flood"
        );
        let (status, _, _) = get_from("127.0.0.9", tk.http, "/api/ice-servers", "");
        assert_eq!(status, 200, "the API answers during the flood");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let last = closed.iter().flatten().max().unwrap();
    assert!(
        *last <= Duration::from_secs(4),
        "the last was cut after {last:?}"
    );
    assert!(tk.metric(r#"turnkey_http_limited_total{reason="header_timeout"}"#) >= 150.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_and_a_normal_client_is_served() {
    let tk = Turnkey::start(
        "idle-flood",
        &format!(
            "{}{}",
            with_http("max_connections_per_ip = 16"),
            auth_section()
        ),
    );
    let mut held = Vec::new();
    for i in 0..3000u32 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("127.0.3.{}:0", 10 + i % 100).parse().unwrap())
            .unwrap();
        if let Ok(s) = sock.connect(tk.http).await {
            held.push(s);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = r#"turnkey_http_limited_total{reason="over_limit"}"#;
    while tk.metric(refused) < 1400.0 {
        assert!(
            Instant::now() < deadline,
            "the caps did not bite: {}",
            tk.metric(refused)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tk.metric("turnkey_http_connections") <= 1600.0);
    let (status, _, body) = get_from("127.0.0.250", tk.http, "/healthz", "");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_sender_is_throttled_and_its_room_mates_stay() {
    let tk = start(
        "ws-flood",
        "mode = \"open\"",
        "[signaling]\nroom_capacity = 3\n",
    );
    let mut peers = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut p = ws(&tk, "", None).await.unwrap();
        send(&mut p, serde_json::json!({"type": "join", "room": "flood"})).await;
        ids.push(
            next_of(&mut p, "joined").await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        peers.push(p);
    }
    let (mut flooder, mut victim, mut normal) = {
        let mut it = peers.into_iter();
        (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
    };
    // 300 × 60 KB at the victim in 50 ms, the flooder never reading.
    let blob = "x".repeat(60_000);
    let started = Instant::now();
    for _ in 0..300 {
        let msg = serde_json::json!({"type": "signal", "to": ids[1], "data": {"blob": blob}});
        if flooder.send(Ws::text(msg.to_string())).await.is_err() {
            break;
        }
    }
    eprintln!("flood sent in {:?}", started.elapsed());
    // The victim reads normally: it gets a few blobs, then a normal peer's
    // signal, and stays connected.
    let mut blobs = 0;
    send(
        &mut normal,
        serde_json::json!({"type": "signal", "to": ids[1], "data": {"hello": "from a normal peer"}}),
    )
    .await;
    let from_normal = loop {
        let m = next(&mut victim).await;
        match m["type"].as_str() {
            Some("signal") if m["data"]["blob"].is_string() => blobs += 1,
            Some("signal") => break m,
            Some("peer-left" | "peer-joined") => continue,
            other => panic!("the victim got {other:?}: {m}"),
        }
    };
    assert_eq!(from_normal["data"]["hello"], "from a normal peer");
    assert!(blobs < 20, "{blobs} of 300 blobs reached the victim");
    assert!(tk.metric("turnkey_signaling_rate_limited_total") >= 250.0);
    // Still there: another signal arrives.
    send(
        &mut normal,
        serde_json::json!({"type": "signal", "to": ids[1], "data": {"again": true}}),
    )
    .await;
    assert_eq!(next_of(&mut victim, "signal").await["data"]["again"], true);
    let _ = flooder.close(None).await;
}

#[test]
fn the_vps_config_keeps_metrics_and_http_off_the_public_ports() {
    let vps =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/vps.toml"))
            .unwrap()
            .replace("\"127.0.0.1:8080\"", "\"127.0.0.1:0\"")
            .replace("\"0.0.0.0:3478\"", "\"127.0.0.1:0\"")
            .replace("\"127.0.0.1:9100\"", "\"127.0.0.1:0\"")
            .replace("203.0.113.7", "127.0.0.1");
    let tk = Turnkey::start("vps-config", &vps);
    let (status, body) = common::http_get(tk.metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("turnkey_turn_allocations"));
    assert!(tk.metrics.ip().is_loopback());
    assert_eq!(tk.get("/metrics").0, 404, "not on the HTTP listener");
    // The TURN TCP port answers no HTTP at all.
    let mut s = std::net::TcpStream::connect(tk.tcp.expect("TURN TCP listener")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
}

/// The demo page, served by turnkey itself, calls relay-only in Chromium
/// under each restrictive access mode.
fn chromium_call(name: &str, access: &str, query: &str) {
    // One browser at a time: two fake-camera calls at once starve a 2-core
    // machine.
    static ONE_BROWSER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_BROWSER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    common::require("chromium", "chromium");
    common::require("node", "nodejs");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    common::ensure_node_modules(&dir);
    let mut tk = start(name, access, "");
    if access.contains("origin") {
        // The page's origin is known once the port is.
        let origin = format!("http://{}", tk.http);
        std::fs::write(
            &tk.config_path,
            std::fs::read_to_string(&tk.config_path)
                .unwrap()
                .replace("https://placeholder.example", &origin),
        )
        .unwrap();
        tk.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !tk.log_contains("configuration reloaded") {
            assert!(Instant::now() < deadline, "no reload");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let shot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.png"));
    let mut node = Command::new("node");
    node.arg(dir.join("e2e.mjs"))
        .arg(tk.url(""))
        .arg(&shot)
        .env("E2E_QUERY", query)
        .current_dir(&dir);
    let (ok, out, err) = common::run_with_timeout(node, Duration::from_secs(90));
    assert!(
        ok,
        "the call failed:\n{out}\n{err}\n{}",
        tk.log.lock().unwrap().join("\n")
    );
    let relayed = tk.metric(
        r#"turnkey_turn_relayed_packets_total{direction="peer_to_client",framing="channel_data",transport="udp"}"#,
    );
    assert!(relayed > 100.0, "only {relayed} packets relayed");
    let _ = tk.wait_exit(Duration::ZERO);
}

#[test]
fn the_demo_page_calls_relay_only_in_origin_mode() {
    chromium_call(
        "access-origin-browser",
        "mode = \"origin\"\nallowed_origins = [\"https://placeholder.example\"]",
        "",
    );
}

#[test]
fn the_demo_page_calls_relay_only_with_tokens() {
    let token = jwt(
        serde_json::json!({"sub": "caller", "exp": exp(3600), "room": "e2e"}),
        TOKEN_SECRET,
    );
    chromium_call(
        "access-token-browser",
        &format!("mode = \"token\"\ntoken_secret = [\"{TOKEN_SECRET}\"]"),
        &format!("&token={token}"),
    );
}

/// Behind a reverse proxy: `X-Forwarded-Host` and `X-Forwarded-For` are
/// believed from the configured proxies only.
#[test]
fn forwarded_headers_count_only_from_trusted_proxies() {
    let tk = Turnkey::start(
        "trusted-proxy",
        &format!(
            "{}{}",
            with_http("trusted_proxies = [\"127.0.0.1/32\"]"),
            auth_section()
        ),
    );
    let host = |from: &str| {
        let (status, _, body) = get_from(
            from,
            tk.http,
            "/api/ice-servers",
            "X-Forwarded-Host: turn.behind-proxy.example\r\nX-Forwarded-For: 198.51.100.7\r\n",
        );
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["iceServers"][0]["urls"][0].as_str().unwrap().to_string()
    };
    assert_eq!(
        host("127.0.0.1"),
        "stun:turn.behind-proxy.example:".to_string() + &tk.turn.port().to_string()
    );
    assert_eq!(
        host("127.0.0.2"),
        format!("stun:127.0.0.1:{}", tk.turn.port())
    );
    // The proxy's clients are counted apart: its own address's budget is
    // not spent by them.
    for _ in 0..40 {
        let (status, _, _) = get_from(
            "127.0.0.1",
            tk.http,
            "/api/ice-servers",
            "X-Forwarded-For: 198.51.100.8\r\n",
        );
        assert!(status == 200 || status == 429);
    }
    let (status, _, _) = get_from(
        "127.0.0.1",
        tk.http,
        "/api/ice-servers",
        "X-Forwarded-For: 198.51.100.9\r\n",
    );
    assert_eq!(status, 200, "another forwarded client has its own budget");
}

/// A socket must join a room in time; one that joined may stay quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unjoined_sockets_are_closed_and_quiet_joined_ones_stay() {
    let tk = start(
        "join-timeout",
        "mode = \"open\"",
        "[signaling]\njoin_timeout_secs = 1\n",
    );
    for round in 0..3 {
        let opened = Instant::now();
        let mut idle = ws(&tk, "", None).await.unwrap();
        let mut joined = ws(&tk, "", None).await.unwrap();
        send(
            &mut joined,
            serde_json::json!({"type": "join", "room": format!("quiet{round}")}),
        )
        .await;
        assert_eq!(next(&mut joined).await["type"], "joined");
        let code = loop {
            match tokio::time::timeout(Duration::from_secs(5), idle.next()).await {
                Ok(Some(Ok(Ws::Close(f)))) => break f.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                other => panic!("the unjoined socket was not closed: {other:?}"),
            }
        };
        assert_eq!(code, Some(1008));
        let after = opened.elapsed();
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(3),
            "closed after {after:?}"
        );
        // The joined one, quiet for twice the deadline, is still served.
        tokio::time::sleep(Duration::from_secs(2)).await;
        send(&mut joined, serde_json::json!({"type": "leave"})).await;
        send(
            &mut joined,
            serde_json::json!({"type": "join", "room": format!("again{round}")}),
        )
        .await;
        let m = loop {
            let m = next(&mut joined).await;
            if m["type"] != "peer-left" {
                break m;
            }
        };
        assert_eq!(m["type"], "joined", "{m}");
    }
    assert_eq!(
        tk.metric(r#"turnkey_signaling_dropped_peers_total{reason="join_timeout"}"#),
        3.0
    );
}

/// The public listener's idle timeout: a keep-alive connection that says
/// nothing is closed, a quiet WebSocket in a room is not (the server's
/// pings keep it busy), and a client that keeps asking is served. Three
/// rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_and_quiet_calls_stay() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tk = Turnkey::start(
        "idle-timeout",
        &format!(
            "{}{}[signaling]\nping_interval_ms = 500\npong_timeout_ms = 3000\n",
            with_http("idle_timeout_secs = 2"),
            auth_section()
        ),
    );
    for round in 0..3 {
        let mut quiet_ws = ws(&tk, "", None).await.unwrap();
        send(
            &mut quiet_ws,
            serde_json::json!({"type": "join", "room": format!("idle{round}")}),
        )
        .await;
        assert_eq!(next(&mut quiet_ws).await["type"], "joined");
        // Like a browser, it answers pings (reading does) and sends nothing.
        let quiet = tokio::spawn(async move {
            let listening = async { while let Some(Ok(_)) = quiet_ws.next().await {} };
            let _ = tokio::time::timeout(Duration::from_secs(4), listening).await;
            quiet_ws
        });
        let mut idle = tokio::net::TcpStream::connect(tk.http).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut busy = tokio::net::TcpStream::connect(tk.http).await.unwrap();
        let opened = Instant::now();
        // The busy one asks every 0.5 s for 4 s, on one keep-alive connection.
        let mut buf = vec![0u8; 4096];
        while opened.elapsed() < Duration::from_secs(4) {
            busy.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("the busy connection is still open");
            let n = tokio::time::timeout(Duration::from_secs(2), busy.read(&mut buf))
                .await
                .expect("an answer in time")
                .unwrap();
            assert!(n > 0 && buf.starts_with(b"HTTP/1.1 200"), "busy client cut");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // The idle one got its answer, then nothing for 2 s: closed.
        let mut got = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(1), idle.read_to_end(&mut got)).await;
        assert!(
            matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
            "the idle keep-alive connection is still open after 4 s"
        );
        // The quiet WebSocket answered pings only, and is still in its room.
        let mut quiet_ws = quiet.await.unwrap();
        send(&mut quiet_ws, serde_json::json!({"type": "leave"})).await;
        send(
            &mut quiet_ws,
            serde_json::json!({"type": "join", "room": format!("idle{round}")}),
        )
        .await;
        assert_eq!(next(&mut quiet_ws).await["type"], "joined", "round {round}");
    }
    assert!(tk.metric(r#"turnkey_http_limited_total{reason="idle_timeout"}"#) >= 3.0);
}
