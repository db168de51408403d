//! coturn's own TURN client, `turnutils_uclient`, as an outside client:
//! client-to-client through turnkey's relay (`-y`), with channels, without
//! channels (`-c`), with Send indications (`-s`) and with REST credentials
//! (`-W`), over UDP, TCP (`-t`) and TLS (`-t -S`). Every run must report 0
//! lost packets.

mod common;

use std::process::Command;

use common::{auth_section, base_config, require, Turnkey, SECRET};

/// Runs uclient and returns (sent, received, lost) from its summary.
fn uclient(tk: &Turnkey, extra: &[&str]) -> (u64, u64, u64) {
    require("turnutils_uclient", "coturn");
    let port = if extra.contains(&"-S") {
        tk.tls.expect("TLS listener").port()
    } else if extra.contains(&"-t") {
        tk.tcp.expect("TCP listener").port()
    } else {
        tk.turn.port()
    };
    let port = port.to_string();
    let mut args = vec!["-y", "-m", "10", "-n", "200", "-l", "500", "-p", &port];
    args.extend_from_slice(extra);
    args.push("127.0.0.1");
    let out = Command::new("timeout")
        .arg("120")
        .arg("turnutils_uclient")
        .args(&args)
        .output()
        .expect("run turnutils_uclient");
    let text = common::printed(&out);
    let grab = |key: &str| -> Option<u64> {
        text.lines()
            .rev()
            .filter_map(|l| l.split(key).nth(1))
            .filter_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .next()
    };
    let (Some(sent), Some(recv), Some(lost)) = (
        grab("tot_send_msgs="),
        grab("tot_recv_msgs="),
        grab("Total lost packets "),
    ) else {
        panic!("uclient {args:?} gave no summary:\n{text}");
    };
    (sent, recv, lost)
}

fn check(extra: &[&str], name: &str) {
    let (_pki, _dir, tls) = common::stream::tls_setup(name, "uclient");
    let tk = Turnkey::start(
        name,
        &format!("{}{}{}", base_config(""), auth_section(), tls),
    );
    let (sent, recv, lost) = uclient(&tk, extra);
    // 10 clients × 200 messages, plus RTCP-like extra streams unless -c.
    assert!(sent >= 2000, "uclient sent only {sent} messages");
    assert_eq!((recv, lost), (sent, 0), "uclient {extra:?} lost packets");
    // Relayed through us, not around us.
    let transport = if extra.contains(&"-S") {
        "tls"
    } else if extra.contains(&"-t") {
        "tcp"
    } else {
        "udp"
    };
    let relayed = tk.metric(&format!(r#"turnkey_turn_relayed_bytes_total{{direction="peer_to_client",framing="channel_data",transport="{transport}"}}"#))
        + tk.metric(&format!(r#"turnkey_turn_relayed_bytes_total{{direction="peer_to_client",framing="indication",transport="{transport}"}}"#));
    assert!(
        relayed >= (sent * 500) as f64,
        "only {relayed} bytes relayed"
    );
}

#[test]
fn uclient_with_channels() {
    check(
        &["-u", "alice", "-w", "wonderland-rabbit"],
        "uclient-channels",
    );
}

#[test]
fn uclient_without_channels() {
    check(
        &["-c", "-u", "alice", "-w", "wonderland-rabbit"],
        "uclient-nochannels",
    );
}

#[test]
fn uclient_with_send_indications() {
    check(
        &["-s", "-u", "alice", "-w", "wonderland-rabbit"],
        "uclient-send",
    );
}

#[test]
fn uclient_with_rest_credentials() {
    check(&["-u", "uclient", "-W", SECRET], "uclient-rest");
}

#[test]
fn uclient_over_tcp() {
    check(
        &["-t", "-u", "alice", "-w", "wonderland-rabbit"],
        "uclient-tcp",
    );
}

#[test]
fn uclient_over_tcp_with_rest_credentials() {
    check(&["-t", "-u", "uclient", "-W", SECRET], "uclient-tcp-rest");
}

#[test]
fn uclient_over_tls() {
    check(
        &["-t", "-S", "-u", "alice", "-w", "wonderland-rabbit"],
        "uclient-tls",
    );
}

#[test]
fn uclient_over_tls_with_rest_credentials() {
    check(
        &["-t", "-S", "-u", "uclient", "-W", SECRET],
        "uclient-tls-rest",
    );
}
