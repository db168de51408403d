//! `turnkey probe` against the real binary: it passes over UDP, TCP and TLS
//! on a healthy turnkey, and on each broken deployment it fails with the
//! one line that names the fault: a wrong `turn.external_ip`, a credential
//! minted with another secret, a certificate for another name, a token the
//! API refuses, and a filtered (then a closed) TURN UDP port, the last in a
//! network namespace whose own firewall drops the packets.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use common::stream::tls_setup;
use common::{auth_section, base_config, require, run_with_timeout, test_dir, Turnkey, SECRET};
use serde_json::Value;

/// Every failure the probe reports comes within a few 3 s timeouts.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

struct Probe {
    ok: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn probe_cmd(url: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_turnkey"));
    c.arg("probe").arg(url).args(args);
    c
}

fn run(cmd: Command) -> Probe {
    let started = Instant::now();
    let (ok, stdout, stderr) = run_with_timeout(cmd, PROBE_TIMEOUT);
    let took = started.elapsed();
    eprintln!("--- probe took {took:.1?}\n{stdout}{stderr}");
    Probe {
        ok,
        stdout,
        stderr,
        took,
    }
}

fn probe(url: &str, args: &[&str]) -> Probe {
    run(probe_cmd(url, args))
}

impl Probe {
    /// The one line a failed probe prints, without its `FAIL: `.
    fn fix(&self) -> &str {
        assert!(!self.ok, "the probe should have failed:\n{}", self.stdout);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "exactly one line on stderr: {:?}",
            self.stderr
        );
        lines[0]
            .strip_prefix("FAIL: ")
            .unwrap_or_else(|| panic!("`FAIL: ` line, got {:?}", lines[0]))
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).expect("--json prints one JSON document")
    }
}

fn row<'a>(report: &'a Value, transport: &str) -> &'a Value {
    report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["transport"] == transport)
        .unwrap_or_else(|| panic!("no {transport} row in {report:#}"))
}

/// `localhost`, not 127.0.0.1: the API names the host it was asked by,
/// and the test certificate names `localhost`.
fn base(t: &Turnkey) -> String {
    format!("http://localhost:{}", t.http.port())
}

