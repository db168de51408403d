//! A `redis-server` of a test's own, on a free loopback port, killed on
//! drop: for the backend suite (`backend_tests.rs`) and the cluster tests
//! (`tests/cluster.rs`, which include this file by path). Self-contained on
//! purpose: no crate imports. A missing binary fails the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(5);

pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts one with `dir` (created if missing) as its working directory.
    pub fn start(dir: PathBuf) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        std::fs::create_dir_all(&dir).expect("redis-server's directory");
        let child = Self::spawn(port, &dir);
        RedisServer { child, port, dir }
    }

    fn spawn(port: u16, dir: &Path) -> Child {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        let deadline = Instant::now() + START;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills it and starts a new, empty one on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.port, &self.dir);
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        // Without persistence it wrote nothing: the directory is empty.
        let _ = std::fs::remove_dir(&self.dir);
    }
}
