//! Usage per user and label against the real binary on loopback: two
//! users of two tenants relay known byte counts (one over UDP, one over
//! TCP) and `/admin/usage` and the per-label Prometheus series tell them
//! apart, live and after the allocations ended; labels past
//! `usage.max_labels` count as `other`, and ten thousand users leave
//! `/metrics` as it was. Revoking a user or a label ends its allocations
//! and refuses its credentials.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::stream::StreamTurn;
use common::{admin, admin_with, auth_section, base_config, http_get, Turnkey, SECRET};

const TOKEN_SECRET: &str = "usage-token-secret-for-the-tests-0123456789";
const ADMIN_TOKEN: &str = "usage-admin-token-0123456789";

/// Token access, the admin API, relays on 127.0.0.2 and peers allowed on
/// 127.0.0.1; `more` is appended (a `[usage]` section).
fn config(more: &str) -> String {
    format!(
        "{}{}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n\
         [access]\nmode = \"token\"\ntoken_secret = [\"{TOKEN_SECRET}\"]\nmints_per_minute = 0\n{more}",
        base_config("relay_ip = \"127.0.0.2\"\nallowed_peer_ranges = [\"127.0.0.1/32\"]"),
        auth_section()
    )
}

/// The TURN credential `/api/ice-servers` gives a token for `sub` with a
/// `label` claim: (username, password).
fn credential(tk: &Turnkey, sub: &str, label: &str) -> (String, String) {
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": sub, "label": label, "exp": turnkey::ice::unix_now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(TOKEN_SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    let (status, body) = http_get(tk.http, &format!("/api/ice-servers?token={token}"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let turn = &v["iceServers"][1];
    (
        turn["username"].as_str().unwrap().to_string(),
        turn["credential"].as_str().unwrap().to_string(),
    )
}

