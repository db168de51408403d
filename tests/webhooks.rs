//! Signed webhooks against the real binary on loopback: a sink in the test
//! (a small HTTP/1.1 server on 127.0.0.1) recomputes every event's
//! HMAC-SHA256 and collects the events by id. A call's
//! `allocation.started` and `allocation.ended` arrive with the bytes sent;
//! a spent budget, a revocation and a drain arrive too (also from a node
//! whose drain ends at once); and with the sink away for 20 s every event
//! still arrives once it is back.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::{admin_with, auth_section, base_config, Turnkey};
use hmac13::{Hmac, KeyInit, Mac};
use sha2::Sha256;

const HOOK_SECRET: &str = "webhook-secret-for-the-tests-0123";
const ADMIN_TOKEN: &str = "webhooks-admin-token-0123456789";

/// What the sink heard: events by id, and how many POSTs (duplicates
/// included).
#[derive(Default)]
struct Heard {
    events: BTreeMap<String, serde_json::Value>,
    posts: usize,
}

/// A webhook sink on `addr`: answers 200 to every POST whose signature is
/// the HMAC of its body, and fails the test (through `bad`) otherwise.
struct Sink {
    heard: Arc<Mutex<Heard>>,
    bad: Arc<Mutex<Vec<String>>>,
}

impl Sink {
    fn serve(listener: TcpListener) -> Sink {
        let heard = Arc::new(Mutex::new(Heard::default()));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let (h, b) = (heard.clone(), bad.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (h, b) = (h.clone(), b.clone());
                std::thread::spawn(move || serve_connection(conn, &h, &b));
            }
        });
        Sink { heard, bad }
    }

    /// Waits (up to `within`) until an event satisfies `pred`; the event.
    fn wait_for(
        &self,
        within: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            assert!(
                self.bad.lock().unwrap().is_empty(),
                "{:?}",
                self.bad.lock().unwrap()
            );
            if let Some(e) = self.heard.lock().unwrap().events.values().find(|e| pred(e)) {
                return e.clone();
            }
            assert!(Instant::now() < deadline, "no {what} arrived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn event(&self, within: Duration, kind: &str, user: &str) -> serde_json::Value {
        self.wait_for(within, &format!("{kind} of {user}"), |e| {
            e["type"] == kind
                && (e["data"]["user"] == user || e["data"]["label"] == user || user.is_empty())
        })
    }
}

/// Requests on one keep-alive connection until it closes.
fn serve_connection(conn: TcpStream, heard: &Mutex<Heard>, bad: &Mutex<Vec<String>>) {
    let mut out = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let (mut length, mut signature) = (0usize, String::new());
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').unwrap_or((h, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "x-turnkey-signature" => signature = value.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0u8; length];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
        mac.update(&body);
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if !line.starts_with("POST ") || signature != format!("sha256={want}") {
            bad.lock()
                .unwrap()
                .push(format!("{line} signature {signature:?}"));
        }
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(event) => {
                let id = event["id"].as_str().unwrap_or("").to_string();
                let mut heard = heard.lock().unwrap();
                heard.posts += 1;
                if let Some(was) = heard.events.get(&id) {
                    if *was != event {
                        bad.lock()
                            .unwrap()
                            .push(format!("id {id} names two events: {was} and {event}"));
                    }
                }
                heard.events.insert(id, event);
            }
            Err(e) => bad.lock().unwrap().push(format!("not JSON: {e}")),
        }
        if out
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}

/// Webhooks to `sink`, the admin API, peers on 127.0.0.1; `more` appended.
fn config(sink: SocketAddr, more: &str) -> String {
    format!(
        "{}{}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n\
         [webhooks]\nurl = \"http://{sink}/hook\"\nsecret = \"{HOOK_SECRET}\"\n\
         retry_max_secs = 1\ntimeout_secs = 2\n{more}",
        base_config("relay_ip = \"127.0.0.2\"\nallowed_peer_ranges = [\"127.0.0.1/32\"]"),
        auth_section()
    )
}

