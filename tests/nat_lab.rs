//! The NAT lab: does a call connect from behind the NATs and firewalls that
//! users sit behind?
//!
//! `deploy/nat-lab/netns.sh` builds the topology of
//! `deploy/nat-lab/docker-compose.yml` out of network namespaces: turnkey on
//! 203.0.113.1 in a "public" namespace, clients on the public network (no
//! NAT) and behind routers doing endpoint-independent or symmetric NAT,
//! each client with its own egress firewall. In each cell two headless
//! Chromiums (`tests/lab/client.mjs`), one per client namespace, open
//! turnkey's own page and call each other; the test reads their
//! getStats() and checks that the call connects, video is decoded, and
//! the selected candidate pair is direct (host/srflx) where a direct path
//! exists and goes through the relay where none can. A STUN Binding from
//! each client must return its public address (its router's), and from
//! two server ports the same mapping behind the endpoint-independent NAT
//! and different ones behind the symmetric NAT.
//!
//! Needs root, as CI has (see tests/lab/mod.rs). Cells run one after
//! another, each against a deadline; processes and namespaces go away
//! through Drop guards, and netns.sh tears its lab down by itself when the
//! test process dies (its standard input closes).

mod common;
mod lab;

use std::time::{Duration, Instant};

use lab::call::{run_cell, Call, Failure, Outcome};
use lab::cell::{Cell, Firewall, Nat};
use lab::netns::{Lab, Topology};
use lab::tls::{config_accepts_tls, make_test_certificate, tls_env};
use lab::turnkey::{metric, LabTurnkey};
use lab::{one_lab_at_a_time, prerequisites, tail, TLS_LANDED};

/// Launch to a connected call decoding video; a good cell takes seconds.
const CALL_DEADLINE: Duration = Duration::from_secs(40);
/// How long a cell under a broken configuration must stay unconnected.
const BROKEN_DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// The tests.

enum Verdict {
    Passed(Outcome),
    Failed(String),
    Pending(String),
}

