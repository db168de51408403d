//! Two turnkey processes sharing rooms through a real `redis-server` that
//! each test starts on a free loopback port (issue 15): a room across
//! nodes, racing joins, a killed node, a Redis outage. Every wait has a
//! deadline; a missing `redis-server` fails.

mod common;
#[path = "../src/signal/redis_server.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use common::raw::Raw;
use common::ws::{join, recv, recv_within, send, Ws, WAIT};
use common::{admin, admin_with, auth_section, base_config, require, test_dir, Turnkey, SECRET};
use futures_util::StreamExt;
use redis_server::RedisServer;
use serde_json::{json, Value};

/// `signaling.presence_ttl_secs` in these tests.
const TTL: Duration = Duration::from_secs(2);

/// A `redis-server` of this test's own (see `redis_server.rs`).
fn redis() -> RedisServer {
    require("redis-server", "redis-server");
    RedisServer::start(test_dir("redis"))
}

/// A node on `redis`, with budgets high enough for the racing test, ready
/// (its backend up) before it is returned.
fn node(name: &str, redis: &RedisServer) -> Turnkey {
    node_with(name, redis, "")
}

/// [`node`] with more config sections.
fn node_with(name: &str, redis: &RedisServer, more: &str) -> Turnkey {
    let extra = format!(
        r#"
[signaling]
backend = "redis"
redis_url = "{}"
presence_ttl_secs = {}
joins_per_sec_per_ip = 10000
max_sockets_per_ip = 1000
[access]
mints_per_minute = 100000
{}{more}"#,
        redis.url(),
        TTL.as_secs(),
        auth_section()
    );
    let tk = Turnkey::start(name, &base_config(&extra));
    wait_ready(&tk, "ready\n");
    tk
}