/// A client of `user` (label `label`) allocated; its relayed address.
fn client(tk: &Turnkey, user: &str, label: &str) -> (Raw, SocketAddr) {
    let mut c = Raw::labelled(tk.turn, user, label);
    let relayed = c.allocate().expect("allocate");
    (c, relayed)
}

/// Sends `up` packets of `size` bytes through `c`'s `channel` to a fresh
/// peer and `down` back, in batches the receiver takes in before the
/// next; fails if one is lost.
fn relay(c: &mut Raw, relayed: SocketAddr, channel: u16, up: usize, down: usize, size: usize) {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    c.bind_channel(channel, peer.local_addr().unwrap())
        .expect("bind a channel");
    let mut buf = [0u8; 2048];
    for _ in 0..up / 10 {
        for _ in 0..10 {
            c.channel_data(channel, &vec![1u8; size]);
        }
        for _ in 0..10 {
            peer.recv_from(&mut buf).expect("a packet reaches the peer");
        }
    }
    for _ in 0..down / 10 {
        for _ in 0..10 {
            peer.send_to(&vec![2u8; size], relayed).unwrap();
        }
        for _ in 0..10 {
            assert!(c.recv_data(Duration::from_secs(2)).is_some(), "lost");
        }
    }
}

fn revoke(tk: &Turnkey, user: &str) {
    let (status, v) = admin_with(
        tk,
        "POST",
        "/admin/revoke",
        Some(ADMIN_TOKEN),
        Some(&serde_json::json!({ "user": user })),
    );
    assert_eq!(status, 200, "{v}");
}