#[test]
fn nat_matrix() {
    let _one = one_lab_at_a_time();
    prerequisites();
    let topo = Topology::load();
    let dir = common::test_dir("nat-lab-tls");
    let mut tk_env = Vec::new();
    let mut chromium_args = Vec::new();
    if TLS_LANDED {
        chromium_args.push(make_test_certificate(&dir));
        tk_env = tls_env(&dir);
    }
    // Why the TCP 443 column is pending, when it is.
    let pending = (!TLS_LANDED).then(|| {
        if config_accepts_tls(&dir) {
            "pending: TURN over TLS on 443 (turnkey's config already takes [tls]; \
             flip TLS_LANDED once it has landed)"
        } else {
            "pending: TURN over TLS on 443 (issue 7)"
        }
    });

    let lab = Lab::up(false);
    let mut tk = LabTurnkey::start(&lab, &tk_env);
    let started = Instant::now();
    let mut verdicts = Vec::new();
    for nat in Nat::ALL {
        for firewall in Firewall::ALL {
            let cell = Cell { nat, firewall };
            let verdict = if let (Firewall::Tcp443Only, Some(why)) = (firewall, pending) {
                Verdict::Pending(why.to_string())
            } else {
                match run_cell(&lab, &mut tk, &topo, cell, &chromium_args, CALL_DEADLINE) {
                    Ok(o) => Verdict::Passed(o),
                    Err(e) => Verdict::Failed(e),
                }
            };
            eprintln!(
                "nat_lab: {} × {}: {}",
                nat.label(),
                firewall.label(),
                summary(&verdict)
            );
            verdicts.push((cell, verdict));
        }
    }
    drop(tk);
    lab.down();

    eprintln!("\n{}", table(&verdicts, started.elapsed()));
    let failed: Vec<String> = verdicts
        .iter()
        .filter_map(|(c, v)| match v {
            Verdict::Failed(e) => Some(format!(
                "=== {} × {} FAILED:\n{e}",
                c.nat.label(),
                c.firewall.label()
            )),
            _ => None,
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
    let pending_cells = verdicts
        .iter()
        .filter(|(_, v)| matches!(v, Verdict::Pending(_)))
        .count();
    assert_eq!(pending_cells, if TLS_LANDED { 0 } else { 3 });
}

fn summary(v: &Verdict) -> String {
    match v {
        Verdict::Passed(o) => format!(
            "PASS {} / {}{} in {:.1} s; STUN {} | {}",
            o.pairs[0],
            o.pairs[1],
            o.relay_protocol
                .as_deref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default(),
            o.elapsed.as_secs_f64(),
            o.stun[0],
            o.stun[1]
        ),
        Verdict::Failed(e) => format!("FAIL {}", e.lines().next().unwrap_or("")),
        Verdict::Pending(why) => why.clone(),
    }
}

/// The matrix as a Markdown table: selected pair as seen by the two sides.
fn table(verdicts: &[(Cell, Verdict)], total: Duration) -> String {
    let mut out = format!(
        "NAT lab matrix ({:.0} s; each cell: selected pair client a / client b, time from browser launch to decoded video)\n\n| | {} |\n|---|---|---|---|\n",
        total.as_secs_f64(),
        Firewall::ALL.map(Firewall::label).join(" | ")
    );
    for nat in Nat::ALL {
        let cells: Vec<String> = verdicts
            .iter()
            .filter(|(c, _)| c.nat == nat)
            .map(|(_, v)| match v {
                Verdict::Passed(o) => format!(
                    "pass: {} / {} ({:.1} s)",
                    o.pairs[0],
                    o.pairs[1],
                    o.elapsed.as_secs_f64()
                ),
                Verdict::Failed(_) => "**FAIL**".to_string(),
                Verdict::Pending(_) => "pending".to_string(),
            })
            .collect();
        out.push_str(&format!("| {} | {} |\n", nat.label(), cells.join(" | ")));
    }
    out
}

/// The call must survive a relay whose sends to the clients' private host
/// candidates fail: the policy lets the relay try them, as it would for a
/// LAN deployment.
const ALLOW_PRIVATE: &str = "203.0.113.0/24,10.0.0.0/8";

/// A public namespace with no route to private networks: every relay send
/// to a client's private host candidate fails at once (ENETUNREACH). The
/// errors are counted, the allocations stay, the call connects via relay.
#[test]
fn unreachable_private_peers_leave_the_relay_working() {
    let _one = one_lab_at_a_time();
    prerequisites();
    let topo = Topology::load();
    let lab = Lab::up(false);
    let mut tk = LabTurnkey::start(
        &lab,
        &[(
            "TURNKEY_TURN__ALLOWED_PEER_RANGES",
            ALLOW_PRIVATE.to_string(),
        )],
    );
    let before = metric(
        &tk.metrics(),
        "turnkey_turn_socket_errors_total",
        &["op=\"send\""],
    );
    let cell = Cell {
        nat: Nat::Symmetric,
        firewall: Firewall::Open,
    };
    let mut call = Call::start(&lab, &topo, cell, &[]);
    let outcome = call.connected(CALL_DEADLINE).unwrap_or_else(|f| {
        panic!(
            "{}\n{}\n--- turnkey:\n{}",
            f.message(),
            call.diagnostics(),
            tail(&tk.log, 30)
        )
    });
    let m = tk.metrics();
    let errors = metric(&m, "turnkey_turn_socket_errors_total", &["op=\"send\""]) - before;
    let allocations = metric(&m, "turnkey_turn_allocations", &[]);
    let relayed = metric(&m, "turnkey_turn_relayed_bytes_total", &[]);
    drop(call);
    eprintln!(
        "nat_lab: no route to private peers: {} / {} in {:.1} s; send errors +{errors}, \
         allocations during the call {allocations}, relayed bytes {relayed}",
        outcome.pairs[0],
        outcome.pairs[1],
        outcome.elapsed.as_secs_f64()
    );
    assert!(
        errors > 0.0,
        "no relay send failed: did the relay try the private peers?"
    );
    assert!(
        allocations >= 1.0,
        "no allocation left while the call was up"
    );
    assert!(relayed > 0.0, "nothing was relayed");
    assert!(tk.alive(), "turnkey died:\n{}", tail(&tk.log, 40));
    drop(tk);
    lab.down();
}

/// A public namespace with a default route, as a VPS has: relay packets to
/// the clients' private addresses leave and vanish upstream. The call
/// connects via relay all the same.
#[test]
fn private_peers_behind_a_default_route_leave_the_relay_working() {
    let _one = one_lab_at_a_time();
    prerequisites();
    let topo = Topology::load();
    let lab = Lab::up(true);
    let mut tk = LabTurnkey::start(
        &lab,
        &[(
            "TURNKEY_TURN__ALLOWED_PEER_RANGES",
            ALLOW_PRIVATE.to_string(),
        )],
    );
    let vanished_before = lab.vanished_upstream();
    let cell = Cell {
        nat: Nat::Symmetric,
        firewall: Firewall::Open,
    };
    let mut call = Call::start(&lab, &topo, cell, &[]);
    let outcome = call.connected(CALL_DEADLINE).unwrap_or_else(|f| {
        panic!(
            "{}\n{}\n--- turnkey:\n{}",
            f.message(),
            call.diagnostics(),
            tail(&tk.log, 30)
        )
    });
    let m = tk.metrics();
    let allocations = metric(&m, "turnkey_turn_allocations", &[]);
    let errors = metric(&m, "turnkey_turn_socket_errors_total", &["op=\"send\""]);
    drop(call);
    let vanished = lab.vanished_upstream() - vanished_before;
    eprintln!(
        "nat_lab: default route upstream: {} / {} in {:.1} s; {vanished} packets vanished \
         upstream, send errors {errors}, allocations during the call {allocations}",
        outcome.pairs[0],
        outcome.pairs[1],
        outcome.elapsed.as_secs_f64()
    );
    assert!(vanished > 0, "no relay packet left for the private peers");
    assert!(
        allocations >= 1.0,
        "no allocation left while the call was up"
    );
    assert!(tk.alive(), "turnkey died:\n{}", tail(&tk.log, 40));
    drop(tk);
    lab.down();
}

/// The lab can fail: with TURN misconfigured (it advertises a relay
/// address that is not its own, as a VPS with a wrong `external_ip` does),
/// the symmetric-NAT cells, which only the relay can connect, must not
/// connect, although signaling works.
#[test]
fn a_broken_turn_config_fails_the_symmetric_nat_cells() {
    let _one = one_lab_at_a_time();
    prerequisites();
    let topo = Topology::load();
    let lab = Lab::up(false);
    let mut tk = LabTurnkey::start(
        &lab,
        &[("TURNKEY_TURN__EXTERNAL_IP", "203.0.113.99".to_string())],
    );
    for firewall in [Firewall::Open, Firewall::UdpTurnOnly] {
        let cell = Cell {
            nat: Nat::Symmetric,
            firewall,
        };
        let mut call = Call::start(&lab, &topo, cell, &[]);
        match call.connected(BROKEN_DEADLINE) {
            Ok(o) => panic!(
                "symmetric NAT × {} connected ({} / {}) although TURN is broken",
                firewall.label(),
                o.pairs[0],
                o.pairs[1]
            ),
            Err(Failure::Harness(e)) => panic!("the harness failed instead of the call: {e}"),
            Err(Failure::NotConnected(why)) => {
                assert!(
                    call.both_saw_peer(),
                    "signaling did not work, so this proves nothing: {why}\n{}",
                    call.diagnostics()
                );
                eprintln!(
                    "nat_lab: broken TURN × {}: failed as it must: {why}",
                    firewall.label()
                );
            }
        }
    }
    assert!(tk.alive(), "turnkey died:\n{}", tail(&tk.log, 40));
    drop(tk);
    lab.down();
}
