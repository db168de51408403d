//! The XDP fast path (`turn.xdp`) in a namespace test bed: a client, a
//! peer and the relay, each in its own network namespace, linked by veth
//! pairs to a router namespace; turnkey runs in the relay's namespace
//! with its program attached (native mode) to the relay's veth, and the
//! router's end of that link has `bpf/xdp_pass.o` (a veth delivers its
//! peer's XDP_TX only then). Checksum offload is off on every veth, so
//! what the program sees carries whole checksums.
//!
//! Needs root; under CI (`CI=true`, as root) nothing skips. The
//! namespaces are named `tkx<pid>-*`, and removed by a Drop guard however
//! the test ends. IPv4 and IPv6 (the IPv6 run shorter; the table tests
//! in `src/relay/xdp/program_tests.rs` have IPv6's edge cases).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::{auth_section, Turnkey};
use stun::attributes::{RawAttribute, ATTR_REQUESTED_ADDRESS_FAMILY};

const TOKEN: &str = "xdp-test-admin-token-0123456789";

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the XDP test bed needs root, and CI runs as root"
    );
    eprintln!("skipped: the XDP test bed needs root");
    false
}

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bed's namespaces; removed on drop.
struct Bed {
    prefix: String,
}

impl Bed {
    fn new(tag: &str) -> Bed {
        let prefix = format!("tkx{}{tag}", std::process::id());
        let bed = Bed { prefix };
        let p = &bed.prefix;
        let pass = concat!(env!("CARGO_MANIFEST_DIR"), "/bpf/xdp_pass.o");
        let mut script = String::new();
        for ns in ["c", "p", "r", "x"] {
            script += &format!("ip netns add {p}-{ns} && ip -n {p}-{ns} link set lo up && ");
        }
        script += &format!(
            "ip netns exec {p}-x sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && "
        );
        for (ns, net) in [("c", 1), ("p", 2), ("r", 3)] {
            script += &format!(
                "ip link add {ns}0 netns {p}-{ns} type veth peer name x{ns} netns {p}-x && \
                 ip -n {p}-{ns} addr add 10.{net}.0.2/24 dev {ns}0 && \
                 ip -n {p}-x addr add 10.{net}.0.1/24 dev x{ns} && \
                 ip -n {p}-{ns} -6 addr add fd00:{net}::2/64 dev {ns}0 nodad && \
                 ip -n {p}-x -6 addr add fd00:{net}::1/64 dev x{ns} nodad && \
                 ip -n {p}-{ns} link set {ns}0 up && ip -n {p}-x link set x{ns} up && \
                 ip -n {p}-{ns} route add default via 10.{net}.0.1 && \
                 ip -n {p}-{ns} -6 route add default via fd00:{net}::1 && \
                 ip netns exec {p}-{ns} ethtool -K {ns}0 tx off >/dev/null && \
                 ip netns exec {p}-x ethtool -K x{ns} tx off >/dev/null && "
            );
        }
        script += &format!(
            "ip -n {p}-x link set dev xr xdp obj {pass} sec xdp && \
             ip netns exec {p}-r sysctl -qw net.ipv4.conf.r0.forwarding=1 net.ipv6.conf.r0.forwarding=1"
        );
        sh(&script);
        bed
    }

    fn ns(&self, which: &str) -> String {
        format!("{}-{which}", self.prefix)
    }

    /// Runs `f` on a thread inside namespace `which`: sockets it makes
    /// stay there.
    fn within<T: Send + 'static>(&self, which: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.ns(which));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("netns file");
            use std::os::fd::AsRawFd;
            // SAFETY: a valid namespace descriptor; this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// UdpInCsumErrors + Udp6InCsumErrors in namespace `which`.
    fn csum_errors(&self, which: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(which), "cat", "/proc/net/snmp6"])
            .output()
            .unwrap();
        let v6: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
            .and_then(|v| v.trim().parse().ok())
            .expect("Udp6InCsumErrors");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(which), "cat", "/proc/net/snmp"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
        let names: Vec<&str> = udp[0].split_whitespace().collect();
        let values: Vec<&str> = udp[1].split_whitespace().collect();
        let i = names.iter().position(|n| *n == "InCsumErrors").unwrap();
        values[i].parse::<u64>().unwrap() + v6
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for ns in ["c", "p", "r", "x"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(ns)])
                .status();
        }
    }
}