#[test]
fn passes_over_udp_tcp_and_tls() {
    let (pki, dir, tls) = tls_setup("probe-ok", "localhost");
    let t = Turnkey::start(
        "probe-ok",
        &base_config(&format!("{}{tls}", auth_section())),
    );
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let ca = ca.to_string_lossy().to_string();

    let table = probe(&base(&t), &["--ca-file", &ca]);
    assert!(table.ok, "the probe failed: {}", table.stderr);
    assert_eq!(table.stderr, "");
    for transport in ["stun", "udp", "tcp", "tls"] {
        assert!(
            table
                .stdout
                .lines()
                .any(|l| l.trim_start().starts_with(transport) && l.trim_end().ends_with(" ok")),
            "no passing {transport} line in the table:\n{}",
            table.stdout
        );
    }

    let json = probe(&base(&t), &["--ca-file", &ca, "--json"]);
    assert!(json.ok, "{}", json.stderr);
    let report = json.json();
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["fix"], Value::Null);
    let rows = report["rows"].as_array().unwrap();
    let kinds: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["transport"].as_str())
        .collect();
    assert_eq!(kinds, ["stun", "udp", "tcp", "tls"], "{report:#}");
    let ports = [
        ("stun", t.turn),
        ("udp", t.turn),
        ("tcp", t.tcp.unwrap()),
        ("tls", t.tls.unwrap()),
    ];
    for (transport, addr) in ports {
        let r = row(&report, transport);
        assert_eq!(r["ok"], true, "{r:#}");
        assert_eq!(r["address"], addr.to_string(), "{r:#}");
        assert!(
            r["mapped"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{r:#}"
        );
        if transport == "stun" {
            continue;
        }
        let relayed: SocketAddr = r["relayed"].as_str().unwrap().parse().unwrap();
        assert_eq!(relayed.ip().to_string(), "127.0.0.1", "{r:#}");
        let rtts = r["rtt_ms"].as_array().unwrap();
        assert_eq!(rtts.len(), 5, "five round trips through the relay: {r:#}");
        assert!(rtts.iter().all(|v| v.as_f64().unwrap() < 1000.0), "{r:#}");
        for k in ["allocate_ms", "permission_ms", "channel_bind_ms"] {
            assert!(r[k].as_f64().is_some(), "{k} in {r:#}");
        }
    }
    assert!(row(&report, "tls")["tls_ms"].as_f64().is_some());
    let clock = &report["credential"]["clock"];
    assert!(
        clock["expires_in_secs"].as_i64().unwrap() > 86_000,
        "{report:#}"
    );
    assert!(clock["server_clock_skew_secs"].as_i64().unwrap().abs() <= 2);

    // The pings really crossed the relay on every transport, both ways.
    for transport in ["udp", "tcp", "tls"] {
        for direction in ["client_to_peer", "peer_to_client"] {
            let bytes = t.metric(&format!(
                "turnkey_turn_relayed_bytes_total{{direction=\"{direction}\",framing=\"channel_data\",transport=\"{transport}\"}}"
            ));
            assert!(
                bytes >= 2.0 * 5.0 * 20.0,
                "{direction} over {transport}: {bytes} bytes"
            );
        }
    }
}

#[test]
fn names_a_wrong_external_ip() {
    // The relay binds 127.0.0.1 but advertises 127.0.0.9, where nothing
    // listens: Allocate works, nothing comes back through the relay.
    let t = Turnkey::start(
        "probe-external-ip",
        &base_config(&format!("external_ip = \"127.0.0.9\"\n{}", auth_section())),
    );
    let p = probe(&base(&t), &["--json"]);
    let fix = p.fix().to_string();
    let port = t.turn.port();
    assert!(
        fix.starts_with(&format!(
            "TURN/UDP localhost:{port}: Allocate worked but nothing came back through the relayed address 127.0.0.9:"
        )),
        "{fix}"
    );
    assert!(fix.contains("turn.external_ip is wrong"), "{fix}");
    let report = p.json();
    assert_eq!(report["fix"], fix);
    assert_eq!(row(&report, "stun")["ok"], true);
    for transport in ["udp", "tcp"] {
        let r = row(&report, transport);
        assert_eq!(r["failed_at"], "round-trip", "{r:#}");
        assert!(r["allocate_ms"].as_f64().is_some(), "{r:#}");
        assert!(r["relayed"].as_str().unwrap().starts_with("127.0.0.9:"));
    }
    assert!(p.took < Duration::from_secs(20), "took {:?}", p.took);
}

/// A one-thread HTTP server answering every request with `answer(head)`.
fn http_server(answer: impl Fn(&str) -> (u16, String) + Send + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let mut head = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            while r.read_line(&mut head).map(|n| n > 2).unwrap_or(false) {}
            let (status, body) = answer(&head);
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.flush();
            let _ = s.read(&mut [0u8; 1]);
        }
    });
    addr
}

/// turnkey's TURN URLs with a credential minted by `secret`.
fn ice_servers(t: &Turnkey, secret: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cred = turnkey::turn::auth::mint(secret, "probe-test", now, 3600);
    serde_json::json!({
        "iceServers": [
            {"urls": [format!("stun:{}", t.turn)]},
            {"urls": [format!("turn:{}?transport=udp", t.turn),
                      format!("turn:{}?transport=tcp", t.tcp.unwrap())],
             "username": cred.username, "credential": cred.password}
        ],
        "ttl": 3600
    })
    .to_string()
}

#[test]
fn names_a_secret_that_does_not_match() {
    // An application server that mints credentials with a secret the TURN
    // server does not have.
    let t = Turnkey::start("probe-secret", &base_config(&auth_section()));
    let body = ice_servers(&t, "not-the-turn-servers-secret-0123456789");
    let api = http_server(move |_| (200, body.clone()));
    let p = probe(&format!("http://{api}"), &[]);
    assert_eq!(
        p.fix(),
        format!(
            "TURN/UDP {}: the TURN server refused the API's credential (401 after authenticating): \
             the secret that minted it is not one of the TURN server's auth.secrets; make them the same",
            t.turn
        )
    );
    // The same API with the right secret passes: the failure was the secret.
    let body = ice_servers(&t, SECRET);
    let api = http_server(move |_| (200, body.clone()));
    let p = probe(&format!("http://{api}"), &[]);
    assert!(p.ok, "{}", p.stderr);
}

