//! One address flooding socket.io handshakes (issue 28), against the real
//! binary on loopback: in `token` and `origin` mode (every handshake
//! refused) and in `open` mode (handshakes admitted until the address's
//! budget is spent), 8 threads from 127.0.7.1 for 10 s never poll again.
//! The server's memory stays put and comes back, the refusals are counted,
//! and a legitimate socket.io client from another address (127.0.0.1)
//! signals with a `/ws` peer throughout.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{auth_section, base_config, Turnkey};

const TOKEN_SECRET: &str = "token-secret-for-the-flood-0123456789";
const ALLOWED: &str = "https://app.example";
const FLOOD_FROM: &str = "127.0.7.1";
const FLOOD_FOR: Duration = Duration::from_secs(10);
const MIB: f64 = 1024.0 * 1024.0;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn start(name: &str, access: &str) -> Turnkey {
    Turnkey::start(
        name,
        &format!("{}{}[access]\n{access}\n", base_config(""), auth_section()),
    )
}

/// The server's resident memory, in bytes.
fn rss(tk: &Turnkey) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", tk.child.id())).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kib * 1024.0
}

/// Handshakes from `FLOOD_FROM` on keep-alive connections, as fast as
/// they are answered, never polling again: statuses seen, by class.
struct Flood {
    ok: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
}

fn flood(to: SocketAddr, headers: &'static str, stop: Arc<AtomicBool>, counts: Arc<Flood>) {
    let connect = || {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let local: SocketAddr = format!("{FLOOD_FROM}:0").parse().unwrap();
        sock.bind(&local.into()).unwrap();
        sock.connect_timeout(&to.into(), Duration::from_secs(5))
            .ok()?;
        let s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        Some(BufReader::new(s))
    };
    let mut conn = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            conn = connect();
        }
        let Some(r) = conn.as_mut() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        n += 1;
        let req = format!(
            "GET /socket.io/?EIO=3&transport=polling&t={n} HTTP/1.1\r\nHost: {to}\r\n{headers}\r\n"
        );
        if r.get_mut().write_all(req.as_bytes()).is_err() {
            conn = None;
            continue;
        }
        match read_response(r) {
            Some(200) => counts.ok.fetch_add(1, Ordering::Relaxed),
            Some(401 | 403 | 429) => counts.refused.fetch_add(1, Ordering::Relaxed),
            Some(_) => counts.other.fetch_add(1, Ordering::Relaxed),
            None => {
                conn = None;
                continue;
            }
        };
    }
}

/// One HTTP/1.1 response with a Content-Length body: its status.
fn read_response(r: &mut BufReader<TcpStream>) -> Option<u16> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut length = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).ok()?;
    Some(status)
}

async fn ws_connect(url: String, headers: &[(&str, &str)]) -> Ws {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        let name: axum::http::HeaderName = k.parse().expect("a header name");
        req.headers_mut()
            .insert(name, v.parse().expect("a header value"));
    }
    let connecting = tokio_tungstenite::connect_async(req);
    let (ws, _) = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .expect("connect in time")
        .expect("connect");
    ws
}

/// The next text frame, skipping pings and Engine.IO pongs.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame in time");
        match frame {
            Some(Ok(Message::Text(t))) if t.as_str() != "3" => return t.to_string(),
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
}

/// A socket.io peer (raw Engine.IO 3 over WebSocket) and a `/ws` peer in
/// one room: the legitimate client, from 127.0.0.1.
struct Call {
    sio: Ws,
    plain: Ws,
    sio_id: String,
}

