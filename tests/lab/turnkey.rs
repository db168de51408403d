//! turnkey in the lab's public namespace, on deploy/nat-lab/turnkey.toml.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::netns::{in_netns, Lab};
use super::{collect_lines, repo, tail, READY_DEADLINE};

pub struct LabTurnkey {
    child: Child,
    /// Everything it logged so far.
    pub log: Arc<Mutex<Vec<String>>>,
    ns: String,
}

impl LabTurnkey {
    /// turnkey on deploy/nat-lab/turnkey.toml, with `env` overriding keys.
    pub fn start(lab: &Lab, env: &[(&str, String)]) -> LabTurnkey {
        let ns = lab.ns("turnkey");
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &ns,
            env!("CARGO_BIN_EXE_turnkey"),
            "--config",
        ])
        .arg(repo().join("deploy/nat-lab/turnkey.toml"))
        .env_remove("RUST_LOG");
        // Only the keys this test sets come from the environment.
        for (key, _) in std::env::vars() {
            if key.starts_with("TURNKEY_") {
                cmd.env_remove(key);
            }
        }
        for (key, value) in env {
            cmd.env(key, value);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start turnkey in the lab");
        let log = collect_lines(child.stderr.take().expect("stderr"), "turnkey");
        let mut tk = LabTurnkey { child, log, ns };
        let deadline = Instant::now() + READY_DEADLINE;
        while !tk.log.lock().unwrap().iter().any(|l| l.contains("ready: ")) {
            assert!(
                Instant::now() < deadline && tk.alive(),
                "turnkey did not get ready in the lab:\n{}",
                tail(&tk.log, 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        tk
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `/metrics`, on the default `metrics.listen` (loopback of turnkey's
    /// namespace: never the public address).
    pub fn metrics(&self) -> String {
        let addr: SocketAddr = "127.0.0.1:9100".parse().expect("address");
        in_netns(&self.ns, move || {
            crate::common::http_get(addr, "/metrics").1
        })
    }
}

impl Drop for LabTurnkey {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum of the `name{…}` series whose labels include every one of `want`.
pub fn metric(text: &str, name: &str, want: &[&str]) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            want.iter()
                .all(|w| labels.split(',').any(|l| l == *w))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}