fn wait_ready(tk: &Turnkey, body: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, got) = tk.get("/readyz");
        if status == 200 && got == body {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never said {body:?}: {status} {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn connect(tk: &Turnkey) -> Ws {
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{}/ws", tk.http)),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    ws
}

fn id(m: &Value) -> String {
    m["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_two_nodes_share_a_room_and_the_relay_credentials() {
    let redis = redis();
    let (a, b) = (node("cluster-a", &redis), node("cluster-b", &redis));
    let mut pa = connect(&a).await;
    let mut pb = connect(&b).await;
    let ja = join(&mut pa, "room").await;
    let jb = join(&mut pb, "room").await;
    assert_eq!(jb["peers"], json!([id(&ja)]));
    assert_eq!(
        recv(&mut pa).await,
        json!({"type": "peer-joined", "id": id(&jb)})
    );
    send(
        &mut pa,
        json!({"type": "signal", "to": id(&jb), "data": {"sdp": "offer"}}),
    )
    .await;
    assert_eq!(
        recv(&mut pb).await,
        json!({"type": "signal", "from": id(&ja), "data": {"sdp": "offer"}})
    );
    send(
        &mut pb,
        json!({"type": "signal", "to": id(&ja), "data": {"sdp": "answer"}}),
    )
    .await;
    assert_eq!(
        recv(&mut pa).await,
        json!({"type": "signal", "from": id(&jb), "data": {"sdp": "answer"}})
    );
    for tk in [&a, &b] {
        let mut third = connect(tk).await;
        send(&mut third, json!({"type": "join", "room": "room"})).await;
        assert_eq!(
            recv(&mut third).await,
            json!({"type": "full", "room": "room"})
        );
    }

    // Each node advertises its own relay; a credential one node minted
    // allocates on the other (shared auth.secrets).
    let turn_of = |j: &Value| j["iceServers"][1]["urls"][0].as_str().unwrap().to_string();
    assert!(turn_of(&ja).contains(&a.turn.port().to_string()), "{ja}");
    assert!(turn_of(&jb).contains(&b.turn.port().to_string()), "{jb}");
    let (user, pass) = (
        ja["iceServers"][1]["username"].as_str().unwrap(),
        ja["iceServers"][1]["credential"].as_str().unwrap(),
    );
    let relayed = Raw::new(b.turn, user, pass).allocate();
    assert!(
        relayed.is_ok(),
        "node A's credential on node B: {relayed:?}"
    );

    // A draining node refuses new joins; the other takes them.
    a.signal(libc::SIGUSR1);
    let mut late = connect(&b).await;
    join(&mut late, "after-drain").await;
    let deadline = Instant::now() + WAIT;
    loop {
        let mut c = connect(&a).await;
        send(&mut c, json!({"type": "join", "room": "after-drain"})).await;
        let m = recv(&mut c).await;
        if m["code"] == "draining" {
            break;
        }
        assert!(Instant::now() < deadline, "node A never refused: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_joins_from_both_nodes_never_overfill_a_room() {
    let redis = redis();
    let (a, b) = (node("race-a", &redis), node("race-b", &redis));
    let mut socks = Vec::new();
    for tk in [&a, &b, &a, &b] {
        socks.push(connect(tk).await);
    }
    for round in 0..100 {
        let room = format!("race{round}");
        let outcomes = futures_util::future::join_all(socks.iter_mut().map(|ws| {
            let room = room.clone();
            async move {
                send(ws, json!({"type": "join", "room": room})).await;
                // A room-mate's peer-joined may overtake the answer.
                let mut m = recv(ws).await;
                while m["type"] == "peer-joined" || m["type"] == "peer-left" {
                    m = recv(ws).await;
                }
                let joined = m["type"] == "joined";
                assert!(joined || m["type"] == "full", "{m}");
                joined
            }
        }))
        .await;
        let members = outcomes.iter().filter(|j| **j).count();
        assert_eq!(members, 2, "round {round}: {members} members");
        // Only now that every join was answered do the members leave.
        for (ws, joined) in socks.iter_mut().zip(&outcomes) {
            if *joined {
                send(ws, json!({"type": "leave"})).await;
            }
        }
        for ws in socks.iter_mut() {
            while let Ok(Some(Ok(_))) =
                tokio::time::timeout(Duration::from_millis(30), ws.next()).await
            {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_peers_leave_within_the_presence_ttl() {
    let redis = redis();
    let a = node("kill-a", &redis);
    let mut b = node("kill-b", &redis);
    let mut pa = connect(&a).await;
    let mut pb = connect(&b).await;
    join(&mut pa, "room").await;
    let jb = join(&mut pb, "room").await;
    assert_eq!(recv(&mut pa).await["type"], "peer-joined");
    b.signal(libc::SIGKILL);
    assert!(b.wait_exit(WAIT).is_some(), "node B did not die");
    let killed = Instant::now();
    let m = recv_within(&mut pa, TTL + Duration::from_secs(1)).await;
    assert_eq!(m, json!({"type": "peer-left", "id": id(&jb)}));
    assert!(
        killed.elapsed() <= TTL + Duration::from_millis(300),
        "peer-left after {:?}",
        killed.elapsed()
    );
    // Its place is free again.
    let mut pc = connect(&a).await;
    join(&mut pc, "room").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_refuses_joins_keeps_local_rooms_and_recovers() {
    let mut redis = redis();
    let (mut a, mut b) = (node("outage-a", &redis), node("outage-b", &redis));
    let mut a1 = connect(&a).await;
    let mut a2 = connect(&a).await;
    let j1 = join(&mut a1, "local").await;
    let j2 = join(&mut a2, "local").await;
    recv(&mut a1).await; // peer-joined

    redis.stop();
    wait_ready(&a, "degraded\n");
    wait_ready(&b, "degraded\n");
    // This node's room keeps working.
    send(
        &mut a1,
        json!({"type": "signal", "to": id(&j2), "data": "during"}),
    )
    .await;
    assert_eq!(
        recv(&mut a2).await,
        json!({"type": "signal", "from": id(&j1), "data": "during"})
    );
    // New joins are refused, clearly.
    let mut nb = connect(&b).await;
    send(&mut nb, json!({"type": "join", "room": "x"})).await;
    let m = recv(&mut nb).await;
    assert_eq!(
        (m["type"].as_str(), m["code"].as_str()),
        (Some("error"), Some("backend-unavailable")),
        "{m}"
    );
    assert!(a.metric("turnkey_signaling_backend_outages_total") >= 1.0);
    assert_eq!(a.metric("turnkey_signaling_backend_up"), 0.0);
    assert!(a.log_contains("signaling backend unavailable"));

    redis.restart();
    wait_ready(&a, "ready\n");
    wait_ready(&b, "ready\n");
    assert_eq!(a.metric("turnkey_signaling_backend_up"), 1.0);
    // The same socket joins now, and meets a peer of node A.
    let jb = join(&mut nb, "x").await;
    let mut a3 = connect(&a).await;
    let j3 = join(&mut a3, "x").await;
    assert_eq!(j3["peers"], json!([id(&jb)]));
    assert_eq!(
        recv(&mut nb).await,
        json!({"type": "peer-joined", "id": id(&j3)})
    );
    send(
        &mut a3,
        json!({"type": "signal", "to": id(&jb), "data": "after"}),
    )
    .await;
    assert_eq!(
        recv(&mut nb).await,
        json!({"type": "signal", "from": id(&j3), "data": "after"})
    );
    // The room that lived through the outage was written back: full.
    let mut late = connect(&b).await;
    send(&mut late, json!({"type": "join", "room": "local"})).await;
    assert_eq!(recv(&mut late).await["type"], "full");
    send(
        &mut a2,
        json!({"type": "signal", "to": id(&j1), "data": "still"}),
    )
    .await;
    assert_eq!(recv(&mut a1).await["data"], "still");
    for tk in [&mut a, &mut b] {
        assert!(tk.child.try_wait().unwrap().is_none(), "a node exited");
    }
}

/// Two browsers, one per node, call relay-only: the room is shared through
/// Redis and each page's media crosses its own node's relay.
#[test]
fn two_browsers_one_per_node_call_relay_only() {
    require("chromium", "chromium");
    require("node", "nodejs");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    common::ensure_node_modules(&dir);
    let redis = redis();
    let a = node("cluster-browser-a", &redis);
    let b = node("cluster-browser-b", &redis);
    let shot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cluster-call.png");
    let mut run = std::process::Command::new("node");
    run.arg(dir.join("e2e.mjs"))
        .arg(a.url(""))
        .arg(&shot)
        .env("E2E_BASE_URL_BOB", b.url(""))
        .current_dir(&dir);
    let (ok, out, err) = common::run_with_timeout(run, Duration::from_secs(90));
    assert!(
        ok,
        "the cross-node call failed:\n{out}\n{err}\n--- node A:\n{}\n--- node B:\n{}",
        a.log.lock().unwrap().join("\n"),
        b.log.lock().unwrap().join("\n")
    );
    // Each node relayed its own page's media.
    for (name, tk) in [("A", &a), ("B", &b)] {
        let relayed = tk.metric(
            r#"turnkey_turn_relayed_packets_total{direction="peer_to_client",framing="channel_data",transport="udp"}"#,
        );
        assert!(
            relayed > 100.0,
            "node {name} relayed only {relayed} packets"
        );
    }
}

/// Revoking a user on node A ends its allocation on node B within a
/// second (its next Refresh fails) and B refuses its credential: for a
/// quiet client, and for one that relays all the while.
#[test]
fn a_revocation_on_one_node_holds_on_the_other_within_a_second() {
    const ADMIN: &str = "cluster-admin-token-0123456789";
    let redis = redis();
    let a = node_with(
        "revoke-a",
        &redis,
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN}\"\n"),
    );
    let b = node("revoke-b", &redis);
    let deadline = Instant::now() + WAIT;
    while !(a.log_contains("listening for revocations")
        && b.log_contains("listening for revocations"))
    {
        assert!(
            Instant::now() < deadline,
            "a node never subscribed to revocations"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let cred = |user: &str| turnkey::turn::auth::mint(SECRET, user, turnkey::ice::unix_now(), 600);
    let bob = cred("bob");
    let mut bob_on_b = Raw::new(b.turn, &bob.username, &bob.password);
    let bob_relay = bob_on_b.allocate().expect("bob allocates on B");

    for (user, busy) in [("alice", false), ("carol", true)] {
        let c = cred(user);
        let mut on_b = Raw::new(b.turn, &c.username, &c.password);
        on_b.allocate().expect("allocates on B");
        on_b.bind_channel(0x4001, bob_relay).expect("binds to bob");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = busy.then(|| {
            let sock = on_b.sock.try_clone().unwrap();
            let (server, stop) = (b.turn, stop.clone());
            std::thread::spawn(move || {
                let mut frame = vec![0x40, 0x01, 0x00, 200];
                frame.extend_from_slice(&[5u8; 200]);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = sock.send_to(&frame, server);
                }
            })
        });
        let asked = Instant::now();
        let (status, v) = admin_with(
            &a,
            "POST",
            "/admin/revoke",
            Some(ADMIN),
            Some(&json!({ "user": user })),
        );
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            (&v["ended"], &v["published"]),
            (&json!(0), &json!(true)),
            "{v}"
        );
        while on_b.refresh(600).is_ok() {
            assert!(
                asked.elapsed() < Duration::from_secs(1),
                "{user}'s allocation on B outlived the revocation by a second (busy: {busy})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(asked.elapsed() < Duration::from_secs(1), "busy: {busy}");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = sender {
            t.join().unwrap();
        }
        let mut again = Raw::new(b.turn, &c.username, &c.password);
        assert_eq!(again.allocate(), Err(401), "B refuses {user}'s credential");
    }
    assert!(bob_on_b.refresh(600).is_ok(), "bob keeps his");
    assert!(b.log_contains("revocation from another node applied"));
}

/// Two users of one label relay through two nodes: each node's usage is
/// its own, and `scope=cluster` on either sums both.
#[test]
fn usage_of_a_label_is_summed_across_nodes() {
    const ADMIN: &str = "cluster-admin-token-0123456789";
    let admin_section = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN}\"\n");
    let redis = redis();
    let a = node_with("usage-a", &redis, &admin_section);
    let b = node_with("usage-b", &redis, &admin_section);
    let cred = |user: &str| {
        turnkey::turn::auth::mint_labelled(
            SECRET,
            user,
            Some("acme"),
            turnkey::ice::unix_now(),
            600,
        )
    };
    let (ca, cb) = (cred("alice"), cred("bob"));
    let mut alice = Raw::new(a.turn, &ca.username, &ca.password);
    let mut bob = Raw::new(b.turn, &cb.username, &cb.password);
    let ra = alice.allocate().expect("alice allocates on A");
    let rb = bob.allocate().expect("bob allocates on B");
    alice.bind_channel(0x4001, rb).expect("alice binds");
    bob.bind_channel(0x4002, ra).expect("bob binds");
    // Alice sends 40 × 1000 bytes, Bob 20 × 300, each acknowledged by
    // the other's receipt, so nothing is lost to a full buffer.
    let send = |from: &Raw, ch: u16, to: &Raw, n: usize, size: usize| {
        for _ in 0..n {
            from.channel_data(ch, &vec![1u8; size]);
            assert!(to.recv_data(WAIT).is_some(), "a packet was lost");
        }
    };
    send(&alice, 0x4001, &bob, 40, 1000);
    send(&bob, 0x4002, &alice, 20, 300);
    alice.refresh(0).expect("alice deletes");
    bob.refresh(0).expect("bob deletes");

    let label = |tk: &Turnkey, scope: &str| {
        let (status, v) = admin(
            tk,
            "GET",
            &format!("/admin/usage?by=label&scope={scope}"),
            Some(ADMIN),
        );
        assert_eq!(status, 200, "{v}");
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "acme")
            .cloned()
            .unwrap_or_default()
    };
    let on_a = label(&a, "node");
    assert_eq!(
        (&on_a["bytes_to_peer"], &on_a["bytes_to_client"]),
        (&json!(40_000), &json!(6_000))
    );
    let deadline = Instant::now() + WAIT;
    for tk in [&a, &b] {
        loop {
            let sum = label(tk, "cluster");
            if sum["allocations"] == 2 && sum["bytes"] == 92_000 {
                assert_eq!(sum["bytes_to_peer"], 46_000, "{sum}");
                assert_eq!(sum["packets_to_client"], 60, "{sum}");
                break;
            }
            assert!(Instant::now() < deadline, "never summed: {sum}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (status, _) = admin(&a, "DELETE", "/admin/usage?scope=cluster", Some(ADMIN));
    assert_eq!(status, 200);
    assert_eq!(label(&b, "cluster"), Value::Null, "reset for every node");
}