#[test]
fn names_a_refused_token() {
    let t = Turnkey::start("probe-token", &base_config(&auth_section()));
    let body = ice_servers(&t, SECRET);
    let api = http_server(move |head| {
        let authorized = head
            .lines()
            .any(|l| l.eq_ignore_ascii_case("authorization: Bearer right-token"));
        if authorized {
            (200, body.clone())
        } else {
            (401, "{}".into())
        }
    });
    let url = format!("http://{api}");
    let p = probe(&url, &["--token", "wrong-token"]);
    assert_eq!(
        p.fix(),
        format!("GET {url}/api/ice-servers: the API refused the token: pass a valid --token")
    );
    let p = probe(&url, &[]);
    assert_eq!(
        p.fix(),
        format!("GET {url}/api/ice-servers: HTTP 401: the API needs a token: pass --token")
    );
    let p = probe(&url, &["--token", "right-token"]);
    assert!(p.ok, "{}", p.stderr);
}

#[test]
fn names_a_certificate_for_another_name() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "turnkey probe test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params = CertificateParams::new(vec!["elsewhere.example".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "elsewhere.example");
    let key = KeyPair::generate().unwrap();
    let cert = params
        .signed_by(&key, &Issuer::from_params(&ca_params, &ca_key))
        .unwrap();

    let dir = test_dir("probe-cert-name-files");
    let (cert_file, key_file, ca_file) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let tls = format!(
        "\n[tls]\nlisten = [\"127.0.0.1:0\"]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert_file.display(),
        key_file.display()
    );
    let t = Turnkey::start(
        "probe-cert-name",
        &base_config(&format!("{}{tls}", auth_section())),
    );
    let p = probe(
        &base(&t),
        &["--ca-file", &ca_file.to_string_lossy(), "--json"],
    );
    assert_eq!(
        p.fix(),
        format!(
            "TURN/TLS localhost:{}: the TLS certificate does not name localhost: put a certificate for localhost \
             in tls.cert_file, or set http.public_host to a name the certificate has",
            t.tls.unwrap().port()
        )
    );
    let report = p.json();
    assert_eq!(row(&report, "tls")["failed_at"], "tls-handshake");
    for transport in ["stun", "udp", "tcp"] {
        assert_eq!(row(&report, transport)["ok"], true, "{report:#}");
    }
}

/// Two network namespaces in a row, so a firewall can sit on the path:
/// this namespace ↔ `fw` (a router that masquerades, so nothing here
/// needs a route back) ↔ `client`, where the probe runs. Removed on drop,
/// with their veth pairs.
struct Lab {
    fw: String,
    client: String,
    /// Our side's address, which turnkey listens on.
    host_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, cmd: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("run ip netns exec");
    assert!(
        out.status.success(),
        "{cmd:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const LAB_PREFIX: &str = "tkprobe";

impl Lab {
    fn up() -> Lab {
        Lab::gc();
        let pid = std::process::id();
        // 198.18.0.0/15 is for benchmarking (RFC 2544): no real network.
        let net = format!("198.19.{}", pid % 250);
        let lab = Lab {
            fw: format!("{LAB_PREFIX}{pid}fw"),
            client: format!("{LAB_PREFIX}{pid}c"),
            host_ip: format!("{net}.1"),
        };
        let (ours, fw_up) = (format!("tkp{pid}h"), format!("tkp{pid}u"));
        let (fw_down, client) = (format!("tkp{pid}d"), format!("tkp{pid}c"));
        let _ = Command::new("ip").args(["link", "del", &ours]).output();
        ip(&["netns", "add", &lab.fw]);
        ip(&["netns", "add", &lab.client]);
        ip(&[
            "link", "add", &ours, "type", "veth", "peer", "name", &fw_up, "netns", &lab.fw,
        ]);
        ip(&["addr", "add", &format!("{net}.1/30"), "dev", &ours]);
        ip(&["link", "set", &ours, "up"]);
        ip(&[
            "-n",
            &lab.fw,
            "link",
            "add",
            &fw_down,
            "type",
            "veth",
            "peer",
            "name",
            &client,
            "netns",
            &lab.client,
        ]);
        ip(&[
            "-n",
            &lab.fw,
            "addr",
            "add",
            &format!("{net}.2/30"),
            "dev",
            &fw_up,
        ]);
        ip(&[
            "-n",
            &lab.fw,
            "addr",
            "add",
            &format!("{net}.5/30"),
            "dev",
            &fw_down,
        ]);
        ip(&[
            "-n",
            &lab.client,
            "addr",
            "add",
            &format!("{net}.6/30"),
            "dev",
            &client,
        ]);
        for (ns, dev) in [
            (&lab.fw, &fw_up),
            (&lab.fw, &fw_down),
            (&lab.client, &client),
        ] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&["-n", &lab.client, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &lab.client,
            "route",
            "add",
            "default",
            "via",
            &format!("{net}.5"),
        ]);
        in_ns(&lab.fw, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        in_ns(
            &lab.fw,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                &fw_up,
                "-j",
                "MASQUERADE",
            ],
        );
        lab
    }

    /// Removes namespaces left by test processes that died before their
    /// Drop ran.
    fn gc() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(rest) = name.strip_prefix(LAB_PREFIX) else {
                continue;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
        }
    }

