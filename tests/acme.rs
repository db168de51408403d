//! Certificates by ACME against the real binary and Pebble (Let's
//! Encrypt's test server) on loopback, validating for real over
//! TLS-ALPN-01 on turnkey's one TLS port: the first certificate from an
//! empty cache, a restart that orders nothing, renewal under a live
//! TURN/TLS allocation and an HTTPS keep-alive, an ACME server that is
//! down at renewal time, and a flood of `acme-tls/1` handshakes.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pebble::{free_tcp_port, handshake, leaf, wait_for_pebble_cert, Pebble};
use common::stream::{client_config, relay_both_ways, udp_side, ws_join, StreamTurn};
use common::{auth_section, base_config, run_with_timeout, test_dir, Turnkey};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The names turnkey gets a certificate for: pebble's DNS answers
/// 127.0.0.1 for both; `localhost` also lets `turnkey probe` resolve it.
const DOMAIN: &str = "turn.turnkey.test";
const DOMAINS: &[&str] = &[DOMAIN, "localhost"];

const ISSUED: &str = r#"turnkey_tls_acme_orders_total{result="issued"}"#;
const FAILED: &str = r#"turnkey_tls_acme_orders_total{result="failed"}"#;
const ACME_HANDSHAKES: &str = r#"turnkey_stream_closed_total{reason="acme_challenge"}"#;

/// turnkey on `tls_port` with ACME from `pebble`, caching in `cache`.
fn start(name: &str, tls_port: u16, pebble: &Pebble, cache: &Path, turn_extra: &str) -> Turnkey {
    Turnkey::start(name, &config(tls_port, pebble, cache, turn_extra))
}

fn config(tls_port: u16, pebble: &Pebble, cache: &Path, turn_extra: &str) -> String {
    format!(
        "{}{}\n[tls]\nlisten = [\"127.0.0.1:{tls_port}\"]\nhandshake_timeout_ms = 2000\n{}",
        base_config(turn_extra),
        auth_section(),
        pebble.acme_keys(DOMAINS, cache),
    )
}

/// Pebble issuing `validity_secs` certificates (0 = its default), turnkey
/// getting one from it, and that first certificate, served within 30 s.
struct Issued {
    pebble: Pebble,
    tk: Turnkey,
    addr: SocketAddr,
    cache: PathBuf,
    first: CertificateDer<'static>,
}

async fn first_certificate(name: &str, validity_secs: u64, turn_extra: &str) -> Issued {
    let tls_port = free_tcp_port();
    let pebble = Pebble::start(name, tls_port, free_tcp_port(), validity_secs).await;
    let cache = test_dir(&format!("{name}-cache"));
    let started = Instant::now();
    let tk = start(name, tls_port, &pebble, &cache, turn_extra);
    let addr = tk.tls.expect("TLS listener");
    let first = wait_for_pebble_cert(&pebble, addr, DOMAIN, None, Duration::from_secs(30)).await;
    eprintln!(
        "{name}: certificate served {:?} after start",
        started.elapsed()
    );
    Issued {
        pebble,
        tk,
        addr,
        cache,
        first,
    }
}