#[test]
fn every_event_arrives_signed_with_the_bytes_of_the_call() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = listener.local_addr().unwrap();
    let sink = Sink::serve(listener);
    let tk = Turnkey::start(
        "webhooks",
        &config(
            sink_addr,
            "[[usage.budgets]]\nlabel = \"globex\"\nbytes_per_day = 5000\naction = \"notify\"\n",
        ),
    );
    let within = Duration::from_secs(5);

    // A call: 40 × 1000 bytes to the peer, 20 × 1000 back, then deleted.
    let (mut a, relayed) = client(&tk, "alice", "acme");
    let started = sink.event(within, "allocation.started", "alice");
    assert_eq!(started["data"]["label"], "acme", "{started}");
    assert_eq!(started["data"]["transport"], "udp", "{started}");
    assert_eq!(
        started["data"]["relayed"],
        serde_json::json!([relayed.to_string()]),
        "{started}"
    );
    assert_eq!(
        started["data"]["client"],
        a.local().to_string(),
        "{started}"
    );
    relay(&mut a, relayed, 0x4000, 40, 20, 1000);
    a.refresh(0).expect("delete");
    let ended = sink.event(within, "allocation.ended", "alice");
    let d = &ended["data"];
    assert_eq!(d["bytes_to_peer"], 40_000, "{ended}");
    assert_eq!(d["bytes_to_client"], 20_000, "{ended}");
    assert_eq!(d["packets_to_peer"], 40, "{ended}");
    assert_eq!(d["packets_to_client"], 20, "{ended}");
    assert_eq!(d["label"], "acme", "{ended}");
    assert!(d["duration_secs"].as_f64().unwrap() > 0.0, "{ended}");
    assert!(
        d["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{ended}"
    );
    assert!(ended["timestamp"].as_u64().unwrap() >= started["timestamp"].as_u64().unwrap());

    // A budget of 5000 bytes a day for the label globex, crossed.
    let (mut b, b_relayed) = client(&tk, "bob", "globex");
    // A budget counts from its first check (once a second), so Bob keeps
    // sending until one sees him cross it.
    let deadline = Instant::now() + within;
    let mut channel = 0x4000;
    let over = loop {
        relay(&mut b, b_relayed, channel, 10, 0, 1000);
        channel += 1;
        let heard = sink.heard.lock().unwrap();
        if let Some(e) = heard
            .events
            .values()
            .find(|e| e["type"] == "budget.exceeded")
        {
            break e.clone();
        }
        drop(heard);
        assert!(Instant::now() < deadline, "no budget.exceeded arrived");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(over["data"]["label"], "globex", "{over}");
    assert!(over["data"]["bytes"].as_u64().unwrap() >= 5000, "{over}");
    assert_eq!(over["data"]["action"], "notify", "{over}");

    revoke(&tk, "carol");
    let revoked = sink.event(within, "user.revoked", "carol");
    assert!(revoked["data"]["refused_until"].as_u64().unwrap() > 0);

    // Bob's allocation holds the drain open, so the node is still there
    // to deliver its announcement.
    tk.signal(libc::SIGUSR1);
    sink.event(within, "node.draining", "");

    let heard = sink.heard.lock().unwrap();
    assert_eq!(
        heard.posts,
        heard.events.len(),
        "a sink that answers at once hears each event once"
    );
    assert_eq!(
        tk.metric("turnkey_webhooks_delivered_total") as usize,
        heard.posts
    );
    drop(b);
}

#[test]
fn events_wait_for_a_sink_that_is_away_for_20_seconds() {
    // The sink's address, free until the sink comes up.
    let sink_addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let tk = Turnkey::start("webhooks-away", &config(sink_addr, ""));
    let t0 = Instant::now();
    let (mut a, relayed) = client(&tk, "alice", "acme");
    relay(&mut a, relayed, 0x4000, 30, 10, 500);
    a.refresh(0).expect("delete");
    let (_b, _) = client(&tk, "bob", "globex");
    revoke(&tk, "carol");
    // Every event failed at least once while the sink is away.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tk.metric("turnkey_webhooks_failed_attempts_total") < 2.0 {
        assert!(Instant::now() < deadline, "no failed attempt counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(20).saturating_sub(t0.elapsed()));
    assert_eq!(tk.metric("turnkey_webhooks_delivered_total"), 0.0);

    let sink = Sink::serve(TcpListener::bind(sink_addr).expect("the sink's port again"));
    let within = Duration::from_secs(5);
    let ended = sink.event(within, "allocation.ended", "alice");
    assert_eq!(ended["data"]["bytes_to_peer"], 15_000, "{ended}");
    assert_eq!(ended["data"]["bytes_to_client"], 5_000, "{ended}");
    sink.event(within, "allocation.started", "alice");
    sink.event(within, "allocation.started", "bob");
    sink.event(within, "user.revoked", "carol");
    assert_eq!(sink.heard.lock().unwrap().events.len(), 4);
    assert_eq!(
        tk.metric(r#"turnkey_webhooks_dropped_total{reason="queue_full"}"#),
        0.0
    );
    assert_eq!(
        tk.metric(r#"turnkey_webhooks_dropped_total{reason="attempts"}"#),
        0.0
    );
}

#[test]
fn an_empty_node_announces_its_drain_before_it_exits() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = listener.local_addr().unwrap();
    let sink = Sink::serve(listener);
    let mut tk = Turnkey::start("webhooks-drain", &config(sink_addr, ""));
    // Nothing holds the drain open: the process stops at once.
    tk.signal(libc::SIGUSR1);
    assert!(
        tk.wait_exit(Duration::from_secs(10)).is_some(),
        "the drain ended"
    );
    sink.event(Duration::from_secs(1), "node.draining", "");
}

#[test]
fn a_bad_webhooks_section_is_a_named_config_error() {
    for (section, named) in [
        (
            "url = \"http://127.0.0.1:9/\"\nsecret = \"short\"\n",
            "webhooks.secret",
        ),
        (
            "url = \"https://example.invalid/\"\nsecret = \"0123456789abcdef\"\n",
            "https:// is not supported",
        ),
        (
            "events = [\"allocation.begun\"]\n",
            "unknown event `allocation.begun`",
        ),
    ] {
        let cfg: Result<turnkey::config::Config, _> =
            toml::from_str(&format!("[webhooks]\n{section}"));
        let err = cfg.unwrap().validate().unwrap_err().to_string();
        assert!(err.contains(named), "{err}");
    }
}