    /// Replaces the rules of one chain of a namespace's firewall.
    fn firewall(&self, ns: &str, chain: &str, rule: &[&str]) {
        in_ns(ns, &["iptables", "-F", chain]);
        if !rule.is_empty() {
            let mut args = vec!["iptables", "-A", chain];
            args.extend_from_slice(rule);
            in_ns(ns, &args);
        }
    }

    /// `cmd` run in the client namespace.
    fn exec(&self, cmd: Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.fw] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

#[test]
fn names_a_filtered_and_a_closed_udp_port() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root for ip netns and iptables (CI runs as root)"
    );
    require("ip", "iproute2");
    require("iptables", "iptables");
    let lab = Lab::up();
    let h = &lab.host_ip;
    let config = format!(
        "[http]\nlisten = \"{h}:0\"\n[turn]\nlisten = [\"{h}:0\"]\ntcp_listen = [\"{h}:0\"]\nthreads = 1\n{}",
        auth_section()
    );
    let t = Turnkey::start("probe-netns", &config);
    let url = format!("http://{}", t.http);
    let port = t.turn.port().to_string();
    let udp_port = ["-p", "udp", "--dport", &port];

    // Through the router with its firewall open everything passes, so what
    // follows fails because of the firewall alone.
    let open = run(lab.exec(probe_cmd(&url, &[])));
    assert!(open.ok, "{}", open.stderr);

    // Filtered on the way: the router drops the datagrams.
    lab.firewall(
        &lab.fw,
        "FORWARD",
        &[&udp_port[..], &["-j", "DROP"]].concat(),
    );
    let filtered = run(lab.exec(probe_cmd(&url, &["--json"])));
    assert_eq!(
        filtered.fix(),
        format!(
            "STUN {}: no answer in 3.0 s: port {port}/udp is filtered (or nothing runs there); \
             open {port}/udp towards turnkey in every firewall on the way",
            t.turn
        )
    );
    let report = filtered.json();
    assert_eq!(row(&report, "udp")["failed_at"], "allocate", "{report:#}");
    assert!(row(&report, "udp")["error"]
        .as_str()
        .unwrap()
        .contains("is filtered"));
    assert_eq!(row(&report, "tcp")["ok"], true, "{report:#}");
    assert!(
        filtered.took < Duration::from_secs(20),
        "took {:?}",
        filtered.took
    );

    // Closed: the router answers ICMP port unreachable, as a host with
    // nothing on the port does.
    let reject = ["-j", "REJECT", "--reject-with", "icmp-port-unreachable"];
    lab.firewall(&lab.fw, "FORWARD", &[&udp_port[..], &reject[..]].concat());
    let closed = run(lab.exec(probe_cmd(&url, &[])));
    assert_eq!(
        closed.fix(),
        format!(
            "STUN {}: connection refused: nothing listens on {port}/udp; check that turnkey runs and its turn.listen",
            t.turn
        )
    );
    assert!(
        closed.took < Duration::from_secs(5),
        "took {:?}",
        closed.took
    );

    // The probing machine's own firewall: the kernel refuses the send.
    lab.firewall(&lab.fw, "FORWARD", &[]);
    lab.firewall(
        &lab.client,
        "OUTPUT",
        &[&udp_port[..], &["-j", "DROP"]].concat(),
    );
    let local = run(lab.exec(probe_cmd(&url, &[])));
    assert_eq!(
        local.fix(),
        format!(
            "STUN {}: this machine's own firewall refuses to send to {port}/udp (EPERM): \
             allow outgoing {port}/udp here, or probe from another machine",
            t.turn
        )
    );
}