async fn wait_metric(tk: &Turnkey, series: &str, at_least: f64, within: Duration) {
    let deadline = Instant::now() + within;
    while tk.metric(series) < at_least {
        assert!(
            Instant::now() < deadline,
            "{series} did not reach {at_least} within {within:?}; log:\n{}",
            tk.log.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One GET on an open HTTP/1.1 keep-alive connection: the status line.
async fn keep_alive_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
) -> String {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write on the keep-alive connection");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    // /healthz answers a short body with a Content-Length: read the head
    // and that many bytes.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer on the keep-alive connection")
            .expect("read");
        assert!(n > 0, "the keep-alive connection was closed");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())
                        .flatten()
                })
                .unwrap_or(0);
            if body.len() >= len {
                return head.lines().next().unwrap_or("").to_string();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_from_an_empty_cache_serves_every_protocol_and_restarts_without_ordering() {
    // Within 30 s the one port presents pebble's certificate for the
    // domain, to a client that trusts pebble's CA alone.
    let Issued {
        pebble,
        tk,
        addr,
        cache,
        first: cert,
    } = first_certificate("acme-first", 0, "").await;
    assert!(tk.log_contains("self-signed placeholder"));
    assert_eq!(tk.metric(ISSUED), 1.0);
    assert_eq!(tk.metric(FAILED), 0.0);
    // Pebble really validated: its TLS-ALPN-01 handshakes reached turnkey
    // (one per name) and were closed unrouted.
    assert!(tk.metric(ACME_HANDSHAKES) >= 2.0);
    let expiry = tk.metric("turnkey_tls_certificate_expiry_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(expiry > now + 86_400.0, "expiry {expiry}, now {now}");
    // The cache is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // HTTPS (SNI = the second name).
    let mut https = handshake(&pebble, addr, "localhost", &[b"http/1.1"])
        .await
        .expect("HTTPS with pebble's certificate");
    assert_eq!(leaf(&https), cert);
    assert!(keep_alive_get(&mut https).await.contains("200"));
    // WSS.
    let wss = handshake(&pebble, addr, DOMAIN, &[b"http/1.1"])
        .await
        .expect("WSS handshake");
    let joined = ws_join(wss, &format!("wss://{DOMAIN}:{}/ws", addr.port()), "acme").await;
    assert_eq!(joined["type"], "joined", "{joined}");
    // TURN over TLS, relaying to a UDP client.
    let turns = handshake(&pebble, addr, DOMAIN, &[b"stun.turn"])
        .await
        .expect("TURN/TLS handshake");
    let mut a = StreamTurn::new(turns, "alice", "wonderland-rabbit");
    let ra = a.allocate().await.expect("allocates over TLS");
    let (mut b, rb) = udp_side(&tk);
    relay_both_ways(&mut a, ra, &mut b, rb).await;

    // `turnkey probe` trusting pebble's root passes over TLS too.
    let mut probe = std::process::Command::new(env!("CARGO_BIN_EXE_turnkey"));
    probe
        .arg("probe")
        .arg(format!("http://localhost:{}", tk.http.port()))
        .arg("--ca-file")
        .arg(&pebble.root_file)
        .arg("--json");
    let (ok, out, err) = run_with_timeout(probe, Duration::from_secs(60));
    assert!(ok, "probe failed:\n{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("probe JSON");
    let tls_row = report["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["transport"] == "tls"))
        .unwrap_or_else(|| panic!("no TLS row: {report:#}"));
    assert_eq!(tls_row["ok"], true, "{report:#}");

    // A restart with the certificate cached orders nothing: the very first
    // handshake gets the same certificate, and pebble saw no new order.
    let orders = pebble.orders();
    assert_eq!(pebble.issued(), 1);
    drop((a, https, tk));
    let tk = start("acme-first-again", addr.port(), &pebble, &cache, "");
    assert!(tk.log_contains("serving the cached certificate"));
    let again = handshake(&pebble, tk.tls.unwrap(), DOMAIN, &[])
        .await
        .expect("the cached certificate at once");
    assert_eq!(leaf(&again), cert);
    assert_eq!(tk.metric(ISSUED) + tk.metric(FAILED), 0.0);
    assert_eq!(pebble.orders(), orders, "a restart ordered again");
    assert_eq!(pebble.issued(), 1);
}

/// The bound address of a client socket on `ip` (another loopback address
/// counts as another client for the per-address caps).
async fn connect_from(ip: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_swaps_the_certificate_under_a_live_allocation_and_a_keep_alive() {
    // 30 s certificates: renewed 20 s after issuance.
    let Issued {
        pebble,
        tk,
        addr,
        first,
        ..
    } = first_certificate("acme-renew", 30, "").await;

    // A TURN/TLS allocation relaying to a UDP client, then quiet until the
    // swap; an HTTPS keep-alive connection kept busy across it.
    let turns = handshake(&pebble, addr, DOMAIN, &[b"stun.turn"])
        .await
        .unwrap();
    let mut a = StreamTurn::new(turns, "alice", "wonderland-rabbit");
    let ra = a.allocate().await.expect("allocates over TLS");
    let (mut b, rb) = udp_side(&tk);
    relay_both_ways(&mut a, ra, &mut b, rb).await;
    let mut https = handshake(&pebble, addr, "localhost", &[b"http/1.1"])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let second = loop {
        assert!(keep_alive_get(&mut https).await.contains("200"));
        match handshake(&pebble, addr, DOMAIN, &[]).await {
            Ok(s) if leaf(&s) != first => break leaf(&s),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "not renewed within 40 s; log:\n{}",
            tk.log.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(tk.metric(ISSUED), 2.0);
    assert_eq!(pebble.issued(), 2);

    // The allocation made before keeps relaying both ways and refreshing.
    relay_both_ways(&mut a, ra, &mut b, rb).await;
    assert!(a.refresh(600).await.is_ok(), "refresh after the swap");
    relay_both_ways(&mut a, ra, &mut b, rb).await;
    // The keep-alive connection still works, on its old session.
    assert!(keep_alive_get(&mut https).await.contains("200"));
    assert_eq!(leaf(&https), first);
    // New connections, HTTPS and TURN/TLS, see the new certificate.
    let fresh = handshake(&pebble, addr, "localhost", &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(leaf(&fresh), second);
    let turns = handshake(&pebble, addr, DOMAIN, &[b"stun.turn"])
        .await
        .unwrap();
    assert_eq!(leaf(&turns), second);
    let mut c = StreamTurn::new(turns, "alice", "wonderland-rabbit");
    c.allocate()
        .await
        .expect("allocates over TLS after the swap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_down_at_renewal_keeps_the_old_certificate_and_retries() {
    // 45 s certificates: renewal due after 30 s, the first retry 10 s
    // later, before the old one expires.
    let Issued {
        pebble,
        tk,
        addr,
        first,
        ..
    } = first_certificate("acme-down", 45, "").await;
    pebble.set_up(false);

    wait_metric(&tk, FAILED, 1.0, Duration::from_secs(45)).await;
    // The failure is logged in words, and the old certificate serves on.
    let line = tk
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("ACME: order failed"))
        .cloned()
        .expect("a log line for the failed order");
    eprintln!("{line}");
    assert!(line.contains("the current certificate stays"), "{line}");
    assert!(line.contains("next try in 10s"), "{line}");
    let during = handshake(&pebble, addr, DOMAIN, &[])
        .await
        .expect("the old certificate still serves");
    assert_eq!(leaf(&during), first);
    assert_eq!(tk.metric(ISSUED), 1.0);

    // Back up: the next retry gets a new certificate.
    pebble.set_up(true);
    wait_metric(&tk, ISSUED, 2.0, Duration::from_secs(30)).await;
    let second =
        wait_for_pebble_cert(&pebble, addr, DOMAIN, Some(&first), Duration::from_secs(5)).await;
    assert_ne!(second, first);
    assert!(tk.log_contains("certificate issued and installed"));
}

/// Writes half of a ClientHello offering `acme-tls/1` alone, then waits:
/// a validation handshake that never finishes.
async fn half_acme_hello(mut tcp: tokio::net::TcpStream) -> tokio::net::TcpStream {
    let cfg = client_config(None, &[b"acme-tls/1"]);
    let name = ServerName::try_from(DOMAIN).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let _ = tcp.write_all(&hello[..hello.len() / 2]).await;
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_acme_handshakes_is_capped_and_never_disturbs_https_or_turn() {
    let Issued {
        pebble, tk, addr, ..
    } = first_certificate(
        "acme-flood",
        0,
        "tcp_unauth_per_ip = 8\ntcp_unauth_total = 64",
    )
    .await;
    let refused = r#"turnkey_stream_connections_total{result="refused_over_limit"}"#;
    let failed = r#"turnkey_stream_closed_total{reason="handshake_failed"}"#;
    let refused_before = tk.metric(refused);
    let failed_before = tk.metric(failed);

    // 30 validation handshakes that never finish, from one address: 8 are
    // admitted, the rest refused like any other pre-authentication flood.
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(half_acme_hello(connect_from("127.0.0.1", addr).await).await);
    }
    wait_metric(&tk, refused, refused_before + 22.0, Duration::from_secs(5)).await;

    // Meanwhile 32 clients from another address complete `acme-tls/1`
    // handshakes as fast as they can (no order is pending: each is
    // refused), while a third address uses HTTPS and TURN/TLS.
    let stop = Instant::now() + Duration::from_secs(3);
    let mut flood = Vec::new();
    for _ in 0..32 {
        let connector = pebble.connector(&[b"acme-tls/1"]);
        flood.push(tokio::spawn(async move {
            let mut n = 0u32;
            while Instant::now() < stop {
                let tcp = connect_from("127.0.0.3", addr).await;
                let name = ServerName::try_from(DOMAIN).unwrap();
                let r = tokio::time::timeout(Duration::from_secs(3), connector.connect(name, tcp))
                    .await;
                assert!(
                    !matches!(r, Ok(Ok(_))),
                    "an acme-tls/1 handshake without a pending challenge succeeded"
                );
                n += 1;
            }
            n
        }));
    }
    let mut rounds = 0;
    while Instant::now() < stop {
        let t = Instant::now();
        let tcp = connect_from("127.0.0.2", addr).await;
        let mut https = pebble
            .connector(&[b"http/1.1"])
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("HTTPS during the flood");
        assert!(keep_alive_get(&mut https).await.contains("200"));
        let tcp = connect_from("127.0.0.2", addr).await;
        let turns = pebble
            .connector(&[b"stun.turn"])
            .connect(ServerName::try_from(DOMAIN).unwrap(), tcp)
            .await
            .expect("TURN/TLS during the flood");
        let mut a = StreamTurn::new(turns, "alice", "wonderland-rabbit");
        a.allocate().await.expect("allocates during the flood");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "HTTPS + TURN/TLS took {:?} during the flood",
            t.elapsed()
        );
        rounds += 1;
    }
    let mut attempts = 0;
    for f in flood {
        attempts += f.await.expect("flood task");
    }
    eprintln!("{attempts} acme-tls/1 handshakes, {rounds} HTTPS + TURN/TLS rounds");
    assert!(rounds >= 3 && attempts >= 100, "{attempts} / {rounds}");
    assert!(tk.metric(failed) - failed_before >= 100.0);
    drop(held);
    // A real validation still works after the flood: nothing stuck.
    assert!(handshake(&pebble, addr, DOMAIN, &[]).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_on_acme_listen_when_443_sits_behind_something_else() {
    let (tls_port, port80) = (free_tcp_port(), free_tcp_port());
    // Pebble's TLS-ALPN-01 port leads nowhere: only HTTP-01 on turnkey's
    // `http.acme_listen` can succeed.
    let pebble = Pebble::start("acme-http01", free_tcp_port(), port80, 0).await;
    let cache = test_dir("acme-http01-cache");
    let cfg = config(tls_port, &pebble, &cache, "").replacen(
        "[http]\n",
        &format!("[http]\nacme_listen = \"127.0.0.1:{port80}\"\n"),
        1,
    );
    let tk = Turnkey::start("acme-http01", &cfg);
    let addr = tk.tls.unwrap();
    wait_for_pebble_cert(&pebble, addr, DOMAIN, None, Duration::from_secs(30)).await;
    assert_eq!(tk.metric(ISSUED), 1.0);
    assert_eq!(
        tk.metric(ACME_HANDSHAKES),
        0.0,
        "validated over TLS-ALPN-01"
    );
    // HTTPS and TURN/TLS on the TLS port get the certificate.
    let mut https = handshake(&pebble, addr, "localhost", &[b"http/1.1"])
        .await
        .unwrap();
    assert!(keep_alive_get(&mut https).await.contains("200"));
    let turns = handshake(&pebble, addr, DOMAIN, &[b"stun.turn"])
        .await
        .unwrap();
    let mut a = StreamTurn::new(turns, "alice", "wonderland-rabbit");
    a.allocate().await.expect("allocates over TLS");
    // Port 80 serves nothing but challenges: no pending token, no page.
    let port80: SocketAddr = format!("127.0.0.1:{port80}").parse().unwrap();
    for path in ["/.well-known/acme-challenge/not-a-token", "/", "/healthz"] {
        assert_eq!(common::http_get(port80, path).0, 404, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_the_server_forgot_is_registered_anew() {
    let Issued {
        pebble,
        tk,
        addr,
        cache,
        first,
    } = first_certificate("acme-forgot", 0, "").await;
    drop(tk);
    // The cached account's URL now names no account on the server (as
    // after a CA reset or a deactivation), and the certificate is gone.
    for entry in std::fs::read_dir(&cache).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("account-") {
            let mut creds: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let id = format!("{}-forgotten", creds["id"].as_str().unwrap());
            creds["id"] = id.into();
            std::fs::write(&path, creds.to_string()).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
    let tk = start("acme-forgot-again", addr.port(), &pebble, &cache, "");
    // The first order fails on the unknown account and drops it; the retry
    // 10 s later registers a new one and gets a certificate.
    wait_metric(&tk, FAILED, 1.0, Duration::from_secs(15)).await;
    assert!(
        tk.log_contains("the cached account was dropped"),
        "{}",
        tk.log.lock().unwrap().join("\n")
    );
    wait_metric(&tk, ISSUED, 1.0, Duration::from_secs(30)).await;
    let second =
        wait_for_pebble_cert(&pebble, addr, DOMAIN, Some(&first), Duration::from_secs(5)).await;
    assert_ne!(second, first);
}
