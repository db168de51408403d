//! TURN over TCP and over TLS in a real browser: two Chromium pages whose
//! `iceServers` hold only turnkey's `turns:` URL (then only its
//! `turn:…?transport=tcp` URL), relay-only, call each other through the real
//! `turnkey` binary.
//!
//! The browser side is `tests/browser/e2e-transport.mjs`: it narrows what
//! the unchanged demo page asks for to one URL and asserts, from getStats(),
//! that the selected local candidate was allocated over that protocol and
//! that video is decoded. This test asserts what turnkey saw: the media
//! crossed its relay on that transport's client connections, and on no
//! other.
//!
//! Chromium verifies the TLS certificate of a `turns:` server like any
//! other, so the TLS run trusts the test CA the honest way: in an NSS
//! database under a throwaway HOME, made with `certutil`. A third run gets
//! the certificate by ACME from Pebble (Let's Encrypt's test server) and
//! loads the page itself over HTTPS with it, trusting Pebble's root alone.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::pebble::{free_tcp_port, wait_for_pebble_cert, Pebble};
use common::stream::test_pki;
use common::{auth_section, base_config, require, test_dir, Turnkey};
use serde_json::Value;

/// e2e-transport.mjs gives up on its own well before this.
const HARNESS_TIMEOUT: Duration = Duration::from_secs(60);

/// e2e-transport.mjs waits until each page has received 100 kB of media.
const MIN_RELAYED_BYTES: f64 = 100_000.0;

/// Two Chromiums with two video pages each are too much for a small CI
/// machine at once; the runs take turns.
static ONE_BROWSER_AT_A_TIME: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy)]
enum Transport {
    Tcp,
    Tls,
}

impl Transport {
    /// The name both in RTCIceCandidateStats.relayProtocol and in turnkey's
    /// `transport` metric label.
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

#[test]
fn two_browsers_call_over_turn_tls_only() {
    call_over(Transport::Tls);
}

#[test]
fn two_browsers_call_over_turn_tcp_only() {
    call_over(Transport::Tcp);
}

/// The page over HTTPS on turnkey's one TLS port, with a certificate
/// turnkey got by ACME (TLS-ALPN-01 against Pebble on loopback), and a
/// relay-only call over `turns:` on that same port and certificate.
#[test]
fn two_browsers_call_over_turns_with_an_acme_certificate() {
    let _turn = browser_turn();
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let tls_port = free_tcp_port();
    let pebble = rt.block_on(Pebble::start("browser-acme", tls_port, free_tcp_port(), 0));
    let cache = test_dir("browser-acme-cache");
    let config = base_config(&format!(
        "{}\n[tls]\nlisten = [\"127.0.0.1:{tls_port}\"]\n{}",
        auth_section(),
        pebble.acme_keys(&["localhost"], &cache)
    ));
    let t = Turnkey::start("browser-acme", &config);
    let addr = t.tls.expect("TLS listener");
    rt.block_on(wait_for_pebble_cert(
        &pebble,
        addr,
        "localhost",
        None,
        Duration::from_secs(30),
    ));
    let home = test_dir("browser-acme-files").join("home");
    std::fs::create_dir_all(&home).expect("create HOME");
    common::stream::trust_ca_in_nss(&home, &pebble.root_pem);
    // The page itself over HTTPS: its signaling is WSS and its `turns:`
    // URL the same host and port.
    let base = format!("https://localhost:{}/", addr.port());
    call_and_check(&t, &home, &base, Transport::Tls);
}

/// The tools a browser run needs, and its turn (one run at a time).
fn browser_turn() -> std::sync::MutexGuard<'static, ()> {
    require("chromium", "chromium");
    require("node", "nodejs");
    require("npm", "npm");
    require("certutil", "libnss3-tools");
    let turn = ONE_BROWSER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    common::ensure_node_modules(&harness());
    turn
}