/// Runs tests/browser/selftest.mjs on `t`'s self-test page: what it
/// printed ({ report, copied, chromium }), and the screenshot's path.
fn selftest_in_chromium(
    t: &Turnkey,
    home: &std::path::Path,
    name: &str,
) -> (Value, std::path::PathBuf) {
    require("chromium", "chromium");
    require("node", "nodejs");
    require("npm", "npm");
    // One Chromium at a time: two cores, and timings that mean something.
    static ONE_BROWSER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_BROWSER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let harness = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    common::ensure_node_modules(&harness);
    let screenshot =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.png"));
    let _ = std::fs::remove_file(&screenshot);
    let mut node = Command::new("node");
    node.arg(harness.join("selftest.mjs"))
        .arg(format!("{}/selftest.html", base(t)))
        .arg(&screenshot)
        .env("HOME", home)
        .current_dir(&harness);
    let (ok, stdout, stderr) = run_with_timeout(node, Duration::from_secs(120));
    eprintln!("{stdout}{stderr}");
    assert!(ok, "the self-test harness failed (output above)");
    let out: Value = stdout
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON line from selftest.mjs");
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );
    eprintln!("screenshot: {}", screenshot.display());
    (out, screenshot)
}

/// The self-test page in Chromium: relay candidates over UDP, TCP and TLS,
/// a STUN row, and a loopback call through the relay with round trips.
#[test]
fn selftest_page_in_chromium() {
    require("certutil", "libnss3-tools");
    let (pki, dir, tls) = tls_setup("probe-selftest", "localhost");
    let t = Turnkey::start(
        "probe-selftest",
        &base_config(&format!("{}{tls}", auth_section())),
    );
    let home = dir.join("home");
    common::stream::trust_ca_in_nss(&home, &pki.ca_pem);
    let (out, _) = selftest_in_chromium(&t, &home, "selftest");
    let report = &out["report"];
    assert_eq!(report["ok"], true, "{report:#}");
    let rows = report["rows"].as_array().unwrap();
    let checks: Vec<&str> = rows.iter().filter_map(|r| r["check"].as_str()).collect();
    assert_eq!(
        checks,
        ["stun", "relay udp", "relay tcp", "relay tls"],
        "{report:#}"
    );
    for transport in ["udp", "tcp", "tls"] {
        let r = rows.iter().find(|r| r["transport"] == transport).unwrap();
        assert_eq!(r["ok"], true, "{r:#}");
        let relays: Vec<&Value> = r["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["type"] == "relay")
            .collect();
        assert!(
            !relays.is_empty(),
            "no relay candidate over {transport}: {r:#}"
        );
        for c in relays {
            // Chromium names the transport it allocated over, when it does.
            if !c["relayProtocol"].is_null() {
                assert_eq!(c["relayProtocol"], transport, "{r:#}");
            }
            assert_eq!(c["address"], "127.0.0.1", "{r:#}");
        }
        assert!(r["firstMs"].as_f64().is_some(), "{r:#}");
        assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r:#}");
    }
    let call = &report["call"];
    assert_eq!(call["ok"], true, "{call:#}");
    assert_eq!(call["selected"]["local"], "relay", "{call:#}");
    assert_eq!(call["selected"]["remote"], "relay", "{call:#}");
    let rtts = call["rttMs"].as_array().unwrap();
    assert_eq!(rtts.len(), 5, "{call:#}");
    assert!(rtts.iter().all(|v| v.as_f64().unwrap() > 0.0));
    // "Copy report" put the same report on the clipboard.
    let copied: Value = serde_json::from_str(out["copied"].as_str().unwrap()).unwrap();
    assert_eq!(&copied, report);
    // The data channel's pings crossed turnkey's relay.
    let relayed: f64 = ["channel_data", "indication"]
        .iter()
        .map(|framing| {
            t.metric(&format!(
                "turnkey_turn_relayed_packets_total{{direction=\"client_to_peer\",framing=\"{framing}\",transport=\"udp\"}}"
            ))
        })
        .sum();
    assert!(relayed > 0.0, "no packets relayed over UDP");
}

/// With a `turn.external_ip` that does not reach the relay, the page still
/// finds relay candidates, but its loopback call fails and says why.
#[test]
fn selftest_page_names_a_wrong_external_ip() {
    let t = Turnkey::start(
        "probe-selftest-external-ip",
        &base_config(&format!("external_ip = \"127.0.0.9\"\n{}", auth_section())),
    );
    let home = test_dir("probe-selftest-external-ip-home");
    let (out, _) = selftest_in_chromium(&t, &home, "selftest-external-ip");
    let report = &out["report"];
    assert_eq!(report["ok"], false, "{report:#}");
    for r in report["rows"].as_array().unwrap() {
        assert_eq!(r["ok"], true, "allocations work: {r:#}");
    }
    let call = &report["call"];
    assert_eq!(call["ok"], false, "{call:#}");
    let failure = call["failure"].as_str().unwrap();
    assert!(
        failure.contains("relay candidates appeared (127.0.0.9)")
            && failure.contains("turn.external_ip"),
        "{failure}"
    );
}
