//! Runs the real `turnkey` binary for end-to-end tests: a config file in a
//! temp dir, loopback listeners on free ports, the process killed on drop.
#![allow(dead_code)]

pub mod pebble;
pub mod raw;
pub mod stream;
pub mod ws;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Turnkey {
    pub child: Child,
    pub http: SocketAddr,
    pub turn: SocketAddr,
    /// Every UDP listener (the first is `turn`).
    pub turn_all: Vec<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub metrics: SocketAddr,
    /// The admin API, when `admin.listen` is set.
    pub admin: Option<SocketAddr>,
    pub config_path: PathBuf,
    pub dir: PathBuf,
    /// Every line the process logged so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// A fresh directory under target/ for one test's files.
pub fn test_dir(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// The base config every test starts from: loopback, any free port, one
/// shard, a fixed REST secret and two static users.
pub fn base_config(extra: &str) -> String {
    format!(
        r#"
[log]
level = "info,turnkey=debug"
[http]
listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[turn]
listen = ["127.0.0.1:0"]
# Its own free port: by default TCP takes the UDP port's number, which a
# parallel test's outgoing TCP connection may hold on loopback.
tcp_listen = ["127.0.0.1:0"]
threads = 1
{extra}
"#
    )
}

pub const SECRET: &str = "integration-test-secret-0123456789";

/// Config sections for auth: appended by tests that want the defaults.
pub fn auth_section() -> String {
    format!(
        r#"
[auth]
secrets = ["{SECRET}"]
[auth.users]
alice = "wonderland-rabbit"
bob = "builder-of-things"
"#
    )
}

impl Turnkey {
    /// Starts turnkey with `config` (a full TOML text) and waits until it
    /// logs its ready line.
    pub fn start(name: &str, config: &str) -> Turnkey {
        Turnkey::start_in(name, config, None)
    }

    /// [`Turnkey::start`] in a network namespace (`ip netns exec`).
    pub fn start_in(name: &str, config: &str, netns: Option<&str>) -> Turnkey {
        let dir = test_dir(name);
        let config_path = dir.join("turnkey.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_turnkey")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_turnkey")),
        };
        let mut child = cmd
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn turnkey");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready: ") {
                    let _ = tx.send(line.clone());
                }
                if std::env::var_os("TURNKEY_TEST_LOG").is_some() {
                    eprintln!("[turnkey] {line}");
                }
                log2.lock().unwrap().push(line);
            }
        });
        let ready = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "turnkey did not become ready; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let list = |k: &str| -> Vec<SocketAddr> {
            let start = ready.find(&format!(" {k}=")).expect("field in ready line") + k.len() + 2;
            let rest = &ready[start..];
            let end = rest.find(' ').unwrap_or(rest.len());
            rest[..end]
                .split(',')
                .filter_map(|a| a.parse().ok())
                .collect()
        };
        let field = |k: &str| -> SocketAddr { *list(k).first().expect("address in ready line") };
        Turnkey {
            http: field("http"),
            turn: field("turn"),
            turn_all: list("turn"),
            tcp: list("tcp").first().copied(),
            tls: list("tls").first().copied(),
            metrics: field("metrics"),
            admin: list("admin").first().copied(),
            child,
            config_path,
            dir,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// A blocking HTTP GET on loopback: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path)
    }

    /// The value of one metric series from /metrics (0 when absent).
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = http_get(self.metrics, "/metrics");
        body.lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Waits for the process to exit within `d`; its status if it did.
    pub fn wait_exit(&mut self, d: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Turnkey {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Chunked bodies: good enough to strip the chunk-size lines for text.
    (status, dechunk(&body))
}

/// An HTTP request to the admin API: (status, JSON body).
pub fn admin(
    tk: &Turnkey,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    admin_with(tk, method, path, token, None)
}

/// [`admin`] with a JSON body.
pub fn admin_with(
    tk: &Turnkey,
    method: &str,
    path: &str,
    token: Option<&str>,
    json: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(tk.admin.expect("admin listener")).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let body = json.map_or(String::new(), |j| j.to_string());
    let typed = match json {
        Some(_) => format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ),
        None => String::new(),
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}{typed}Connection: close\r\n\r\n{body}"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or_default())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_string();
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

/// Whether a command is on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Fails the test when a required tool is missing: the suite never skips
/// silently (`.ci/run` installs these).
pub fn require(cmd: &str, package: &str) {
    assert!(
        have(cmd),
        "`{cmd}` is required for this test: install the Debian package `{package}` (.ci/run does)"
    );
}

/// Installs a test harness's pinned playwright-core from its
/// package-lock.json when absent (`npm ci`; never a browser download).
pub fn ensure_node_modules(dir: &std::path::Path) {
    if dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return;
    }
    require("npm", "npm");
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .expect("run npm ci");
    assert!(
        status.success(),
        "`npm ci` in {} failed: {status}",
        dir.display()
    );
}

/// The Python of a virtualenv holding the pinned packages of
/// `requirements` (created under target/ on first use, and again when the
/// file changes): the tests' non-browser WebRTC stack lives there.
pub fn python_venv(requirements: &std::path::Path) -> PathBuf {
    require("python3", "python3-venv");
    let wanted = std::fs::read_to_string(requirements).expect("read requirements");
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("venv-aiortc");
    let stamp = venv.join("requirements.installed");
    let python = venv.join("bin/python");
    // One test binary may ask from several threads.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) && python.exists() {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(out.status.success(), "{what} failed:\n{}", printed(&out));
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv (Debian: python3-venv)",
    );
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--require-virtualenv",
                "-r",
            ])
            .arg(requirements),
        "pip install -r requirements",
    );
    std::fs::write(&stamp, wanted).expect("write venv stamp");
    python
}

/// Runs `cmd`, killing it after `timeout`: (exit success, stdout, stderr).
pub fn run_with_timeout(
    mut cmd: std::process::Command,
    timeout: Duration,
) -> (bool, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the command");
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the command") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    match status {
        Some(st) => (st.success(), out, err),
        None => (false, out, format!("{err}\nkilled after {timeout:?}")),
    }
}

/// Everything a finished command printed, stdout then stderr.
pub fn printed(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
