//! Operating turnkey: metrics that promtool accepts and that count exactly,
//! a separate metrics listener, SIGHUP reload, SIGUSR1 drain, and the CLI.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::{auth_section, base_config, require, Turnkey, SECRET};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as Ws;

const C2P: &str = r#"turnkey_turn_relayed_packets_total{direction="client_to_peer",framing="channel_data",transport="udp"}"#;
const C2P_BYTES: &str = r#"turnkey_turn_relayed_bytes_total{direction="client_to_peer",framing="channel_data",transport="udp"}"#;
const P2C: &str = r#"turnkey_turn_relayed_packets_total{direction="peer_to_client",framing="channel_data",transport="udp"}"#;
const P2C_BYTES: &str = r#"turnkey_turn_relayed_bytes_total{direction="peer_to_client",framing="channel_data",transport="udp"}"#;

/// Two raw clients with channels bound to each other's relays.
fn channel_pair(tk: &Turnkey) -> (Raw, Raw, SocketAddr, SocketAddr) {
    let mut a = Raw::new(tk.turn, "alice", "wonderland-rabbit");
    let mut b = Raw::new(tk.turn, "bob", "builder-of-things");
    let ra = a.allocate().expect("alice allocates");
    let rb = b.allocate().expect("bob allocates");
    a.bind_channel(0x4001, rb).expect("alice binds");
    b.bind_channel(0x4002, ra).expect("bob binds");
    (a, b, ra, rb)
}

/// Whether `to` receives what `from` sends on `ch` within a few tries.
fn relays(from: &Raw, ch: u16, to: &Raw) -> bool {
    for _ in 0..10 {
        from.channel_data(ch, b"probe");
        if let Some((_, _, d)) = to.recv_data(Duration::from_millis(200)) {
            if d == b"probe" {
                return true;
            }
        }
    }
    false
}

async fn ws(
    tk: &Turnkey,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    tokio_tungstenite::connect_async(format!("ws://{}/ws", tk.http))
        .await
        .expect("ws connect")
        .0
}

