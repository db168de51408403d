//! The relay under abuse, against the real binary on loopback: quotas per
//! user and per address, ports that fail to bind come back, bandwidth
//! budgets, request budgets before authentication, the TCP and TLS
//! listeners' separate budgets, the admin API, allocation age and
//! revocation on reload. Every flood is bounded in count and time.

mod common;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::stream::{https_healthz, tls_connect, tls_setup, StreamTurn};
use common::{admin, auth_section, base_config, Turnkey, SECRET};

/// A REST credential for `user` minted with the test secret.
fn rest(user: &str, ttl: u64) -> (String, String) {
    let c = turnkey::turn::auth::mint(SECRET, user, turnkey::ice::unix_now(), ttl);
    (c.username, c.password)
}

fn start(name: &str, turn: &str) -> Turnkey {
    Turnkey::start(name, &format!("{}{}", base_config(turn), auth_section()))
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_users_credentials_share_one_quota() {
    let tk = start("quota-user", "user_quota = 3");
    let mut held = Vec::new();
    // Five credentials of one user, each with another expiry.
    for (i, ttl) in [600, 700, 800, 900, 1000].into_iter().enumerate() {
        let (u, p) = rest("carol", ttl);
        let mut c = Raw::new(tk.turn, &u, &p);
        let got = c.allocate();
        if i < 3 {
            got.unwrap_or_else(|e| panic!("allocation {} refused: {e}", i + 1));
            held.push(c);
        } else {
            assert_eq!(
                got,
                Err(486),
                "allocation {} beyond the user's quota",
                i + 1
            );
        }
    }
    // Another user is not affected.
    let (u, p) = rest("dave", 600);
    Raw::new(tk.turn, &u, &p)
        .allocate()
        .expect("another user allocates");
    assert_eq!(
        tk.metric(r#"turnkey_turn_quota_rejections_total{kind="user"}"#),
        2.0
    );
}

#[test]
fn one_address_gets_its_quota_and_another_address_still_allocates() {
    let tk = start("quota-ip", "ip_quota = 20\nunauth_requests_per_sec = 0");
    let mut held = Vec::new();
    for i in 0..21 {
        let (u, p) = rest(&format!("user{i}"), 600);
        let mut c = Raw::bound("127.0.0.1:0", tk.turn, &u, &p);
        let got = c.allocate();
        if i < 20 {
            got.unwrap_or_else(|e| panic!("allocation {} refused: {e}", i + 1));
            held.push(c);
        } else {
            assert_eq!(got, Err(486), "the 21st allocation from one address");
        }
    }
    let (u, p) = rest("elsewhere", 600);
    Raw::bound("127.0.0.2:0", tk.turn, &u, &p)
        .allocate()
        .expect("a client from another address allocates");
    assert_eq!(
        tk.metric(r#"turnkey_turn_quota_rejections_total{kind="ip"}"#),
        1.0
    );
}

/// The relay address of the port test: no other test binds it, and its
/// ports lie above the kernel's ephemeral range, so only the test's own
/// squatters can hold them.
const RELAY_IP: &str = "127.0.0.77";

/// A run of `n` free UDP ports on [`RELAY_IP`].
fn free_port_range(n: u16) -> u16 {
    'base: for base in (61_000..65_400).step_by(usize::from(n) + 7) {
        for p in base..base + n {
            if UdpSocket::bind((RELAY_IP, p)).is_err() {
                continue 'base;
            }
        }
        return base;
    }
    panic!("no run of {n} free UDP ports");
}

#[test]
fn ports_that_fail_to_bind_come_back_to_the_pool() {
    let base = free_port_range(100);
    let tk = start(
        "port-leak",
        &format!(
            "relay_ip = \"{RELAY_IP}\"\nrelay_port_min = {base}\nrelay_port_max = {}\n\
             user_quota = 0\nip_quota = 0\nunauth_requests_per_sec = 0",
            base + 99
        ),
    );
    let free = r#"turnkey_turn_relay_ports{state="free"}"#;
    let used = r#"turnkey_turn_relay_ports{state="used"}"#;
    assert_eq!(tk.metric(free), 100.0);
    // Another process holds every even port for one round of allocations.
    let squatters: Vec<UdpSocket> = (base..base + 100)
        .step_by(2)
        .map(|p| UdpSocket::bind((RELAY_IP, p)).expect("hold a port"))
        .collect();
    let mut round = Vec::new();
    for _ in 0..100 {
        let mut c = Raw::new(tk.turn, "alice", "wonderland-rabbit");
        if c.allocate().is_ok() {
            round.push(c);
        }
    }
    assert_eq!(round.len(), 50, "only the 50 free ports can be allocated");
    assert!(tk.metric("turnkey_turn_relay_bind_failures_total") >= 50.0);
    for c in &mut round {
        c.refresh(0).expect("delete");
    }
    drop(squatters);
    // Cooled off, every port is back and the gauges say so.
    wait_until("the ports never came back", Duration::from_secs(10), || {
        tk.metric(free) == 100.0
    });
    let mut all = Vec::new();
    for i in 0..100 {
        let mut c = Raw::new(tk.turn, "alice", "wonderland-rabbit");
        c.allocate()
            .unwrap_or_else(|e| panic!("allocation {} refused: {e}", i + 1));
        all.push(c);
    }
    assert_eq!((tk.metric(free), tk.metric(used)), (0.0, 100.0));
}

/// Sends `bytes_per_sec` over a channel from `from` to `to` for `secs`,
/// in 1000-byte packets; the bytes `to` received in that time.
fn stream(from: Raw, to: Raw, ch: u16, bytes_per_sec: u64, secs: u64) -> u64 {
    let got = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (got, done) = (got.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some((_, _, d)) = to.recv_data(Duration::from_millis(100)) {
                    got.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
        })
    };
    let payload = vec![0x5a; 1000];
    let interval = Duration::from_secs_f64(1000.0 / bytes_per_sec as f64);
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < Duration::from_secs(secs) {
        from.channel_data(ch, &payload);
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    // What is in flight arrives within a moment.
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    receiver.join().unwrap();
    got.load(Ordering::Relaxed)
}

fn pair(tk: &Turnkey, a: &str, b: &str) -> (Raw, Raw) {
    let (u, p) = rest(a, 600);
    let mut x = Raw::new(tk.turn, &u, &p);
    let (u, p) = rest(b, 600);
    let mut y = Raw::new(tk.turn, &u, &p);
    let rx = x.allocate().expect("allocates");
    let ry = y.allocate().expect("allocates");
    x.bind_channel(0x4001, ry).expect("binds");
    y.bind_channel(0x4002, rx).expect("binds");
    (x, y)
}

#[test]
fn an_allocation_gets_its_bandwidth_and_no_more_and_others_are_unaffected() {
    let tk = start("bandwidth", "max_bps = 125000");
    let (a, b) = pair(&tk, "fast-sender", "its-peer");
    let (c, d) = pair(&tk, "calm-sender", "calm-peer");
    // 3 Mbit/s offered on one allocation, 0.5 Mbit/s on the other, at once.
    let calm = std::thread::spawn(move || stream(c, d, 0x4001, 62_500, 10));
    let got = stream(a, b, 0x4001, 375_000, 10);
    let calm = calm.join().unwrap();
    let rate = got as f64 / 10.0;
    assert!(
        (112_500.0..=137_500.0).contains(&rate),
        "delivered {rate} B/s for a 125000 B/s budget"
    );
    assert!(
        calm as f64 >= 0.95 * 625_000.0,
        "the other allocation got {calm} of 625000 bytes"
    );
    assert!(tk.metric(r#"turnkey_turn_dropped_packets_total{reason="over_bandwidth"}"#) > 1000.0);
}

#[test]
fn a_flood_of_unauthenticated_requests_is_answered_only_within_its_budget() {
    let tk = start("preauth-flood", "");
    let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
    flood.set_nonblocking(true).unwrap();
    let (allocate, _) = common::raw::build_message(
        stun::message::METHOD_ALLOCATE,
        stun::message::CLASS_REQUEST,
        Vec::new(),
        None,
    );
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (answered, stop) = (answered.clone(), stop.clone());
        let sock = flood.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                match sock.recv_from(&mut buf) {
                    Ok(_) => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })
    };
    // Meanwhile a conformant client from another address allocates and relays.
    let bystander = {
        let turn = tk.turn;
        std::thread::spawn(move || {
            let (u, p) = rest("bystander", 600);
            let mut x = Raw::bound("127.0.0.2:0", turn, &u, &p);
            let (u, p) = rest("bystander-peer", 600);
            let mut y = Raw::bound("127.0.0.2:0", turn, &u, &p);
            let rx = x.allocate().expect("bystander allocates during the flood");
            let ry = y.allocate().expect("its peer allocates");
            x.bind_channel(0x4001, ry).unwrap();
            y.bind_channel(0x4002, rx).unwrap();
            (0..20).any(|_| {
                x.channel_data(0x4001, b"through");
                y.recv_data(Duration::from_millis(100))
                    .is_some_and(|(_, _, d)| d == b"through")
            })
        })
    };
    let started = Instant::now();
    for i in 0..10_000u32 {
        let _ = flood.send_to(&allocate, tk.turn);
        if i % 1000 == 999 {
            std::thread::sleep(Duration::from_millis(90));
        }
    }
    let took = started.elapsed();
    assert!(
        bystander.join().unwrap(),
        "the bystander's data was relayed"
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    counter.join().unwrap();
    let answered = answered.load(Ordering::Relaxed);
    // 20 per second, 40 at once (the defaults).
    let budget = 40.0 + 20.0 * (took.as_secs_f64() + 0.3);
    assert!(
        answered as f64 <= budget,
        "{answered} answers in {took:?}, budget {budget}"
    );
    assert!(answered >= 20, "the budget is answered ({answered})");
    let limited = tk.metric("turnkey_turn_rate_limited_total");
    assert!(
        limited >= 10_000.0 - budget - 100.0,
        "only {limited} counted as rate limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_tcp_connections_leaves_https_and_turn_tls_working() {
    let (pki, _dir, tls) = tls_setup("tcp-flood", "localhost");
    let tk = Turnkey::start(
        "tcp-flood",
        &format!("{}{}{tls}", base_config(""), auth_section()),
    );
    let (tcp_port, tls_port) = (tk.tcp.unwrap(), tk.tls.unwrap());
    // 3,000 idle connections from 100 loopback addresses to 3478/tcp.
    let mut held = Vec::new();
    for i in 0..3000u32 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        let ip = format!("127.0.1.{}", 10 + i % 100);
        sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        if let Ok(s) = sock.connect(tcp_port).await {
            held.push(s);
        }
    }
    // 16 per address (the default) of 30 each are kept; turnkey counts the
    // rest as it works through its accept backlog.
    let refused = r#"turnkey_stream_connections_total{result="refused_over_limit"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tk.metric(refused) < 1300.0 {
        assert!(
            Instant::now() < deadline,
            "only {} refused: the caps did not bite",
            tk.metric(refused)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // HTTPS and TURN/TLS on the TLS port, 20 of 20.
    for i in 0..20 {
        let body = https_healthz(&pki, tls_port).await;
        assert!(body.starts_with("HTTP/1.1 200"), "HTTPS {i}: {body}");
        let tls = tls_connect(&pki, tls_port, &[]).await;
        let mut t = StreamTurn::new(tls, "alice", "wonderland-rabbit");
        t.allocate()
            .await
            .unwrap_or_else(|e| panic!("TURN/TLS {i}: {e}"));
    }
    // TURN/TCP from another address.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let tcp = sock.connect(tcp_port).await.unwrap();
    let mut t = StreamTurn::new(tcp, "alice", "wonderland-rabbit");
    t.allocate().await.expect("TURN/TCP from another address");
    drop(held);
}

const ADMIN_TOKEN: &str = "admin-token-for-the-tests-0123";

#[test]
fn the_admin_api_lists_and_ends_sessions() {
    let tk = Turnkey::start(
        "admin",
        &format!(
            "{}{}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n",
            base_config(""),
            auth_section()
        ),
    );
    assert_eq!(admin(&tk, "GET", "/admin/allocations", None).0, 401);
    assert_eq!(
        admin(
            &tk,
            "GET",
            "/admin/allocations",
            Some("wrong-token-0123456789")
        )
        .0,
        401
    );
    let (u, p) = rest("erin", 600);
    let mut one = Raw::new(tk.turn, &u, &p);
    let relayed = one.allocate().expect("allocates");
    let mut two = Raw::new(tk.turn, "alice", "wonderland-rabbit");
    two.allocate().expect("allocates");
    let (status, list) = admin(&tk, "GET", "/admin/allocations", Some(ADMIN_TOKEN));
    assert_eq!(status, 200);
    let all = list["allocations"].as_array().unwrap();
    assert_eq!(all.len(), 2);
    let erin = all
        .iter()
        .find(|a| a["user"] == "erin")
        .expect("erin listed");
    assert_eq!(erin["username"], u);
    assert_eq!(erin["client"], one.local().to_string());
    assert_eq!(erin["transport"], "udp");
    assert_eq!(erin["relayed"][0], relayed.to_string());
    let id = erin["id"].as_u64().unwrap();

    // By id: the client's next Refresh finds nothing, the port is free.
    let used = r#"turnkey_turn_relay_ports{state="used"}"#;
    assert_eq!(tk.metric(used), 2.0);
    let (status, ended) = admin(
        &tk,
        "DELETE",
        &format!("/admin/allocations/{id}"),
        Some(ADMIN_TOKEN),
    );
    assert_eq!((status, ended["ended"].as_u64()), (200, Some(1)));
    assert_eq!(one.refresh(600).map(|_| ()), Err(437));
    assert_eq!(tk.metric(used), 1.0);
    assert_eq!(
        admin(
            &tk,
            "DELETE",
            &format!("/admin/allocations/{id}"),
            Some(ADMIN_TOKEN)
        )
        .0,
        404
    );

    // By user.
    let (status, ended) = admin(&tk, "DELETE", "/admin/users/alice", Some(ADMIN_TOKEN));
    assert_eq!((status, ended["ended"].as_u64()), (200, Some(1)));
    assert_eq!(two.refresh(600).map(|_| ()), Err(437));
    assert_eq!(tk.metric(used), 0.0);
    // Each start and end is logged, never with a secret.
    assert!(tk.log_contains("allocation started"));
    assert!(tk.log_contains("allocation ended: ended by the operator"));
    assert!(!tk.log_contains("wonderland-rabbit") && !tk.log_contains(&p));
}

#[test]
fn an_allocation_ends_at_its_maximum_age_however_often_refreshed() {
    let tk = start("max-age", "max_allocation_age_secs = 3");
    let mut c = Raw::new(tk.turn, "alice", "wonderland-rabbit");
    c.allocate().expect("allocates");
    let started = Instant::now();
    let ended = loop {
        std::thread::sleep(Duration::from_millis(500));
        if c.refresh(600).is_err() {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(8), "it lived on");
    };
    assert!(ended >= Duration::from_secs(3), "ended after {ended:?}");
    assert!(tk.log_contains("allocation ended: expired"));
}

#[test]
fn a_reload_that_removes_a_user_or_secret_ends_their_allocations_when_asked() {
    let config = |users: &str, secret: &str| {
        format!(
            "{}[auth]\nrevoke_on_reload = true\nsecrets = [\"{secret}\"]\n[auth.users]\n{users}",
            base_config("")
        )
    };
    let mut tk = Turnkey::start(
        "revoke",
        &config(
            "alice = \"wonderland-rabbit\"\nbob = \"builder-of-things\"\n",
            SECRET,
        ),
    );
    let mut alice = Raw::new(tk.turn, "alice", "wonderland-rabbit");
    alice.allocate().expect("alice allocates");
    let mut bob = Raw::new(tk.turn, "bob", "builder-of-things");
    bob.allocate().expect("bob allocates");
    let (u, p) = rest("rest-user", 600);
    let mut rest_user = Raw::new(tk.turn, &u, &p);
    rest_user.allocate().expect("REST user allocates");

    // alice removed, the secret rotated: both go; bob stays.
    std::fs::write(
        &tk.config_path,
        config(
            "bob = \"builder-of-things\"\n",
            "a-brand-new-secret-0123456789",
        ),
    )
    .unwrap();
    tk.signal(libc::SIGHUP);
    wait_until(
        "the reload never ended alice's allocation",
        Duration::from_secs(5),
        || tk.metric("turnkey_turn_allocations") == 1.0,
    );
    // Their credentials are gone too, so the server cannot even tell them
    // there is no allocation: 401.
    assert_eq!(alice.refresh(600).map(|_| ()), Err(401));
    assert_eq!(rest_user.refresh(600).map(|_| ()), Err(401));
    bob.refresh(600).expect("bob keeps his");
    assert!(tk.log_contains("allocation ended: revoked by reload"));
    assert!(tk.wait_exit(Duration::from_millis(10)).is_none());
}

#[test]
fn short_static_passwords_are_refused_at_load() {
    let dir = common::test_dir("short-password");
    let file = dir.join("turnkey.toml");
    std::fs::write(&file, "[auth.users]\nmallory = \"short-pass\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnkey"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = common::printed(&out);
    assert!(
        text.contains("auth.users.mallory") && text.contains("12 characters"),
        "{text}"
    );
    assert!(!text.contains("short-pass"), "the password was printed");
}