fn config(xdp: bool, max_bps: u64) -> String {
    format!(
        r#"
[log]
level = "info"
[http]
listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"
[turn]
listen = ["10.3.0.2:3478", "[fd00:3::2]:3478"]
relay_ip_v6 = "fd00:3::2"
tcp_listen = []
threads = 1
relay_port_min = 40000
relay_port_max = 40999
allowed_peer_ranges = ["10.2.0.0/24", "fd00:2::/64"]
max_bps = {max_bps}
max_channels = 64
xdp = "{}"
xdp_interface = "r0"
{}
"#,
        if !xdp {
            "off".to_string()
        } else {
            // XDP_BED_MODE=generic tries the generic hook instead.
            std::env::var("XDP_BED_MODE").unwrap_or_else(|_| "native".into())
        },
        auth_section()
    )
}

/// The datagram of binding `b`, number `seq`, `len` bytes: checkable.
fn payload(b: u16, seq: u32, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&b.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    while v.len() < len {
        // Wrapping: `check` meets any bytes (a Data indication's too).
        v.push(
            (v.len() as u32)
                .wrapping_mul(31)
                .wrapping_add(seq.wrapping_mul(7))
                .wrapping_add(u32::from(b)) as u8,
        );
    }
    v
}

fn check(data: &[u8]) -> Option<(u16, u32)> {
    if data.len() < 6 {
        return None;
    }
    let b = u16::from_be_bytes([data[0], data[1]]);
    let seq = u32::from_be_bytes([data[2], data[3], data[4], data[5]]);
    (payload(b, seq, data.len()) == data).then_some((b, seq))
}

/// The client's address in the bed, of the server's family.
fn client_ip(server: SocketAddr) -> &'static str {
    if server.is_ipv6() {
        "[fd00:1::2]:0"
    } else {
        "10.1.0.2:0"
    }
}

struct Client {
    raw: Raw,
    relayed: SocketAddr,
}

/// `clients` allocations of `per` channels each, to peer sockets on
/// 10.2.0.2 (one per binding); made from inside the bed.
fn bind_all(
    bed: &Bed,
    tk_turn: SocketAddr,
    clients: usize,
    per: usize,
) -> (Vec<Arc<Client>>, Vec<Arc<UdpSocket>>) {
    let peers: Vec<Arc<UdpSocket>> = bed.within("p", move || {
        (0..clients * per)
            .map(|_| {
                let s = UdpSocket::bind(if tk_turn.is_ipv6() {
                    "[fd00:2::2]:0"
                } else {
                    "10.2.0.2:0"
                })
                .unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                Arc::new(s)
            })
            .collect()
    });
    let peer_addrs: Vec<SocketAddr> = peers.iter().map(|s| s.local_addr().unwrap()).collect();
    let cl = bed.within("c", move || {
        (0..clients)
            .map(|i| {
                let mut raw = Raw::bound(client_ip(tk_turn), tk_turn, "alice", "wonderland-rabbit");
                let relayed = if tk_turn.is_ipv6() {
                    raw.allocate_with(|| {
                        vec![Box::new(RawAttribute {
                            typ: ATTR_REQUESTED_ADDRESS_FAMILY,
                            length: 4,
                            value: vec![2, 0, 0, 0],
                        })]
                    })
                    .expect("allocate")[0]
                } else {
                    raw.allocate().expect("allocate")
                };
                raw.permit(peer_addrs[0]).expect("permission");
                for j in 0..per {
                    raw.bind_channel(0x4000 + j as u16, peer_addrs[i * per + j])
                        .expect("channel bind");
                }
                raw.sock
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                Arc::new(Client { raw, relayed })
            })
            .collect::<Vec<_>>()
    });
    (cl, peers)
}

/// Received per binding, each way, and anything corrupted.
#[derive(Default)]
struct Tally {
    to_peer: Vec<AtomicU64>,
    to_client: Vec<AtomicU64>,
    bytes_to_peer: Vec<AtomicU64>,
    bytes_to_client: Vec<AtomicU64>,
    corrupted: AtomicU64,
}

