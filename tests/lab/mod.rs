//! The NAT lab's harness: the lab of `deploy/nat-lab/netns.sh`, turnkey in
//! its public namespace, and two browsers (`client.mjs` beside this file)
//! in a call between two of its client namespaces. `tests/nat_lab.rs` runs
//! the matrix with it; `tests/deploy.rs` reads the topology through it.
//!
//! The NAT lab needs root (ip netns, iptables), as CI has; a missing tool
//! or privilege fails the test rather than skipping it.
#![allow(dead_code)]

pub mod call;
pub mod cell;
pub mod netns;
pub mod tls;
pub mod turnkey;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::common::require;

/// Whether TURN over TLS on port 443 (issue 7) has landed. Until then the
/// NAT lab's "only TCP 443 open" column is reported pending, never passed,
/// and so is the check of config/vps.toml with its `[tls]` block
/// uncommented (tests/deploy.rs). Flipping this runs both.
pub const TLS_LANDED: bool = true;

/// turnkey's address in the lab, and where its page and STUN listeners are
/// (deploy/nat-lab/turnkey.toml).
pub const TURN_IP: &str = "203.0.113.1";
pub const HTTP: &str = "203.0.113.1:8080";
pub const STUN_SERVERS: [&str; 2] = ["203.0.113.1:3478", "203.0.113.1:3479"];
/// The page as a client behind the "only TCP 443" firewall reaches it:
/// HTTPS, WSS and TURN over TLS on one port.
pub const TLS_PAGE: &str = "https://203.0.113.1";
pub const READY_DEADLINE: Duration = Duration::from_secs(20);

/// One lab (and its browsers) at a time: two cores, and timings that mean
/// something.
static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

pub fn one_lab_at_a_time() -> MutexGuard<'static, ()> {
    ONE_LAB_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn netns_sh() -> PathBuf {
    repo().join("deploy/nat-lab/netns.sh")
}

pub fn client_dir() -> PathBuf {
    repo().join("tests/lab")
}

/// Root, the tools, and the client's pinned playwright-core.
pub fn prerequisites() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the NAT lab needs root for ip netns and iptables (CI runs as root)"
    );
    require("ip", "iproute2");
    require("iptables", "iptables");
    require("node", "nodejs");
    require("npm", "npm");
    require("chromium", "chromium");
    crate::common::ensure_node_modules(&client_dir());
}

/// Waits up to `within` for `child` to exit; whether it did.
pub fn wait_exit(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines of a child's stream, kept (and echoed with TURNKEY_TEST_LOG set).
pub fn collect_lines(
    stream: impl std::io::Read + Send + 'static,
    tag: &str,
) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let keep = lines.clone();
    let tag = tag.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if std::env::var_os("TURNKEY_TEST_LOG").is_some() {
                eprintln!("[{tag}] {line}");
            }
            keep.lock().unwrap().push(line);
        }
    });
    lines
}

/// The last `n` lines.
pub fn tail(lines: &Mutex<Vec<String>>, n: usize) -> String {
    let lines = lines.lock().unwrap();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
