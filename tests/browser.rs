//! The demo page in a real browser: two Chromium pages with fake cameras
//! call each other through the real `turnkey` binary, forced onto TURN
//! (`?relay=1`), and a third is turned away from the full room.
//!
//! The browser side is `tests/browser/e2e.mjs` (playwright-core driving
//! Debian's /usr/bin/chromium, nothing downloaded); it asserts what the
//! pages see through getStats(). This test asserts what turnkey saw: the
//! media really crossed its relay.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{auth_section, base_config, require, Turnkey};
use serde_json::Value;

/// The harness's own deadlines add up to well under this.
const HARNESS_TIMEOUT: Duration = Duration::from_secs(90);

/// e2e.mjs waits until each page has received 100 kB of media (audio and
/// RTCP alone take many seconds to get there), so each direction carried at
/// least this much.
const MIN_RELAYED_BYTES: f64 = 100_000.0;

fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Sum of every `series{labels}` line whose labels include all of `want`.
fn metric_sum(metrics: &str, series: &str, want: &[&str]) -> f64 {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(series)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            want.iter()
                .all(|w| labels.split(',').any(|l| l == *w))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Runs `node SCRIPT ARGS…` in the harness directory against `t`; its JSON
/// summary line, which must say `ok`.
fn run_harness(t: &Turnkey, script: &str, args: &[&std::ffi::OsStr]) -> Value {
    let mut node = Command::new("node");
    node.arg(harness_dir().join(script))
        .args(args)
        .current_dir(harness_dir());
    let started = Instant::now();
    let (ok, stdout, stderr) = common::run_with_timeout(node, HARNESS_TIMEOUT);
    eprintln!("{script} took {:.1?}\n{stdout}{stderr}", started.elapsed());
    assert!(
        ok,
        "the browser harness failed (see its output above); turnkey's log:\n{}",
        t.log.lock().unwrap().join("\n")
    );
    let summary: Value = stdout
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("a JSON summary line from {script}"));
    assert_eq!(summary["ok"], true, "{summary}");
    summary
}

#[test]
fn two_browsers_call_through_the_relay() {
    require("chromium", "chromium");
    require("node", "nodejs");
    require("npm", "npm");
    let dir = harness_dir();
    common::ensure_node_modules(&dir);

    let t = Turnkey::start("browser", &base_config(&auth_section()));
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e-screenshot.png");
    let _ = std::fs::remove_file(&screenshot);

    let url = t.url("");
    let summary = run_harness(&t, "e2e.mjs", &[url.as_ref(), screenshot.as_ref()]);
    // What the browsers counted as received (RTP payload only) must have
    // come through turnkey, which counts whole packets.
    let received: f64 = ["alice", "bob"]
        .iter()
        .map(|p| {
            summary["peers"][p]["bytesReceived"]
                .as_f64()
                .expect("bytesReceived")
        })
        .sum();
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );

    let (status, metrics) = common::http_get(t.metrics, "/metrics");
    assert_eq!(status, 200);
    let series = "turnkey_turn_relayed_bytes_total";
    let to_clients = metric_sum(&metrics, series, &["direction=\"peer_to_client\""]);
    let from_clients = metric_sum(&metrics, series, &["direction=\"client_to_peer\""]);
    eprintln!("turnkey relayed {from_clients} bytes client→peer, {to_clients} bytes peer→client");
    assert!(
        to_clients > MIN_RELAYED_BYTES && to_clients >= received,
        "turnkey relayed {to_clients} bytes to clients but the pages received {received}: \
         the call did not cross the relay\n{metrics}"
    );
    assert!(
        from_clients > MIN_RELAYED_BYTES,
        "turnkey relayed only {from_clients} bytes from clients\n{metrics}"
    );
    let created = t.metric("turnkey_turn_allocations_total{event=\"created\"}");
    eprintln!(
        "allocations: {created} created, {} still open after the browser closed",
        t.metric("turnkey_turn_allocations")
    );
    assert!(
        created >= 2.0,
        "{created} TURN allocations created; want one per page at least"
    );
}

/// Issue 27: one page's signaling socket is reset (through a proxy
/// `resume.mjs` controls) and refused for 5 s; the page resumes its session
/// without reloading and the call decodes again within 10 s.
#[test]
fn a_call_survives_its_signaling_socket_dying() {
    require("chromium", "chromium");
    require("node", "nodejs");
    require("npm", "npm");
    let dir = harness_dir();
    common::ensure_node_modules(&dir);

    let t = Turnkey::start("browser-resume", &base_config(&auth_section()));
    let url = t.url("");
    run_harness(&t, "resume.mjs", &[url.as_ref()]);
    assert!(
        t.metric("turnkey_signaling_resumes_total{outcome=\"resumed\"}") >= 1.0,
        "turnkey counted no resume"
    );
    assert_eq!(
        t.metric("turnkey_signaling_resumes_total{outcome=\"expired\"}"),
        0.0
    );
}

#[test]
fn metric_sum_matches_labels_in_any_order() {
    let text = "\
# TYPE x counter
x{direction=\"peer_to_client\",framing=\"channel_data\",transport=\"udp\"} 10
x{direction=\"peer_to_client\",framing=\"indication\",transport=\"udp\"} 5
x{direction=\"client_to_peer\",framing=\"channel_data\",transport=\"udp\"} 7
xy{direction=\"peer_to_client\"} 100
";
    assert_eq!(
        metric_sum(text, "x", &["direction=\"peer_to_client\""]),
        15.0
    );
    assert_eq!(
        metric_sum(
            text,
            "x",
            &["framing=\"channel_data\"", "direction=\"client_to_peer\""]
        ),
        7.0
    );
}