impl Tally {
    fn new(n: usize) -> Arc<Tally> {
        let v = || (0..n).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Tally {
            to_peer: v(),
            to_client: v(),
            bytes_to_peer: v(),
            bytes_to_client: v(),
            corrupted: AtomicU64::new(0),
        })
    }
}

/// Receivers on every socket until `stop`.
fn receive(
    clients: &[Arc<Client>],
    peers: &[Arc<UdpSocket>],
    per: usize,
    tally: &Arc<Tally>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (c, tally, stop) = (c.clone(), tally.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, _)) = c.raw.sock.recv_from(&mut buf) else {
                    continue;
                };
                let d = &buf[..n];
                let ch = usize::from(u16::from_be_bytes([d[0], d[1]]).wrapping_sub(0x4000));
                let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
                match check(&d[4..]) {
                    Some((b, _)) if n == 4 + len && usize::from(b) == i * per + ch => {
                        tally.to_client[usize::from(b)].fetch_add(1, Ordering::Relaxed);
                        tally.bytes_to_client[usize::from(b)]
                            .fetch_add(len as u64, Ordering::Relaxed);
                    }
                    _ => {
                        tally.corrupted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for chunk in peers.chunks(25).enumerate() {
        let (k, socks) = chunk;
        let socks: Vec<Arc<UdpSocket>> = socks.to_vec();
        let (tally, stop) = (tally.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            for s in &socks {
                s.set_nonblocking(true).unwrap();
            }
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let mut got = false;
                for (j, s) in socks.iter().enumerate() {
                    while let Ok((n, _)) = s.recv_from(&mut buf) {
                        got = true;
                        match check(&buf[..n]) {
                            Some((b, _)) if usize::from(b) == k * 25 + j => {
                                tally.to_peer[usize::from(b)].fetch_add(1, Ordering::Relaxed);
                                tally.bytes_to_peer[usize::from(b)]
                                    .fetch_add(n as u64, Ordering::Relaxed);
                            }
                            _ => {
                                tally.corrupted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                if !got {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }));
    }
    threads
}

/// Sends `rate` datagrams a second per binding each way for `secs`;
/// how many were sent per binding.
fn send(
    clients: &[Arc<Client>],
    peers: &[Arc<UdpSocket>],
    per: usize,
    rate: u32,
    secs: u64,
    len: usize,
) -> u64 {
    let start = Instant::now();
    let mut seq = 0u32;
    let tick = Duration::from_secs(1) / rate;
    while start.elapsed() < Duration::from_secs(secs) {
        for (i, c) in clients.iter().enumerate() {
            for j in 0..per {
                let b = (i * per + j) as u16;
                c.raw.channel_data(0x4000 + j as u16, &payload(b, seq, len));
                let _ = peers[usize::from(b)].send_to(&payload(b, seq, len), c.relayed);
            }
        }
        seq += 1;
        let next = start + tick * seq;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    u64::from(seq)
}

/// The sum of the series of `name` whose labels include all of `labels`.
fn metric_sum(tk: &Turnkey, bed: &Bed, name: &str, labels: &[&str]) -> f64 {
    let addr = tk.metrics;
    let body = bed.within("r", move || common::http_get(addr, "/metrics").1);
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// An admin API call from inside the relay's namespace; it must succeed.
fn admin_call(tk: &Turnkey, bed: &Bed, request: &str, body: &str) {
    let admin = tk.admin.unwrap();
    let (request, body) = (request.to_string(), body.to_string());
    bed.within("r", move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        write!(
            s,
            "{request} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 2"), "{request}: {out}");
    });
}

fn allocations(tk: &Turnkey, bed: &Bed) -> Vec<serde_json::Value> {
    let admin = tk.admin.unwrap();
    let body = bed.within("r", move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        write!(s, "GET /admin/allocations HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    let json = body.split("\r\n\r\n").nth(1).unwrap_or("[]");
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or(serde_json::Value::Null);
    v.as_array()
        .cloned()
        .or_else(|| v["allocations"].as_array().cloned())
        .unwrap_or_default()
}

/// 100 bindings both ways: nothing lost or corrupted, no checksum error
/// at either end, at least 99 % relayed in XDP (when on), and each
/// allocation's bytes in the admin API equal to what the other side got.
fn relay_100_bindings(xdp: bool, v6: bool, secs: u64) {
    let bed = Bed::new(match (xdp, v6) {
        (true, false) => "a",
        (false, _) => "b",
        (true, true) => "6",
    });
    let tk = Turnkey::start_in("xdp-bed", &config(xdp, 0), Some(&bed.ns("r")));
    assert_eq!(
        tk.log_contains("XDP fast path attached"),
        xdp,
        "attached iff asked"
    );
    let server = *tk
        .turn_all
        .iter()
        .find(|a| a.is_ipv6() == v6)
        .expect("listener");
    let (clients, peers) = bind_all(&bed, server, 4, 25);
    let n = clients.len() * 25;
    let tally = Tally::new(n);
    let stop = Arc::new(AtomicBool::new(false));
    let rx = receive(&clients, &peers, 25, &tally, &stop);
    let sent = send(&clients, &peers, 25, 20, secs, 200);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in rx {
        t.join().unwrap();
    }
    let total = |v: &Vec<AtomicU64>| v.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    assert_eq!(
        tally.corrupted.load(Ordering::Relaxed),
        0,
        "corrupted datagrams"
    );
    assert_eq!(
        total(&tally.to_peer),
        sent * n as u64,
        "client -> peer: nothing lost"
    );
    assert_eq!(
        total(&tally.to_client),
        sent * n as u64,
        "peer -> client: nothing lost"
    );
    assert_eq!(bed.csum_errors("c"), 0, "UdpInCsumErrors at the client");
    assert_eq!(bed.csum_errors("p"), 0, "UdpInCsumErrors at the peer");
    // Counters fold at the next sweep (1 s).
    std::thread::sleep(Duration::from_millis(2100));
    let in_xdp = metric_sum(
        &tk,
        &bed,
        "turnkey_xdp_packets_total",
        &["verdict=\"relayed\""],
    );
    let relayed = 2.0 * (sent * n as u64) as f64;
    eprintln!(
        "xdp={xdp} ipv6={v6}: {sent} rounds x {n} bindings x 2 ways; {in_xdp} in XDP ({:.2} %)",
        100.0 * in_xdp / relayed
    );
    if xdp {
        assert!(in_xdp >= 0.99 * relayed, "{in_xdp} of {relayed} in XDP");
    } else {
        assert_eq!(in_xdp, 0.0);
    }
    let list = allocations(&tk, &bed);
    assert_eq!(list.len(), clients.len());
    for a in &list {
        let relayed: Vec<String> = a["relayed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        let i = clients
            .iter()
            .position(|c| relayed.contains(&c.relayed.to_string()))
            .expect("our allocation");
        let range = i * 25..(i + 1) * 25;
        let sum = |v: &Vec<AtomicU64>| {
            range
                .clone()
                .map(|b| v[b].load(Ordering::Relaxed))
                .sum::<u64>()
        };
        assert_eq!(
            a["bytes_to_peer"].as_u64().unwrap(),
            sum(&tally.bytes_to_peer),
            "bytes to peer, allocation {i}"
        );
        assert_eq!(
            a["bytes_to_client"].as_u64().unwrap(),
            sum(&tally.bytes_to_client),
            "bytes to client, allocation {i}"
        );
    }
    let m = metric_sum(
        &tk,
        &bed,
        "turnkey_turn_relayed_bytes_total",
        &[
            "direction=\"client_to_peer\"",
            "transport=\"udp\"",
            "framing=\"channel_data\"",
        ],
    );
    assert_eq!(
        m as u64,
        total(&tally.bytes_to_peer),
        "relayed-bytes metric"
    );

    // Ended allocations: nothing forwarded from 1 s later on. Refresh 0
    // for the first, an admin delete for the second, a revocation for
    // the other two. (Channel and permission expiry: see
    // `xdp_forgets_bindings_when_permissions_and_channels_expire`.)
    let c0 = clients[0].clone();
    let deleted = bed.within("c", move || {
        let mut raw = Raw::bound(
            client_ip(c0.raw.server),
            c0.raw.server,
            "alice",
            "wonderland-rabbit",
        );
        raw.sock = c0.raw.sock.try_clone().unwrap();
        raw.refresh(0).is_ok()
    });
    assert!(deleted, "Refresh 0");
    let id = list
        .iter()
        .find(|a| {
            a["relayed"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r.as_str() == Some(&clients[1].relayed.to_string()))
        })
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    admin_call(&tk, &bed, &format!("DELETE /admin/allocations/{id}"), "");
    // A revocation ends the user's other two.
    admin_call(&tk, &bed, "POST /admin/revoke", r#"{"user":"alice"}"#);
    std::thread::sleep(Duration::from_secs(1));
    let (to_peer, to_client, _) = phase(&clients, &peers, 2);
    assert_eq!(to_peer, 0, "forwarded to a peer after the end");
    assert_eq!(to_client, 0, "forwarded to a client after the end");
}

#[test]
fn xdp_relays_100_bindings_both_ways_exactly() {
    if !privileged() {
        return;
    }
    let secs = std::env::var("XDP_BED_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    relay_100_bindings(true, false, secs);
}

#[test]
fn xdp_relays_100_ipv6_bindings_both_ways_exactly() {
    if !privileged() {
        return;
    }
    relay_100_bindings(true, true, 10);
}

#[test]
fn without_xdp_the_same_bed_counts_the_same_bytes() {
    if !privileged() {
        return;
    }
    relay_100_bindings(false, false, 5);
}

/// A capped allocation offered twice its cap for 10 s: the peer gets at
/// most 1.1x the cap, with XDP on (the fast path hands a busy allocation
/// back to user space, and what it relayed is charged to the budget).
#[test]
fn a_capped_allocation_stays_within_its_cap_with_xdp_on() {
    if !privileged() {
        return;
    }
    let bed = Bed::new("c");
    let cap: u64 = 200_000;
    let tk = Turnkey::start_in("xdp-cap", &config(true, cap), Some(&bed.ns("r")));
    let (clients, peers) = bind_all(&bed, tk.turn_all[0], 1, 1);
    let tally = Tally::new(1);
    let stop = Arc::new(AtomicBool::new(false));
    let rx = receive(&clients, &peers, 1, &tally, &stop);
    // 1,000-byte datagrams at 400/s: 2x the cap.
    send(&clients, &peers, 1, 400, 10, 1000);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for t in rx {
        t.join().unwrap();
    }
    let got = tally.bytes_to_peer[0].load(Ordering::Relaxed);
    let limit = cap * 10 * 11 / 10;
    eprintln!("capped: {got} bytes to the peer in 10 s (cap {cap}/s, limit {limit})");
    assert!(got <= limit, "{got} > {limit}");
    // Loose: a slow sender on a busy machine offers less.
    assert!(got >= cap * 10 / 2, "the cap is a cap, not a stop: {got}");
}

/// The program is the process's (a bpf_link): SIGKILL detaches it.
#[test]
fn sigkill_detaches_the_program_within_a_second() {
    if !privileged() {
        return;
    }
    let bed = Bed::new("k");
    let mut tk = Turnkey::start_in("xdp-kill", &config(true, 0), Some(&bed.ns("r")));
    let attached = || {
        let out = Command::new("ip")
            .args(["-n", &bed.ns("r"), "link", "show", "r0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    };
    assert!(attached(), "attached while turnkey runs");
    tk.child.kill().unwrap();
    let killed = Instant::now();
    let _ = tk.child.wait();
    while attached() {
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "still attached 1 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("detached {:?} after SIGKILL", killed.elapsed());
}

/// One phase of traffic for `secs` on `clients` (and their `peers`):
/// what arrived, each way, and what arrived that was not our ChannelData.
fn phase(clients: &[Arc<Client>], peers: &[Arc<UdpSocket>], secs: u64) -> (u64, u64, u64) {
    let n = clients.len() * 25;
    let tally = Tally::new(n);
    let stop = Arc::new(AtomicBool::new(false));
    let rx = receive(clients, peers, 25, &tally, &stop);
    send(clients, peers, 25, 20, secs, 200);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for t in rx {
        t.join().unwrap();
    }
    let total = |v: &Vec<AtomicU64>| v.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    (
        total(&tally.to_peer),
        total(&tally.to_client),
        tally.corrupted.load(Ordering::Relaxed),
    )
}

/// Refreshes the permissions of `c`'s 25 peers (CreatePermission), from
/// inside the bed, through the client's own socket.
fn refresh_permissions(bed: &Bed, c: &Arc<Client>, peers: &[Arc<UdpSocket>]) {
    let c = c.clone();
    let addrs: Vec<SocketAddr> = peers.iter().map(|p| p.local_addr().unwrap()).collect();
    bed.within("c", move || {
        let mut raw = Raw::bound(
            client_ip(c.raw.server),
            c.raw.server,
            "alice",
            "wonderland-rabbit",
        );
        raw.sock = c.raw.sock.try_clone().unwrap();
        for a in addrs {
            raw.permit(a).expect("permission refreshed");
        }
    });
}

/// The fast path forgets a binding when the core's lifetimes end it:
/// permissions live 4 s and channels 8 s here (`turn.*_lifetime_secs`).
/// Client 0 refreshes nothing: from 1 s after its permissions lapse
/// nothing of its is relayed, either way, though its channels still
/// exist. Client 1 refreshes its permissions and not its channels: it
/// relays all the while, and from 1 s after its channels lapse no
/// ChannelData is relayed for it either way (the peers' datagrams reach
/// it as Data indications, from user space, as RFC 8656 says).
#[test]
fn xdp_forgets_bindings_when_permissions_and_channels_expire() {
    if !privileged() {
        return;
    }
    let bed = Bed::new("e");
    let cfg = config(true, 0).replace(
        "max_channels = 64",
        "max_channels = 64\npermission_lifetime_secs = 4\nchannel_lifetime_secs = 8",
    );
    let tk = Turnkey::start_in("xdp-expiry", &cfg, Some(&bed.ns("r")));
    assert!(tk.log_contains("XDP fast path attached"));
    let server = *tk.turn_all.iter().find(|a| a.is_ipv4()).expect("listener");
    let (clients, peers) = bind_all(&bed, server, 2, 25);
    let t0 = Instant::now();
    let wait_until = |secs: f64| {
        let at = t0 + Duration::from_secs_f64(secs);
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    };
    let (p0, p1) = (&peers[..25], &peers[25..]);
    let (c0, c1) = (&clients[..1], &clients[1..]);

    // Everything flows at first.
    let (to_peer, to_client, other) = phase(&clients, &peers, 1);
    assert_eq!((to_peer, to_client, other), (50 * 20, 50 * 20, 0), "before");
    // Client 1's permissions: to t0 + 7.5 s, then to t0 + 10.3 s.
    wait_until(3.5);
    refresh_permissions(&bed, &clients[1], p1);

    // Client 0's permissions lapsed at t0 + 4 s at the latest.
    wait_until(5.0);
    let (to_peer, to_client, other) = phase(c0, p0, 1);
    assert_eq!(
        (to_peer, to_client, other),
        (0, 0, 0),
        "relayed after the permissions expired"
    );
    refresh_permissions(&bed, &clients[1], p1);
    let (to_peer, to_client, other) = phase(c1, p1, 1);
    assert_eq!(
        (to_peer, to_client, other),
        (25 * 20, 25 * 20, 0),
        "refreshed"
    );

    // Client 1's channels lapsed at t0 + 8 s at the latest.
    wait_until(9.0);
    let (to_peer, to_client, as_indications) = phase(c1, p1, 1);
    assert_eq!(
        (to_peer, to_client),
        (0, 0),
        "ChannelData relayed after the channels expired"
    );
    eprintln!("after the channels expired: {as_indications} Data indications");
    // Counters fold at the next sweep: every packet of the first two
    // phases that was relayed at all went through XDP.
    std::thread::sleep(Duration::from_millis(2100));
    let in_xdp = metric_sum(
        &tk,
        &bed,
        "turnkey_xdp_packets_total",
        &["verdict=\"relayed\""],
    );
    assert!(
        in_xdp >= 0.99 * f64::from(2 * (50 * 20 + 25 * 20)),
        "{in_xdp} in XDP"
    );
}
