//! The benchmark scripts of `bench/` still run: each one for a second or
//! so, against the debug binaries (turnkey, which this `cargo test` built;
//! the load generator, the bare forwarder and the two signaling load clients of
//! the workspace member `bench/`, which this test builds) and coturn, and
//! each must report sane numbers. The real runs and their figures are in
//! bench/RESULTS.md.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::require;

/// The benchmark tools' paths, built (debug) by the same cargo that runs
/// this test, into the same target directory.
fn bench_tools() -> BTreeMap<String, PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--package",
            "turnkey-bench",
            "--bins",
            "--message-format=json",
        ])
        .output()
        .expect("run cargo build");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "building the benchmark tools failed:\n{}",
        common::printed(&out)
    );
    let mut tools = BTreeMap::new();
    for line in text.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            tools.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    tools
}

fn script(name: &str, tools: &BTreeMap<String, PathBuf>) -> Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tool = |n: &str| {
        tools
            .get(n)
            .unwrap_or_else(|| panic!("cargo built no {n}: {tools:?}"))
    };
    let mut c = Command::new("bash");
    c.arg(root.join("bench").join(name))
        .env("SKIP_BUILD", "1")
        .env("TURNKEY", env!("CARGO_BIN_EXE_turnkey"))
        .env("LOADGEN", tool("turnkey-loadgen"))
        .env("FORWARDER", tool("turnkey-forwarder"))
        .env("SIGLOAD", tool("turnkey-sigload"))
        .env("SIGLOAD_TWIN", tool("turnkey-sigload-twin"))
        .env("REPS", "1");
    c
}

fn run(mut c: Command) -> String {
    let out = c.output().expect("run a bench script");
    let text = common::printed(&out);
    assert!(out.status.success(), "script failed:\n{text}");
    text
}

/// loadgen_vs_coturn.sh: every server delivers (nearly) all it was sent,
/// client to client, and (`PEERS`) client to the generator's own peers in
/// frame-like bursts of 1,200-byte packets (the relay's GSO path).
fn loadgen_script(tools: &BTreeMap<String, PathBuf>) {
    loadgen_run(tools, "turnkey coturn bare direct", None);
    loadgen_run(tools, "turnkey coturn", Some("127.0.0.2"));
}

fn loadgen_run(tools: &BTreeMap<String, PathBuf>, servers: &str, peers: Option<&str>) {
    let tsv = common::test_dir("bench-smoke").join("runs.tsv");
    let mut c = script("loadgen_vs_coturn.sh", tools);
    c.env("SERVERS", servers)
        .env("PAIRS", "2")
        .env("RATE", "100")
        .env("SECS", "1")
        .env("OUT", &tsv);
    if let Some(ip) = peers {
        c.env("PEERS", ip).env("BURST", "4").env("SIZE", "1200");
    }
    let text = run(c);
    let runs = std::fs::read_to_string(&tsv).expect("runs.tsv");
    let mut seen = Vec::new();
    for line in runs.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        let num = |i: usize| -> f64 { f[i].parse().unwrap_or(-1.0) };
        let (server, sent, received, p99) = (f[0], num(3), num(4), num(8));
        // 4 senders (allocations, or 2 allocations and their 2 peers)
        // × 100 packets/s × 1 s.
        assert_eq!(sent, 400.0, "{server} sent:\n{text}");
        assert!(
            received >= 0.9 * sent,
            "{server} delivered too little:\n{text}"
        );
        assert!(
            p99 > 0.0 && p99 < 1e6,
            "{server} latency p99 {p99} µs:\n{text}"
        );
        seen.push(server.to_string());
    }
    assert_eq!(seen.join(" "), servers, "{text}");
    assert!(
        text.contains("| turnkey | 2 |"),
        "no summary table:\n{text}"
    );
}