fn harness() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn call_over(transport: Transport) {
    let _turn = browser_turn();

    // Not turnkey's own directory name: Turnkey::start empties that one.
    let dir = test_dir(&format!("browser-{}-files", transport.name()));
    let pki = test_pki("localhost");
    let (cert, key) = pki.write(&dir);
    let config = base_config(&format!(
        "{}\n[tls]\nlisten = [\"127.0.0.1:0\"]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        auth_section(),
        cert.display(),
        key.display()
    ));
    let t = Turnkey::start(&format!("browser-{}", transport.name()), &config);
    assert!(
        t.tcp.is_some() && t.tls.is_some(),
        "turnkey should listen for TURN over TCP and TLS"
    );

    // Chromium reads its NSS database from $HOME/.pki/nssdb; a fresh HOME
    // keeps the machine's own trust store out of it.
    let home = dir.join("home");
    std::fs::create_dir_all(&home).expect("create HOME");
    if let Transport::Tls = transport {
        common::stream::trust_ca_in_nss(&home, &pki.ca_pem);
    }

    // `localhost`, not 127.0.0.1: the page's iceServers carry the host it
    // was loaded from, and the certificate names `localhost`.
    let base = format!("http://localhost:{}/", t.http.port());
    call_and_check(&t, &home, &base, transport);
}

/// Runs e2e-transport.mjs on `base` with Chromium's HOME at `home`, and
/// checks that the media crossed turnkey's relay on `transport` alone.
fn call_and_check(t: &Turnkey, home: &Path, base: &str, transport: Transport) {
    let harness = harness();
    let started = Instant::now();
    let mut node = Command::new("node");
    node.arg(harness.join("e2e-transport.mjs"))
        .arg(base)
        .arg(transport.name())
        .env("HOME", home)
        .current_dir(&harness);
    let (ok, stdout, stderr) = common::run_with_timeout(node, HARNESS_TIMEOUT);
    eprintln!(
        "e2e-transport.mjs {} took {:.1?}\n{stdout}{stderr}",
        transport.name(),
        started.elapsed()
    );
    assert!(
        ok,
        "the browser harness failed over {} (see its output above); turnkey's log:\n{}",
        transport.name(),
        t.log.lock().unwrap().join("\n")
    );
    let summary: Value = stdout
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON summary line from e2e-transport.mjs");
    assert_eq!(summary["ok"], true, "{summary}");
    for page in ["alice", "bob"] {
        assert_eq!(
            summary["peers"][page]["relayProtocol"],
            transport.name(),
            "{summary}"
        );
    }
    let received: f64 = ["alice", "bob"]
        .iter()
        .map(|p| {
            summary["peers"][p]["bytesReceived"]
                .as_f64()
                .expect("bytesReceived")
        })
        .sum();

    let relayed = |direction: &str, transport: &str| -> f64 {
        ["channel_data", "indication"]
            .iter()
            .map(|framing| {
                t.metric(&format!(
                    "turnkey_turn_relayed_bytes_total{{direction=\"{direction}\",framing=\"{framing}\",transport=\"{transport}\"}}"
                ))
            })
            .sum()
    };
    let to_clients = relayed("peer_to_client", transport.name());
    let from_clients = relayed("client_to_peer", transport.name());
    eprintln!(
        "turnkey relayed over {}: {from_clients} bytes client→peer, {to_clients} bytes peer→client; \
         the pages received {received}",
        transport.name()
    );
    assert!(
        to_clients > MIN_RELAYED_BYTES && to_clients >= received,
        "turnkey relayed {to_clients} bytes to {} clients but the pages received {received}",
        transport.name()
    );
    assert!(
        from_clients > MIN_RELAYED_BYTES,
        "turnkey relayed only {from_clients} bytes from {} clients",
        transport.name()
    );
    for other in ["udp", "tcp", "tls"]
        .into_iter()
        .filter(|o| *o != transport.name())
    {
        let stray = relayed("peer_to_client", other) + relayed("client_to_peer", other);
        assert_eq!(
            stray,
            0.0,
            "{stray} bytes went over {other} although the pages only had a {} URL",
            transport.name()
        );
    }
}
