//! Two browsers in a call: one `client.mjs` per client namespace, their
//! JSON reports gathered, and the verdict on what they saw.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cell::{Cell, Expect, Nat};
use super::netns::{Lab, Topology};
use super::turnkey::LabTurnkey;
use super::{client_dir, collect_lines, tail, wait_exit, TURN_IP};

/// One `client.mjs` in a client namespace: a browser on turnkey's page.
pub struct Client {
    node: String,
    child: Child,
    /// Closing it ends the client (it closes its browser and exits).
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Client {
    pub fn spawn(
        lab: &Lab,
        node: &str,
        side: usize,
        url: &str,
        stun: &[&str],
        chromium_args: &[String],
        tx: Sender<(usize, Value)>,
    ) -> Client {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.ns(node), "node"])
            .arg(client_dir().join("client.mjs"))
            .args(["--name", node, "--url", url, "--max-ms", "180000"])
            .current_dir(client_dir());
        for s in stun {
            cmd.args(["--stun", s]);
        }
        for a in chromium_args {
            cmd.arg(format!("--chromium-arg={a}"));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the lab client");
        let stdin = child.stdin.take();
        let stderr = collect_lines(child.stderr.take().expect("stderr"), node);
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send((side, v)).is_err() {
                    return;
                }
            }
            let _ = tx.send((side, serde_json::json!({"event": "exit"})));
        });
        Client {
            node: node.to_string(),
            child,
            stdin,
            stderr,
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if wait_exit(&mut self.child, Duration::from_secs(10)) {
            return;
        }
        // SIGTERM still lets it close the browser and remove the profile.
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if !wait_exit(&mut self.child, Duration::from_secs(5)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What one side has reported so far.
#[derive(Default)]
pub struct Side {
    stun: Option<Value>,
    last: Option<Value>,
    /// framesDecoded when the call was first seen connected with video.
    frames_at_connect: Option<u64>,
    saw_peer: bool,
    error: Option<String>,
}

impl Side {
    /// Takes in one JSON line of the client.
    pub fn absorb(&mut self, v: Value) {
        match v["event"].as_str() {
            Some("stun") => self.stun = Some(v),
            Some("sample") => {
                if v["peers"].as_u64() == Some(1) {
                    self.saw_peer = true;
                }
                let frames = v["framesDecoded"].as_u64().unwrap_or(0);
                if v["connectionState"] == "connected" && frames > 0 {
                    self.frames_at_connect.get_or_insert(frames);
                }
                self.last = Some(v);
            }
            Some("error") => self.error = Some(v["message"].to_string()),
            Some("exit") => {
                self.error
                    .get_or_insert_with(|| "the client exited".to_string());
            }
            _ => self.error = Some(format!("unexpected output: {v}")),
        }
    }

    /// Connected, one peer, and video frames decoded since connecting.
    pub fn decoding(&self) -> bool {
        let Some(s) = &self.last else { return false };
        let frames = s["framesDecoded"].as_u64().unwrap_or(0);
        s["connectionState"] == "connected"
            && s["peers"].as_u64() == Some(1)
            && self.frames_at_connect.is_some_and(|f| frames > f)
    }

    /// The selected pair as "local/remote" candidate types.
    pub fn pair(&self) -> String {
        match &self.last {
            Some(s) => format!(
                "{}/{}",
                s["localCandidateType"].as_str().unwrap_or("-"),
                s["remoteCandidateType"].as_str().unwrap_or("-")
            ),
            None => "-/-".to_string(),
        }
    }
}

pub enum Failure {
    /// The call did not connect as expected (what the lab is there to catch).
    NotConnected(String),
    /// The harness itself failed: a client or turnkey died, bad output.
    Harness(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::NotConnected(m) | Failure::Harness(m) => m,
        }
    }
}

pub struct Outcome {
    /// From browser launch to both sides decoding over the expected pair.
    pub elapsed: Duration,
    /// The selected pair, local/remote candidate type, as each side sees it.
    pub pairs: [String; 2],
    pub relay_protocol: Option<String>,
    /// Each side's STUN Binding verdict.
    pub stun: [String; 2],
}

/// A call between the two clients of `cell`'s row, alive until dropped.
pub struct Call<'a> {
    cell: Cell,
    topo: &'a Topology,
    clients: Vec<Client>,
    rx: Receiver<(usize, Value)>,
    sides: [Side; 2],
    started: Instant,
}