async fn next_json(
    s: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    ty: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, s.next())
            .await
            .expect("message in time")
            .expect("open")
            .expect("ok");
        if let Ws::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).expect("json");
            if v["type"] == ty {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_exactly_the_traffic_and_promtool_accepts_them() {
    let tk = Turnkey::start(
        "counters",
        &format!("{}{}", base_config(""), auth_section()),
    );
    // The raw client blocks; the server is another process, so blocking
    // this test's runtime thread holds nothing up.
    let (a, b, _, _) = channel_pair(&tk);
    assert!(relays(&a, 0x4001, &b) && relays(&b, 0x4002, &a));
    // Warm-up traffic is done once every probe that entered the relay has
    // left it too (each crosses it twice: out of one allocation, into the
    // other); a probe still in flight would land in the measurement.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tk.metric(C2P) != tk.metric(P2C) {
        assert!(Instant::now() < deadline, "warm-up packets never settled");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = [
        tk.metric(C2P),
        tk.metric(C2P_BYTES),
        tk.metric(P2C),
        tk.metric(P2C_BYTES),
    ];
    const N: usize = 300;
    const SIZE: usize = 160;
    let payload = vec![0x5a_u8; SIZE];
    let mut received = 0;
    for _ in 0..N {
        a.channel_data(0x4001, &payload);
        // One at a time, so a full socket buffer cannot drop one.
        if let Some((_, Some(0x4002), d)) = b.recv_data(Duration::from_secs(2)) {
            assert_eq!(d.len(), SIZE);
            received += 1;
        }
    }
    assert_eq!(received, N, "every packet arrived");
    let after = [
        tk.metric(C2P),
        tk.metric(C2P_BYTES),
        tk.metric(P2C),
        tk.metric(P2C_BYTES),
    ];
    assert_eq!(after[0] - before[0], N as f64, "client→peer packets");
    assert_eq!(after[1] - before[1], (N * SIZE) as f64, "client→peer bytes");
    assert_eq!(after[2] - before[2], N as f64, "peer→client packets");
    assert_eq!(after[3] - before[3], (N * SIZE) as f64, "peer→client bytes");

    // M signaling messages between two peers of a room.
    let relayed0 = tk.metric("turnkey_signaling_messages_relayed_total");
    let joins0 = tk.metric("turnkey_signaling_joins_total");
    let mut p1 = ws(&tk).await;
    let mut p2 = ws(&tk).await;
    p1.send(Ws::text(r#"{"type":"join","room":"metrics"}"#))
        .await
        .unwrap();
    next_json(&mut p1, "joined").await;
    p2.send(Ws::text(r#"{"type":"join","room":"metrics"}"#))
        .await
        .unwrap();
    let joined = next_json(&mut p2, "joined").await;
    let id1 = joined["peers"][0].as_str().expect("peer id").to_string();
    const M: usize = 25;
    for i in 0..M {
        p2.send(Ws::text(format!(
            r#"{{"type":"signal","to":"{id1}","data":{{"n":{i}}}}}"#
        )))
        .await
        .unwrap();
    }
    for i in 0..M {
        let v = next_json(&mut p1, "signal").await;
        assert_eq!(v["data"]["n"], i);
    }
    p2.send(Ws::text("not json")).await.unwrap();
    next_json(&mut p2, "error").await;
    assert_eq!(
        tk.metric("turnkey_signaling_messages_relayed_total") - relayed0,
        M as f64
    );
    assert_eq!(tk.metric("turnkey_signaling_joins_total") - joins0, 2.0);
    assert_eq!(
        tk.metric(r#"turnkey_signaling_errors_total{code="bad-json"}"#),
        1.0
    );
    assert_eq!(tk.metric("turnkey_signaling_peers"), 2.0);
    assert_eq!(tk.metric("turnkey_signaling_rooms"), 1.0);

    // promtool reads the whole scrape and finds nothing to complain about.
    require("promtool", "prometheus");
    let (_, body) = common::http_get(tk.metrics, "/metrics");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = common::printed(&out);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n--- scrape ---\n{body}"
    );
    assert!(body.contains("turnkey_process_resident_memory_bytes"));
}

#[test]
fn metrics_live_on_their_own_listener_never_a_public_one() {
    let tk = Turnkey::start(
        "metrics-listen",
        &format!("{}{}", base_config("tcp_http = \"serve\""), auth_section()),
    );
    assert_ne!(tk.metrics, tk.http);
    assert_eq!(tk.get("/metrics").0, 404, "not on the public port");
    let (status, _) = common::http_get(tk.tcp.unwrap(), "/metrics");
    assert_eq!(status, 404, "not on the TURN TCP port, even serving HTTP");
    let (status, body) = common::http_get(tk.metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("turnkey_turn_allocations "));
    assert_eq!(tk.get("/healthz"), (200, "ok\n".into()));
    assert_eq!(tk.get("/readyz").0, 200);
}

fn rest(secret: &str) -> (String, String) {
    let c = turnkey::turn::auth::mint(secret, "op", turnkey::ice::unix_now(), 600);
    (c.username, c.password)
}

const OLD_SECRET: &str = "old-secret-0123456789abcdef";
const NEW_SECRET: &str = "new-secret-0123456789abcdef";

fn reload_config(secret: &str, allow_loopback: bool) -> String {
    let allow = if allow_loopback {
        r#"allowed_peer_ranges = ["127.0.0.1/32"]"#
    } else {
        ""
    };
    base_config(&format!("relay_ip = \"127.0.0.2\"\n{allow}"))
        + &format!(
            "[auth]\nsecrets = [\"{secret}\"]\n[auth.users]\nalice = \"wonderland-rabbit\"\n"
        )
}

fn wait_log(tk: &Turnkey, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tk.log_contains(needle) {
        assert!(Instant::now() < deadline, "no log line with {needle:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_reloads_secrets_and_policy_and_keeps_live_allocations() {
    let mut tk = Turnkey::start("reload", &reload_config(OLD_SECRET, true));
    // A peer on 127.0.0.1 is allowed by the operator range (the relay is on 127.0.0.2).
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (u, p) = rest(OLD_SECRET);
    let mut c = Raw::new(tk.turn, &u, &p);
    c.allocate().expect("allocates with the old secret");
    c.bind_channel(0x4000, peer.local_addr().unwrap())
        .expect("peer allowed");
    let sends = |c: &Raw| -> bool {
        let mut buf = [0u8; 64];
        (0..10).any(|_| {
            c.channel_data(0x4000, b"live");
            matches!(peer.recv_from(&mut buf), Ok((4, _)))
        })
    };
    assert!(sends(&c));

    // New secret, loopback no longer allowed; SIGHUP.
    std::fs::write(&tk.config_path, reload_config(NEW_SECRET, false)).unwrap();
    tk.signal(libc::SIGHUP);
    wait_log(&tk, "configuration reloaded");
    assert!(
        sends(&c),
        "the allocation made before the reload still relays"
    );
    let (u, p) = rest(OLD_SECRET);
    assert_eq!(
        Raw::new(tk.turn, &u, &p).allocate(),
        Err(401),
        "removed secret refused"
    );
    let (u, p) = rest(NEW_SECRET);
    let mut fresh = Raw::new(tk.turn, &u, &p);
    fresh.allocate().expect("new secret works");
    assert_eq!(
        fresh.permit(peer.local_addr().unwrap()).map(|_| ()),
        Err(403),
        "new policy applies"
    );

    // A broken file is refused; the config in force stays.
    std::fs::write(&tk.config_path, "[turn]\nrelay_port_min = \"many\"\n").unwrap();
    tk.signal(libc::SIGHUP);
    wait_log(&tk, "new configuration refused");
    let (u, p) = rest(NEW_SECRET);
    Raw::new(tk.turn, &u, &p)
        .allocate()
        .expect("still the reloaded config");
    assert!(sends(&c));
    assert!(
        tk.wait_exit(Duration::from_millis(100)).is_none(),
        "still running"
    );
}

#[test]
fn sigusr1_drains_and_exits_when_the_last_allocation_ends() {
    let mut tk = Turnkey::start("drain", &format!("{}{}", base_config(""), auth_section()));
    let (mut a, b, _, _) = channel_pair(&tk);
    assert!(relays(&a, 0x4001, &b));
    assert_eq!(tk.get("/readyz").0, 200);
    tk.signal(libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tk.get("/readyz").0 != 503 {
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut late = Raw::new(tk.turn, "alice", "wonderland-rabbit");
    assert_eq!(
        late.allocate(),
        Err(403),
        "no new allocations while draining"
    );
    assert!(relays(&a, 0x4001, &b), "live allocations keep relaying");
    assert!(relays(&b, 0x4002, &a));
    assert!(
        tk.wait_exit(Duration::from_millis(300)).is_none(),
        "waits for the live ones"
    );
    let mut b = b;
    a.refresh(0).expect("alice leaves");
    b.refresh(0).expect("bob leaves");
    let status = tk
        .wait_exit(Duration::from_secs(5))
        .expect("exits once drained");
    assert!(status.success());
}

#[tokio::test]
async fn draining_refuses_new_signaling_joins() {
    let tk = Turnkey::start(
        "drain-ws",
        &format!("{}{}", base_config(""), auth_section()),
    );
    // A peer in a room keeps the drain waiting (its call may still need
    // signaling); a newcomer is turned away.
    let mut inside = ws(&tk).await;
    inside
        .send(Ws::text(r#"{"type":"join","room":"live"}"#))
        .await
        .unwrap();
    next_json(&mut inside, "joined").await;
    let mut p = ws(&tk).await;
    tk.signal(libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tk.get("/readyz").0 != 503 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.send(Ws::text(r#"{"type":"join","room":"late"}"#))
        .await
        .unwrap();
    let e = next_json(&mut p, "error").await;
    assert_eq!(e["code"], "draining");
    let mut tk = tk;
    assert!(
        tk.wait_exit(Duration::from_millis(300)).is_none(),
        "waits for the room"
    );
    inside.send(Ws::text(r#"{"type":"leave"}"#)).await.unwrap();
    assert!(tk
        .wait_exit(Duration::from_secs(5))
        .expect("exits once the room is empty")
        .success());
}

fn turnkey_cmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_turnkey"))
        .args(args)
        .env_remove("TURNKEY_AUTH__SECRETS")
        .output()
        .expect("run turnkey")
}

#[test]
fn check_config_names_the_bad_key_and_exits_non_zero() {
    let dir = common::test_dir("check-config");
    let cases = [
        (
            "[turn]\nrelay_port_min = 60000\nrelay_port_max = 50000\n",
            "turn.relay_port_min",
        ),
        (
            "[turn]\nallowed_peer_ranges = [\"10.0.0.0/33\"]\n",
            "allowed_peer_ranges",
        ),
        ("[turn]\nlisten_typo = 1\n", "listen_typo"),
        ("[http]\nstatic_dir = \"/nonexistent\"\n", "http.static_dir"),
        ("[auth]\nsecrets = [\"short\"]\n", "auth.secrets[0]"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = turnkey_cmd(&["check-config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(
            err.contains(key),
            "{text}: error {err:?} does not name {key}"
        );
    }
    // The serve path refuses a bad file the same way.
    let out = turnkey_cmd(&["--config", dir.join("bad0.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_masked() {
    let dir = common::test_dir("check-config-ok");
    let path = dir.join("ok.toml");
    std::fs::write(
        &path,
        format!(
            "{}\n[turn]\nexternal_ip = \"198.51.100.7\"\n",
            auth_section()
        ),
    )
    .unwrap();
    let out = turnkey_cmd(&["check-config", path.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("external_ip = \"198.51.100.7\""), "{text}");
    assert!(
        text.contains("relay_port_min = 49152"),
        "defaults are shown: {text}"
    );
    assert!(
        !text.contains(SECRET) && !text.contains("wonderland-rabbit"),
        "{text}"
    );
}

#[test]
fn credentials_command_mints_what_the_server_accepts() {
    let tk = Turnkey::start(
        "credentials",
        &format!("{}{}", base_config(""), auth_section()),
    );
    let out = turnkey_cmd(&[
        "--config",
        tk.config_path.to_str().unwrap(),
        "credentials",
        "--user",
        "script",
        "--ttl",
        "120",
        "--label",
        "acme",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let user = v["username"].as_str().unwrap();
    assert!(user.ends_with(":script|acme"), "{user}");
    let mut c = Raw::new(tk.turn, user, v["password"].as_str().unwrap());
    c.allocate().expect("minted credential allocates");
    // Without a secret the command refuses rather than mint something useless.
    let dir = common::test_dir("credentials-nosecret");
    let path = dir.join("nosecret.toml");
    std::fs::write(&path, "").unwrap();
    let out = turnkey_cmd(&[
        "--config",
        path.to_str().unwrap(),
        "credentials",
        "--user",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.secrets"));
    let out = turnkey_cmd(&[
        "--config",
        tk.config_path.to_str().unwrap(),
        "credentials",
        "--user",
        "x",
        "--label",
        "not a label",
    ]);
    assert_eq!(out.status.code(), Some(2), "a bad label is refused");
}

#[test]
fn api_ice_servers_gives_a_working_rest_credential() {
    let tk = Turnkey::start(
        "ice-servers",
        &format!("{}{}", base_config(""), auth_section()),
    );
    let (status, body) = tk.get("/api/ice-servers");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let port = tk.turn.port();
    assert_eq!(
        v["iceServers"][0]["urls"][0],
        format!("stun:127.0.0.1:{port}")
    );
    assert_eq!(
        v["iceServers"][1]["urls"][0],
        format!("turn:127.0.0.1:{port}?transport=udp")
    );
    assert_eq!(v["ttl"], 86400);
    let mut c = Raw::new(
        tk.turn,
        v["iceServers"][1]["username"].as_str().unwrap(),
        v["iceServers"][1]["credential"].as_str().unwrap(),
    );
    c.allocate().expect("the page's credential allocates");
    // The page itself is served.
    let (status, page) = tk.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("<"), "{page}");
}

#[test]
fn every_metric_on_the_grafana_dashboard_exists() {
    let tk = Turnkey::start(
        "dashboard",
        &format!("{}{}", base_config(""), auth_section()),
    );
    let (_, scrape) = common::http_get(tk.metrics, "/metrics");
    let exported: Vec<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut used = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("turnkey_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exported.contains(&name.as_str()),
                    "dashboard uses {name}, which /metrics does not export"
                );
                used += 1;
            }
        }
    }
    assert!(used > 15);
}