impl Call {
    async fn open(tk: &Turnkey, query: &str, headers: &[(&str, &str)]) -> Call {
        let mut sio = ws_connect(
            format!(
                "ws://{}/socket.io/?EIO=3&transport=websocket{query}",
                tk.http
            ),
            headers,
        )
        .await;
        assert!(next_text(&mut sio).await.starts_with('0'), "open packet");
        assert_eq!(next_text(&mut sio).await, "40");
        sio.send(Message::text(r#"42["create or join","flooded"]"#))
            .await
            .unwrap();
        let created: Value =
            serde_json::from_str(next_text(&mut sio).await.strip_prefix("42").unwrap()).unwrap();
        assert_eq!(created[0], "created", "{created}");
        let sio_id = created[2].as_str().unwrap().to_string();
        let mut plain = ws_connect(
            format!("ws://{}/ws{}", tk.http, query.replacen('&', "?", 1)),
            headers,
        )
        .await;
        plain
            .send(Message::text(
                json!({"type": "join", "room": "flooded"}).to_string(),
            ))
            .await
            .unwrap();
        loop {
            let m: Value = serde_json::from_str(&next_text(&mut plain).await).unwrap();
            if m["type"] == "joined" {
                break;
            }
        }
        Call { sio, plain, sio_id }
    }

    /// One signal each way, each arriving within the frame deadline.
    async fn exchange(&mut self, round: u32) {
        let to_sio = json!({"type": "signal", "to": self.sio_id, "data": {"round": round}});
        self.plain
            .send(Message::text(to_sio.to_string()))
            .await
            .unwrap();
        loop {
            let t = next_text(&mut self.sio).await;
            if t.contains(&format!("{{\"round\":{round}}}")) {
                break;
            }
        }
        self.sio
            .send(Message::text(format!(
                r#"42["message",{{"back":{round}}}]"#
            )))
            .await
            .unwrap();
        loop {
            let m: Value = serde_json::from_str(&next_text(&mut self.plain).await).unwrap();
            if m["type"] == "signal" && m["data"]["back"] == round {
                break;
            }
        }
    }
}

/// The flood, the call beside it, and what must hold after.
async fn flood_and_call(
    tk: &Turnkey,
    flood_headers: &'static str,
    query: &str,
    headers: &[(&str, &str)],
    refusals: &[&str],
) -> Arc<Flood> {
    let mut call = Call::open(tk, query, headers).await;
    let before = rss(tk);
    let counts = Arc::new(Flood {
        ok: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        other: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (stop, counts, to) = (stop.clone(), counts.clone(), tk.http);
            std::thread::spawn(move || flood(to, flood_headers, stop, counts))
        })
        .collect();
    let t0 = Instant::now();
    let mut peak = before;
    let mut round = 0;
    while t0.elapsed() < FLOOD_FOR {
        round += 1;
        call.exchange(round).await;
        peak = peak.max(rss(tk));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    call.exchange(round + 1).await;
    let handshakes = counts.ok.load(Ordering::Relaxed) + counts.refused.load(Ordering::Relaxed);
    assert!(
        handshakes > 1000,
        "the flood was too thin to show anything: {handshakes}"
    );
    assert_eq!(
        counts.other.load(Ordering::Relaxed),
        0,
        "unexpected statuses"
    );
    assert!(
        peak - before < 32.0 * MIB,
        "RSS grew {:.1} MiB under {handshakes} handshakes",
        (peak - before) / MIB
    );
    let counted: f64 = refusals.iter().map(|s| tk.metric(s)).sum();
    assert!(
        counted >= counts.refused.load(Ordering::Relaxed) as f64 && counted > 0.0,
        "{counted} refusals counted in {refusals:?}, {} seen",
        counts.refused.load(Ordering::Relaxed)
    );
    // Memory comes back (it hardly went): within 16 MiB of the start,
    // checked until 60 s after the flood.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = rss(tk);
        if now - before < 16.0 * MIB {
            println!(
                "{handshakes} handshakes ({} admitted, {} refused) in {FLOOD_FOR:?}: \
                 RSS {:.1} MiB before, peak {:+.1} MiB, after {:+.1} MiB; {counted} refusals counted",
                counts.ok.load(Ordering::Relaxed),
                counts.refused.load(Ordering::Relaxed),
                before / MIB,
                (peak - before) / MIB,
                (now - before) / MIB,
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "RSS still {:.1} MiB above its start 60 s after the flood",
            (now - before) / MIB
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_refuses_handshakes_without_a_session() {
    let tk = start(
        "flood-token",
        &format!("mode = \"token\"\ntoken_secret = [\"{TOKEN_SECRET}\"]\nmints_per_minute = 0"),
    );
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "legit", "exp": turnkey::ice::unix_now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(TOKEN_SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    let counts = flood_and_call(
        &tk,
        "",
        &format!("&token={token}"),
        &[],
        &[r#"turnkey_access_refused_total{reason="no_token"}"#],
    )
    .await;
    assert_eq!(
        counts.ok.load(Ordering::Relaxed),
        0,
        "a handshake got a session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_mode_refuses_foreign_handshakes_without_a_session() {
    let tk = start(
        "flood-origin",
        &format!("mode = \"origin\"\nallowed_origins = [\"{ALLOWED}\"]\nmints_per_minute = 0"),
    );
    let counts = flood_and_call(
        &tk,
        "Origin: https://evil.example\r\n",
        "",
        &[("origin", ALLOWED)],
        &[r#"turnkey_access_refused_total{reason="origin"}"#],
    )
    .await;
    assert_eq!(
        counts.ok.load(Ordering::Relaxed),
        0,
        "a handshake got a session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_admits_handshakes_within_the_addresss_budget() {
    let tk = start("flood-open", "mode = \"open\"");
    let counts = flood_and_call(
        &tk,
        "",
        "",
        &[],
        &[
            r#"turnkey_access_refused_total{reason="too_many"}"#,
            "turnkey_signaling_refused_sockets_total",
        ],
    )
    .await;
    // The mint budget (30 a minute, all of them at once, then one every
    // 2 s) bounds what one address gets.
    let ok = counts.ok.load(Ordering::Relaxed);
    let most = 30 + FLOOD_FOR.as_secs() / 2 + 1;
    assert!((1..=most).contains(&ok), "{ok} sessions for one address");
    // Abandoned sessions are closed after their follow-up deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tk.metric("turnkey_signaling_socketio_abandoned_total") < ok as f64 {
        assert!(
            Instant::now() < deadline,
            "abandoned sessions were not closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