impl<'a> Call<'a> {
    pub fn start(lab: &Lab, topo: &'a Topology, cell: Cell, chromium_args: &[String]) -> Call<'a> {
        let nodes = cell.nat.clients();
        for node in nodes {
            lab.firewall(node, cell.firewall);
        }
        let (tx, rx) = mpsc::channel();
        let started = Instant::now();
        let url = cell.url();
        let clients = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let stun = cell.firewall.stun_servers();
                Client::spawn(lab, node, i, &url, stun, chromium_args, tx.clone())
            })
            .collect();
        Call {
            cell,
            topo,
            clients,
            rx,
            sides: [Side::default(), Side::default()],
            started,
        }
    }

    /// Waits until both sides decode video over a pair `cell` expects, or
    /// `within` passes.
    pub fn connected(&mut self, within: Duration) -> Result<Outcome, Failure> {
        let deadline = self.started + within;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Failure::NotConnected(format!(
                    "no call as expected within {within:?}: {}",
                    self.why_not()
                )));
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok((side, v)) => self.sides[side].absorb(v),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Failure::Harness(format!(
                        "both clients are gone: {}",
                        self.why_not()
                    )))
                }
            }
            if let Some(i) = (0..2).find(|&i| self.sides[i].error.is_some()) {
                return Err(Failure::Harness(format!(
                    "{}: {}\n{}",
                    self.clients[i].node,
                    self.sides[i].error.as_deref().unwrap_or(""),
                    self.diagnostics()
                )));
            }
            if self.sides.iter().all(Side::decoding) && self.judge().is_ok() {
                let stun = [self.judge_stun(0), self.judge_stun(1)];
                let [a, b] = stun;
                let stun = [
                    a.map_err(Failure::NotConnected)?,
                    b.map_err(Failure::NotConnected)?,
                ];
                let last = self.sides[0].last.as_ref().expect("sample");
                return Ok(Outcome {
                    elapsed: self.started.elapsed(),
                    pairs: [self.sides[0].pair(), self.sides[1].pair()],
                    relay_protocol: last["relayProtocol"].as_str().map(str::to_string),
                    stun,
                });
            }
        }
    }

    /// Whether both sides' selected pairs are what the cell expects.
    pub fn judge(&self) -> Result<(), String> {
        for i in 0..2 {
            let s = self.sides[i].last.as_ref().ok_or("no sample")?;
            let node = self.clients[i].node.as_str();
            let peer_ip = self.topo.public_ip(&self.clients[1 - i].node);
            let ty = |k: &str| s[k].as_str().unwrap_or("").to_string();
            let ip = |k: &str| -> Option<IpAddr> {
                s[k].as_str()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .map(|a| a.ip())
            };
            let turn_ip: IpAddr = TURN_IP.parse().expect("ip");
            let local_relay = ty("localCandidateType") == "relay";
            // A peer's relay candidate may still show as prflx when its
            // check arrived before its candidate did.
            let remote_relay =
                ty("remoteCandidateType") == "relay" || ip("remoteAddress") == Some(turn_ip);
            let protocol = ty("relayProtocol");
            let pair = self.sides[i].pair();
            match self.cell.expect() {
                Expect::Direct { remote_types } => {
                    if local_relay || remote_relay {
                        return Err(format!("{node}: pair {pair} uses the relay, want direct"));
                    }
                    if !remote_types.contains(&ty("remoteCandidateType").as_str()) {
                        return Err(format!("{node}: pair {pair}, want remote {remote_types:?}"));
                    }
                    if ip("remoteAddress") != Some(peer_ip) {
                        return Err(format!(
                            "{node}: remote {} is not the peer's public address {peer_ip}",
                            s["remoteAddress"]
                        ));
                    }
                }
                Expect::Relayed => {
                    if !local_relay && !remote_relay {
                        return Err(format!("{node}: pair {pair} does not use the relay"));
                    }
                    if local_relay && protocol != "udp" {
                        return Err(format!("{node}: relay over {protocol:?}, want udp"));
                    }
                }
                Expect::RelayedBothEnds { protocol: want } => {
                    if !local_relay || !remote_relay {
                        return Err(format!("{node}: pair {pair}, want relay at both ends"));
                    }
                    if protocol != want {
                        return Err(format!("{node}: relay over {protocol:?}, want {want}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The client's Binding answers: its public address, and the mapping
    /// behaviour of its NAT when it could ask two server ports.
    pub fn judge_stun(&self, i: usize) -> Result<String, String> {
        let servers = self.cell.firewall.stun_servers();
        if servers.is_empty() {
            return Ok("-".to_string());
        }
        let node = &self.clients[i].node;
        let stun = self.sides[i]
            .stun
            .as_ref()
            .ok_or(format!("{node}: no STUN report"))?;
        let want_ip = self.topo.public_ip(node);
        let local = stun["local"].as_u64().ok_or(format!("{node}: {stun}"))?;
        let mut mapped = Vec::new();
        for r in stun["results"]
            .as_array()
            .ok_or(format!("{node}: {stun}"))?
        {
            let addr: SocketAddr = r["mapped"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .ok_or(format!("{node}: no Binding answer from {}", r["server"]))?;
            if addr.ip() != want_ip {
                return Err(format!(
                    "{node}: Binding to {} says {addr}, want the public address {want_ip}",
                    r["server"]
                ));
            }
            mapped.push(addr.port());
        }
        if mapped.len() != servers.len() {
            return Err(format!(
                "{node}: {} Binding answers, want {}",
                mapped.len(),
                servers.len()
            ));
        }
        let ports: Vec<String> = mapped.iter().map(u16::to_string).collect();
        let same = mapped.windows(2).all(|w| w[0] == w[1]);
        let behaviour = match (self.cell.nat, mapped.len()) {
            (_, 1) => "",
            (Nat::None, _) if mapped.iter().all(|&p| u64::from(p) == local) => " untranslated",
            (Nat::EndpointIndependent, _) if same => " same port: endpoint-independent",
            (Nat::Symmetric, _) if !same => " new port per server: symmetric",
            (nat, _) => {
                return Err(format!(
                    "{node}: mapped ports {ports:?} from local port {local} do not fit {nat:?}"
                ))
            }
        };
        Ok(format!("{want_ip}:{}{behaviour}", ports.join(",")))
    }

    pub fn why_not(&self) -> String {
        let states: Vec<String> = (0..2)
            .map(|i| {
                let s = &self.sides[i];
                let last = s.last.as_ref();
                format!(
                    "{}: {} pair {} frames {} (peer seen: {})",
                    self.clients[i].node,
                    last.map_or("no sample".to_string(), |l| l["connectionState"]
                        .to_string()),
                    s.pair(),
                    last.map_or(0, |l| l["framesDecoded"].as_u64().unwrap_or(0)),
                    s.saw_peer
                )
            })
            .collect();
        let judged = self.judge().err().unwrap_or_default();
        format!("{}; {judged}", states.join("; "))
    }

    pub fn diagnostics(&self) -> String {
        self.clients
            .iter()
            .map(|c| format!("--- {} stderr:\n{}", c.node, tail(&c.stderr, 30)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Both sides joined the room and saw each other: signaling worked.
    pub fn both_saw_peer(&self) -> bool {
        self.sides.iter().all(|s| s.saw_peer)
    }
}

/// Runs one cell to its verdict; the call is over when this returns.
pub fn run_cell(
    lab: &Lab,
    tk: &mut LabTurnkey,
    topo: &Topology,
    cell: Cell,
    chromium_args: &[String],
    within: Duration,
) -> Result<Outcome, String> {
    let mut call = Call::start(lab, topo, cell, chromium_args);
    let result = call.connected(within);
    let diagnostics = call.diagnostics();
    drop(call);
    let alive = tk.alive();
    match result {
        Ok(outcome) if alive => Ok(outcome),
        Ok(_) => Err(format!("turnkey died:\n{}", tail(&tk.log, 40))),
        Err(f) => Err(format!(
            "{}\n{diagnostics}\n--- turnkey (alive: {alive}):\n{}",
            f.message(),
            tail(&tk.log, 20)
        )),
    }
}
