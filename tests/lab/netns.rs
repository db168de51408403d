//! The lab itself: `netns.sh up --hold` for as long as a [`Lab`] lives,
//! the topology as `netns.sh describe` prints it, and a way to run code in
//! one of the lab's namespaces.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::cell::Firewall;
use super::{collect_lines, netns_sh, wait_exit, READY_DEADLINE};

/// netns.sh tears its lab down after this even if nobody tells it to.
const LAB_HOLD_SECS: u32 = 900;

/// The lab's networks and nodes, as `netns.sh describe` prints them (and
/// as `tests/deploy.rs` rebuilds them from the compose file).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// network → subnet
    pub nets: BTreeMap<String, String>,
    /// node → (network → address), plus `nat` and `gw` entries.
    pub nodes: BTreeMap<String, BTreeMap<String, String>>,
}

impl Topology {
    /// What netns.sh builds.
    pub fn load() -> Topology {
        let out = Command::new(netns_sh())
            .arg("describe")
            .output()
            .expect("run netns.sh describe");
        assert!(out.status.success(), "netns.sh describe failed");
        Topology::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// `net NAME SUBNET` and `node NAME KEY=VALUE…` lines.
    pub fn parse(text: &str) -> Topology {
        let mut topo = Topology::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("net"), Some(name)) => {
                    let subnet = words.next().expect("a subnet").to_string();
                    topo.nets.insert(name.to_string(), subnet);
                }
                (Some("node"), Some(name)) => {
                    let kv = words
                        .filter_map(|w| w.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    topo.nodes.insert(name.to_string(), kv);
                }
                _ => panic!("netns.sh describe: unexpected line {line:?}"),
            }
        }
        topo
    }

    /// The address the world sees a client as: its own on the public
    /// network, else its router's public address.
    pub fn public_ip(&self, client: &str) -> IpAddr {
        let node = &self.nodes[client];
        let ip = match node.get("public") {
            Some(ip) => ip.clone(),
            None => {
                let gw = node
                    .get("gw")
                    .expect("a client off the public net has a gateway");
                let router = self
                    .nodes
                    .values()
                    .find(|n| n.values().any(|a| a == gw) && n.contains_key("nat"))
                    .expect("the gateway is a router");
                router["public"].clone()
            }
        };
        ip.parse().expect("an IP address")
    }
}

/// A lab built by `netns.sh up PREFIX --hold`, torn down when dropped.
pub struct Lab {
    /// Every namespace of the lab is named PREFIX-….
    pub prefix: String,
    holder: Child,
    /// Closing it tells netns.sh to tear the lab down.
    holder_stdin: Option<ChildStdin>,
    holder_stderr: Arc<Mutex<Vec<String>>>,
}

impl Lab {
    pub fn up(upstream: bool) -> Lab {
        static LABS: AtomicUsize = AtomicUsize::new(0);
        // netns.sh gc recognises tkl<PID>n<N> and removes labs whose PID is gone.
        let prefix = format!(
            "tkl{}n{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let gc = Command::new(netns_sh())
            .arg("gc")
            .status()
            .expect("run netns.sh gc");
        assert!(gc.success(), "netns.sh gc failed");
        let mut cmd = Command::new(netns_sh());
        cmd.args(["up", &prefix, "--hold", &LAB_HOLD_SECS.to_string()]);
        if upstream {
            cmd.arg("--upstream");
        }
        let mut holder = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run netns.sh up");
        let holder_stdin = holder.stdin.take();
        let holder_stderr = collect_lines(holder.stderr.take().expect("stderr"), "netns.sh");
        let (tx, rx) = mpsc::channel();
        let stdout = holder.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let lab = Lab {
            prefix,
            holder,
            holder_stdin,
            holder_stderr,
        };
        match rx.recv_timeout(READY_DEADLINE) {
            Ok(line) if line.starts_with("ready ") => lab,
            other => panic!(
                "netns.sh up did not get ready ({other:?}):\n{}",
                lab.holder_stderr.lock().unwrap().join("\n")
            ),
        }
    }

    /// The namespace of topology node `node`.
    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// Replaces `node`'s egress firewall (firewall.sh) with `firewall`.
    pub fn firewall(&self, node: &str, firewall: Firewall) {
        let out = Command::new(netns_sh())
            .args(["firewall", &self.prefix, node, firewall.mode()])
            .output()
            .expect("run netns.sh firewall");
        assert!(
            out.status.success(),
            "netns.sh firewall {node} {}: {}",
            firewall.mode(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Packets dropped by the upstream namespace (labs built with upstream).
    pub fn vanished_upstream(&self) -> u64 {
        let out = Command::new(netns_sh())
            .args(["counter", &self.prefix, "upstream"])
            .output()
            .expect("run netns.sh counter");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("netns.sh counter: {out:?}"))
    }

    /// Tears the lab down and checks that no namespace of it is left.
    pub fn down(self) {
        let prefix = self.prefix.clone();
        drop(self);
        let left: Vec<String> = lab_namespaces()
            .into_iter()
            .filter(|ns| ns.starts_with(&format!("{prefix}-")))
            .collect();
        assert!(left.is_empty(), "namespaces left behind: {left:?}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        drop(self.holder_stdin.take());
        let exited = wait_exit(&mut self.holder, Duration::from_secs(20));
        if !exited {
            let _ = self.holder.kill();
            let _ = self.holder.wait();
        }
        // Whatever happened above, nothing of this lab stays.
        let _ = Command::new(netns_sh())
            .args(["down", &self.prefix])
            .status();
    }
}

/// The names of every network namespace on the machine.
pub fn lab_namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Runs `f` on a thread inside network namespace `ns` (setns affects only
/// the calling thread), e.g. to read turnkey's /metrics in the public
/// namespace.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid namespace fd; only this thread changes namespace,
        // and it ends when `f` returns.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace")
}
