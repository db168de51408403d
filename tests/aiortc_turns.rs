//! A second, non-browser WebRTC stack against turnkey: aiortc (Python,
//! pinned in tests/aiortc/requirements.txt, installed by the test in a
//! virtualenv). Browsers keep talking while they wait for an answer, so
//! they hid that a quiet TURN/TLS allocation was cut 10 s after its
//! connection opened; aiortc's caller says nothing between its Allocate
//! and the callee's late answer, as a real app's does.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{auth_section, base_config, python_venv, run_with_timeout, Turnkey};

#[test]
fn aiortc_calls_over_turns_only_when_the_answer_comes_15_s_late() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aiortc");
    let python = python_venv(&here.join("requirements.txt"));
    let (pki, dir, tls) = common::stream::tls_setup("aiortc", "localhost");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let tk = Turnkey::start(
        "aiortc",
        &format!("{}{}{tls}", base_config(""), auth_section()),
    );

    let mut cmd = Command::new(python);
    cmd.arg(here.join("turns_call.py"))
        .arg("--api")
        // `localhost`, so the turns: URL names the certificate's host.
        .arg(format!(
            "http://localhost:{}/api/ice-servers",
            tk.http.port()
        ))
        .args(["--calls", "10", "--answer-delay", "15", "--deadline", "30"])
        .env("SSL_CERT_FILE", &ca);
    let (ok, out, err) = run_with_timeout(cmd, Duration::from_secs(120));
    let results: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let good = results
        .iter()
        .filter(|r| r.get("call").is_some() && r["ok"] == true)
        .count();
    assert!(
        ok && good == 10,
        "{good} of 10 aiortc calls over turns: connected relay/relay:\n{out}\n{err}"
    );
    // Every byte went through TURN over TLS, both ways.
    for dir in ["client_to_peer", "peer_to_client"] {
        let sent: f64 = ["channel_data", "indication"]
            .iter()
            .map(|f| {
                tk.metric(&format!(
                    r#"turnkey_turn_relayed_packets_total{{direction="{dir}",framing="{f}",transport="tls"}}"#
                ))
            })
            .sum();
        assert!(sent >= 10.0, "{dir} over TLS: {sent} packets");
    }
    assert_eq!(
        tk.metric(r#"turnkey_stream_closed_total{reason="timeout"}"#),
        0.0,
        "no TURN/TLS connection was timed out"
    );
}