/// relay_vs_coturn.sh: uclient's messages cross both servers.
fn uclient_script(tools: &BTreeMap<String, PathBuf>) {
    require("turnutils_uclient", "coturn");
    let mut c = script("relay_vs_coturn.sh", tools);
    c.env("PARALLEL", "1")
        .env("CLIENTS", "2")
        .env("MESSAGES", "20")
        .env("LENGTH", "100")
        .env("SCRAPE", "0");
    let text = run(c);
    let row = text
        .lines()
        .find(|l| l.starts_with("| messages received |"))
        .unwrap_or_else(|| panic!("no summary table:\n{text}"));
    let cells: Vec<f64> = row
        .split('|')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    // turnkey, coturn: 2 sessions × 2 directions… of 80 messages sent.
    assert!(
        cells.len() >= 2 && cells[0] >= 70.0 && cells[1] >= 70.0,
        "{row}\n{text}"
    );

    // The client → outside peer path (coturn's echo peer on 127.0.0.2):
    // every message comes back through both servers.
    let mut c = script("relay_vs_coturn.sh", tools);
    c.env("MODE", "peer")
        .env("PARALLEL", "1")
        .env("CLIENTS", "2")
        .env("MESSAGES", "20")
        .env("LENGTH", "100")
        .env("SCRAPE", "0");
    let text = run(c);
    let cells = |name: &str| -> Vec<f64> {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no {name} row:\n{text}"));
        row.split('|')
            .filter_map(|c| c.trim().parse().ok())
            .collect()
    };
    let (sent, received) = (cells("messages sent"), cells("messages received"));
    assert!(
        sent.len() >= 2 && sent[0] >= 40.0 && sent[1] >= 40.0,
        "peer mode sent too little:\n{text}"
    );
    assert!(
        received[0] >= 0.9 * sent[0] && received[1] >= 0.9 * sent[1],
        "peer mode lost messages:\n{text}"
    );
}

/// signaling_backends.sh: every signal arrives, on each backend.
fn signaling_script(tools: &BTreeMap<String, PathBuf>) {
    require("redis-server", "redis-server");
    let mut c = script("signaling_backends.sh", tools);
    c.env("PEERS", "20").env("RATE", "50").env("SECS", "2");
    let text = run(c);
    for backend in ["memory", "redis", "redis-2node"] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {backend} |")))
            .unwrap_or_else(|| panic!("no {backend} row:\n{text}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // | backend | peers | connect | sent | received | lost | …
        assert_eq!((cells[4], cells[5], cells[6]), ("100", "100", "0"), "{row}");
    }
}

/// signaling_vs_matchbox.sh, turnkey's half only (CI has no matchbox),
/// under both load clients: every signal arrives and the CPU and memory
/// columns are filled.
fn signaling_vs_matchbox_script(tools: &BTreeMap<String, PathBuf>) {
    let mut c = script("signaling_vs_matchbox.sh", tools);
    c.env("SERVERS", "turnkey")
        .env("PEERS", "20")
        .env("RATE", "50")
        .env("SECS", "1")
        .env("IDLE_MS", "200");
    let text = run(c);
    for client in ["sigload", "twin"] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {client} | turnkey |")))
            .unwrap_or_else(|| panic!("no {client} row:\n{text}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // | client | server | runs | load avg | sent | received | lost | p50 | p99 | p999 | ticks/10k | RSS/peer |
        assert_eq!((cells[5], cells[6], cells[7]), ("50", "50", "0"), "{row}");
        for cell in &cells[8..13] {
            let v: f64 = cell.parse().unwrap_or(-1.0);
            assert!(v >= 0.0, "{row}");
        }
    }
}

/// One test: the scripts use the same fixed loopback ports.
#[test]
fn bench_scripts_run_and_report_sane_numbers() {
    require("turnserver", "coturn");
    let tools = bench_tools();
    loadgen_script(&tools);
    uclient_script(&tools);
    signaling_script(&tools);
    signaling_vs_matchbox_script(&tools);
}