/// `/admin/usage?by=…` as name → row.
fn usage(tk: &Turnkey, by: &str) -> std::collections::BTreeMap<String, serde_json::Value> {
    let (status, v) = admin(
        tk,
        "GET",
        &format!("/admin/usage?by={by}"),
        Some(ADMIN_TOKEN),
    );
    assert_eq!(status, 200, "{v}");
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

/// Within 1 % of `want`.
fn near(row: &serde_json::Value, key: &str, want: u64) {
    let got = row[key].as_u64().unwrap_or(0);
    assert!(
        got.abs_diff(want) * 100 <= want,
        "{key}: {got}, sent {want}: {row}"
    );
}

/// Receives up to `n` datagrams on `peer` within a deadline; how many.
fn peer_receives(peer: &UdpSocket, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while got < n && Instant::now() < deadline {
        if peer.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    got
}

fn udp_peer() -> UdpSocket {
    let p = UdpSocket::bind("127.0.0.1:0").unwrap();
    p.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    p
}

/// What each user sends: packets × size to the peer, and back.
const ALICE_UP: (usize, usize) = (200, 1000);
const ALICE_DOWN: (usize, usize) = (100, 500);
const BOB_UP: (usize, usize) = (150, 800);
const BOB_DOWN: (usize, usize) = (80, 300);

fn bytes((n, size): (usize, usize)) -> u64 {
    (n * size) as u64
}

/// Relays `up` to a fresh UDP peer through `send` and `down` from it to
/// `relayed`, read by `recv`, in batches the receiver takes in before the
/// next, so nothing is lost to a full socket buffer. `bind` binds a
/// channel to the peer first.
fn relay_known_bytes(
    relayed: SocketAddr,
    bind: impl FnOnce(SocketAddr),
    mut send: impl FnMut(&[u8]),
    mut recv: impl FnMut() -> bool,
    up: (usize, usize),
    down: (usize, usize),
) {
    const BATCH: usize = 10;
    let peer = udp_peer();
    bind(peer.local_addr().unwrap());
    let mut arrived = 0;
    for _ in 0..up.0 / BATCH {
        for _ in 0..BATCH {
            send(&vec![7u8; up.1]);
        }
        arrived += peer_receives(&peer, BATCH);
    }
    assert_eq!(arrived, up.0, "packets to the peer were lost");
    let mut back = 0;
    for _ in 0..down.0 / BATCH {
        for _ in 0..BATCH {
            peer.send_to(&vec![8u8; down.1], relayed).unwrap();
        }
        back += (0..BATCH).filter(|_| recv()).count();
    }
    assert_eq!(back, down.0, "packets to the client were lost");
}

/// Alice (label `acme`) over UDP; her client, still allocated.
fn alice_relays(tk: &Turnkey) -> Raw {
    let (user, pass) = credential(tk, "alice", "acme");
    assert!(user.ends_with(":alice|acme"), "{user}");
    let mut a = Raw::new(tk.turn, &user, &pass);
    let relayed = a.allocate().expect("alice allocates");
    let a = std::cell::RefCell::new(a);
    relay_known_bytes(
        relayed,
        |peer| {
            a.borrow_mut()
                .bind_channel(0x4001, peer)
                .expect("alice binds");
        },
        |data| a.borrow().channel_data(0x4001, data),
        || a.borrow().recv_data(Duration::from_secs(2)).is_some(),
        ALICE_UP,
        ALICE_DOWN,
    );
    a.into_inner()
}

/// Bob (label `globex`) over TCP; his client, still allocated. Runs
/// inside `block_in_place`, driving the async client with `block_on`.
fn bob_relays(tk: &Turnkey) -> StreamTurn<tokio::net::TcpStream> {
    let rt = tokio::runtime::Handle::current();
    let (user, pass) = credential(tk, "bob", "globex");
    let tcp = rt
        .block_on(tokio::net::TcpStream::connect(
            tk.tcp.expect("TCP listener"),
        ))
        .unwrap();
    let mut b = StreamTurn::new(tcp, &user, &pass);
    let relayed = rt.block_on(b.allocate()).expect("bob allocates over TCP");
    let b = std::cell::RefCell::new(b);
    relay_known_bytes(
        relayed,
        |peer| {
            rt.block_on(b.borrow_mut().bind_channel(0x4002, peer))
                .expect("bob binds");
        },
        |data| rt.block_on(b.borrow_mut().channel_data(0x4002, data)),
        || {
            rt.block_on(b.borrow_mut().recv_channel(Duration::from_secs(2)))
                .is_some()
        },
        BOB_UP,
        BOB_DOWN,
    );
    b.into_inner()
}

/// Alice's and Bob's rows (by user or by label) match what they sent.
fn rows_match(rows: &std::collections::BTreeMap<String, serde_json::Value>, a: &str, b: &str) {
    let (ra, rb) = (&rows[a], &rows[b]);
    near(ra, "bytes_to_peer", bytes(ALICE_UP));
    near(ra, "bytes_to_client", bytes(ALICE_DOWN));
    near(ra, "packets_to_peer", ALICE_UP.0 as u64);
    near(ra, "packets_to_client", ALICE_DOWN.0 as u64);
    near(rb, "bytes_to_peer", bytes(BOB_UP));
    near(rb, "bytes_to_client", bytes(BOB_DOWN));
    near(rb, "packets_to_peer", BOB_UP.0 as u64);
    near(rb, "packets_to_client", BOB_DOWN.0 as u64);
    assert_eq!(ra["allocations"], 1, "{ra}");
    assert_eq!(rb["allocations"], 1, "{rb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_by_user_and_label_matches_the_bytes_sent_live_and_after() {
    let tk = Turnkey::start("usage", &config(""));
    assert_eq!(
        admin(&tk, "GET", "/admin/usage", None).0,
        401,
        "the admin token guards usage too"
    );
    let (mut a, b) = tokio::task::block_in_place(|| (alice_relays(&tk), bob_relays(&tk)));

    // Live: the core's own counts of the open allocations.
    let by_user = usage(&tk, "user");
    rows_match(&by_user, "alice", "bob");
    assert_eq!(by_user["alice"]["active"], 1);
    // Bob's bytes are fewer: he comes second.
    let names: Vec<_> = by_user.keys().cloned().collect();
    assert_eq!(names, ["alice", "bob"]);
    rows_match(&usage(&tk, "label"), "acme", "globex");

    // Ended: Alice deletes hers, Bob's connection closes.
    tokio::task::block_in_place(|| a.refresh(0)).expect("alice deletes");
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows = usage(&tk, "label");
        if rows.values().all(|r| r["active"] == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "allocations never ended: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rows_match(&usage(&tk, "user"), "alice", "bob");
    let by_label = usage(&tk, "label");
    rows_match(&by_label, "acme", "globex");
    assert!(by_label["acme"]["allocation_seconds"].as_f64().unwrap() > 0.0);

    // Prometheus, per label.
    let series = |name: &str, label: &str, dir: &str| {
        tk.metric(&format!(
            r#"turnkey_usage_{name}_total{{direction="{dir}",label="{label}"}}"#
        )) as u64
    };
    for (label, up, down) in [("acme", ALICE_UP, ALICE_DOWN), ("globex", BOB_UP, BOB_DOWN)] {
        for (got, want) in [
            (series("bytes", label, "client_to_peer"), bytes(up)),
            (series("bytes", label, "peer_to_client"), bytes(down)),
            (series("packets", label, "client_to_peer"), up.0 as u64),
            (series("packets", label, "peer_to_client"), down.0 as u64),
        ] {
            assert!(got.abs_diff(want) * 100 <= want, "{label}: {got} != {want}");
        }
        let allocs = tk.metric(&format!(
            r#"turnkey_usage_allocations_total{{label="{label}"}}"#
        ));
        assert_eq!(allocs, 1.0, "{label}");
    }
    let log = tk.log.lock().unwrap().clone();
    let ended = log
        .iter()
        .find(|l| l.contains(":alice|acme") && l.contains("allocation ended"))
        .expect("alice's end is logged");
    assert!(ended.contains("label=acme"), "{ended}");

    // A reset starts the report afresh; the counters keep counting.
    let (status, _) = admin(&tk, "DELETE", "/admin/usage", Some(ADMIN_TOKEN));
    assert_eq!(status, 200);
    assert!(usage(&tk, "user").is_empty());
    assert_eq!(series("bytes", "acme", "client_to_peer"), bytes(ALICE_UP));
}

/// Every series of `/metrics` by name and labels, without values, process
/// metrics aside (their values are their labels' business, not ours).
fn series_set(tk: &Turnkey) -> BTreeSet<String> {
    let (_, body) = http_get(tk.metrics, "/metrics");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("process_"))
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_string()))
        .collect()
}

/// Allocates and deletes at once as `user` of `label`, through a client
/// that keeps its nonce across users (one challenge per client).
fn allocate_and_delete(c: &mut Raw, user: &str, label: Option<&str>) {
    let cred =
        turnkey::turn::auth::mint_labelled(SECRET, user, label, turnkey::ice::unix_now(), 600);
    c.user = cred.username;
    c.pass = cred.password;
    c.allocate().expect("allocate");
    c.refresh(0).expect("delete");
}

#[test]
fn labels_past_the_limit_are_other_and_many_users_leave_metrics_alone() {
    let tk = Turnkey::start("usage-bounds", &config("[usage]\nmax_labels = 1\n"));
    let mut c = Raw::new(tk.turn, "", "");
    for (user, label) in [("u1", "first"), ("u2", "second"), ("u3", "third")] {
        allocate_and_delete(&mut c, user, Some(label));
    }
    allocate_and_delete(&mut c, "u4", None);
    // The answer to the delete left after the shard counted the end.
    let by_label = usage(&tk, "label");
    assert_eq!(by_label["other"]["allocations"], 2, "{by_label:?}");
    let names: Vec<_> = by_label.keys().map(String::as_str).collect();
    assert_eq!(names, ["", "first", "other"]);
    let before = series_set(&tk);
    let labelled: Vec<_> = before
        .iter()
        .filter(|s| s.starts_with("turnkey_usage_allocations_total"))
        .collect();
    assert_eq!(
        labelled,
        [
            r#"turnkey_usage_allocations_total{label=""}"#,
            r#"turnkey_usage_allocations_total{label="first"}"#,
            r#"turnkey_usage_allocations_total{label="other"}"#,
        ]
    );

    // Ten thousand users, from four clients at once.
    std::thread::scope(|s| {
        for t in 0..4 {
            let turn = tk.turn;
            s.spawn(move || {
                let mut c = Raw::new(turn, "", "");
                for i in 0..2500 {
                    let label = ["first", "fourth"][i % 2];
                    allocate_and_delete(&mut c, &format!("user-{t}-{i}"), Some(label));
                }
            });
        }
    });
    assert_eq!(series_set(&tk), before, "/metrics grew with the users");
    let (_, v) = admin(
        &tk,
        "GET",
        "/admin/usage?by=user&limit=20000",
        Some(ADMIN_TOKEN),
    );
    assert_eq!(v["rows"].as_array().unwrap().len(), 10_004);
    assert_eq!(
        tk.metric(r#"turnkey_usage_allocations_total{label="other"}"#),
        2.0 + 5000.0
    );
}

fn revoke(tk: &Turnkey, body: serde_json::Value) -> (u16, serde_json::Value) {
    admin_with(tk, "POST", "/admin/revoke", Some(ADMIN_TOKEN), Some(&body))
}

#[test]
fn revoking_a_user_or_a_label_ends_its_allocations_and_refuses_its_credentials() {
    let tk = Turnkey::start("usage-revoke", &config(""));
    let (alice_user, alice_pass) = credential(&tk, "alice", "acme");
    let (carol_user, carol_pass) = credential(&tk, "carol", "globex");
    let (bob_user, bob_pass) = credential(&tk, "bob", "acme");
    let mut alice = Raw::new(tk.turn, &alice_user, &alice_pass);
    let mut carol = Raw::new(tk.turn, &carol_user, &carol_pass);
    alice.allocate().expect("alice allocates");
    carol.allocate().expect("carol allocates");
    assert!(alice.refresh(600).is_ok());

    assert_eq!(revoke(&tk, serde_json::json!({})).0, 400);
    assert_eq!(
        revoke(&tk, serde_json::json!({"user": "a", "label": "b"})).0,
        400
    );
    let (status, v) = revoke(&tk, serde_json::json!({"user": "alice"}));
    assert_eq!((status, &v["ended"]), (200, &serde_json::json!(1)), "{v}");
    // The answer left after the shards ended it: her next Refresh fails.
    assert!(alice.refresh(600).is_err(), "alice's allocation is gone");
    let mut again = Raw::new(tk.turn, &alice_user, &alice_pass);
    assert_eq!(again.allocate(), Err(401), "her credential is refused");
    // So is one minted in the second of the revocation (it expires no
    // later than those she had), not one minted a second after.
    const TTL: u64 = 24 * 3600; // auth.rest_ttl_secs
    let until = v["refused_until"].as_u64().unwrap();
    let minted_at = |t: u64| {
        let c = turnkey::turn::auth::mint_labelled(SECRET, "alice", Some("acme"), t, TTL);
        Raw::new(tk.turn, &c.username, &c.password)
    };
    assert_eq!(minted_at(until - TTL).allocate(), Err(401));
    let mut later = minted_at(until - TTL + 1);
    assert!(later.allocate().is_ok(), "a later credential passes");
    assert!(carol.refresh(600).is_ok(), "others keep theirs");

    // A label: every user of it.
    let (status, v) = revoke(&tk, serde_json::json!({"label": "globex"}));
    assert_eq!((status, &v["ended"]), (200, &serde_json::json!(1)), "{v}");
    assert!(carol.refresh(600).is_err(), "carol's allocation is gone");
    let mut carol2 = Raw::new(tk.turn, &carol_user, &carol_pass);
    assert_eq!(carol2.allocate(), Err(401));
    let mut bob = Raw::new(tk.turn, &bob_user, &bob_pass);
    assert!(bob.allocate().is_ok(), "another label is untouched");
    assert!(tk.metric(r#"turnkey_turn_auth_failures_total{reason="revoked"}"#) >= 3.0);

    // The per-user end still works.
    let (status, v) = admin(&tk, "DELETE", "/admin/users/bob", Some(ADMIN_TOKEN));
    assert_eq!((status, &v["ended"]), (200, &serde_json::json!(1)), "{v}");
}

/// A 5 MB daily budget with `action = "end"`: the allocation that crosses
/// it ends, the next Allocate gets 486, and the log says why.
#[test]
fn a_spent_daily_budget_ends_the_allocation_and_refuses_the_next() {
    let budget = "[[usage.budgets]]\nlabel = \"acme\"\nbytes_per_day = 5000000\naction = \"end\"\n";
    let tk = Turnkey::start(
        "usage-budget",
        &config(budget).replace("relay_ip = ", "max_bps = 1000000000\nrelay_ip = "),
    );
    let cred = |user: &str, label: &str| {
        let c = turnkey::turn::auth::mint_labelled(
            SECRET,
            user,
            Some(label),
            turnkey::ice::unix_now(),
            600,
        );
        (c.username, c.password)
    };
    let (user, pass) = cred("alice", "acme");
    let mut alice = Raw::new(tk.turn, &user, &pass);
    alice.allocate().expect("alice allocates");
    let peer = udp_peer();
    peer.set_nonblocking(true).unwrap();
    alice
        .bind_channel(0x4001, peer.local_addr().unwrap())
        .expect("alice binds");
    let packet = [3u8; 1000];
    let mut sent = 0usize;
    let mut crossed: Option<Instant> = None;
    loop {
        for _ in 0..100 {
            alice.channel_data(0x4001, &packet);
        }
        sent += 100 * packet.len();
        // Let the peer's buffer drain; what it got does not matter here.
        while peer.recv_from(&mut [0u8; 2048]).is_ok() {}
        if sent == 4_000_000 {
            assert!(
                alice.refresh(600).is_ok(),
                "ended before its budget was spent"
            );
        }
        if sent >= 5_000_000 {
            let at = *crossed.get_or_insert_with(Instant::now);
            if alice.refresh(600).is_err() {
                break;
            }
            assert!(
                at.elapsed() < Duration::from_secs(3),
                "the allocation outlived its budget"
            );
        }
    }
    let mut next = Raw::new(tk.turn, &user, &pass);
    assert_eq!(next.allocate(), Err(486), "the next Allocate is refused");
    assert!(tk.log_contains("budget exceeded"));
    assert!(tk.metric(r#"turnkey_turn_quota_rejections_total{kind="budget"}"#) >= 1.0);
    let (other, other_pass) = cred("bob", "globex");
    assert!(
        Raw::new(tk.turn, &other, &other_pass).allocate().is_ok(),
        "another label's budget is its own"
    );

    // Budgets reload: without it, alice allocates again.
    let unlimited = std::fs::read_to_string(&tk.config_path)
        .unwrap()
        .replace(budget, "");
    std::fs::write(&tk.config_path, unlimited).unwrap();
    tk.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Raw::new(tk.turn, &user, &pass).allocate() {
            Ok(_) => break,
            Err(486) => {}
            Err(code) => panic!("after the reload: {code}"),
        }
        assert!(Instant::now() < deadline, "the budget outlived its reload");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_budgets_concurrent_allocations_refuse_one_more_with_486() {
    let tk = Turnkey::start(
        "usage-allocations",
        &config("[[usage.budgets]]\nlabel = \"acme\"\nallocations = 2\n"),
    );
    let client = |user: &str, label: &str| Raw::labelled(tk.turn, user, label);
    let mut ann = client("ann", "acme");
    ann.allocate().expect("the first of acme");
    client("ben", "acme")
        .allocate()
        .expect("the second of acme");
    let mut cat = client("cat", "acme");
    assert_eq!(cat.allocate(), Err(486), "the third of acme");
    client("cat", "globex")
        .allocate()
        .expect("another label is not limited");
    ann.refresh(0).expect("ann deletes hers");
    cat.allocate().expect("acme has room again");
    assert_eq!(
        tk.metric(r#"turnkey_turn_quota_rejections_total{kind="budget"}"#),
        1.0
    );
}
