//! Pebble, Let's Encrypt's test ACME server, on loopback for the ACME
//! tests: its DNS answered by `pebble-challtestsrv` (every name is
//! 127.0.0.1, so no /etc/hosts is touched), its TLS-ALPN-01 validation
//! port pointed at turnkey's TLS port, and its ACME API reached through a
//! small proxy the test can take down (pebble itself keeps running: a new
//! pebble would have a new CA and forget the account).
//! Validation is real: `PEBBLE_VA_ALWAYS_VALID` is never set.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};

use super::stream::{client_config, test_pki, TestPki};
use super::{require, test_dir};

pub struct Pebble {
    pebble: Child,
    dns: Child,
    pub dir: PathBuf,
    /// The CA of pebble's own HTTPS (what `tls.acme_ca_file` trusts).
    pub https_ca: PathBuf,
    /// Pebble's issuing root, PEM and DER, fetched from `/roots/0`.
    pub root_pem: String,
    pub root_der: rustls::pki_types::CertificateDer<'static>,
    /// The root in a file, for `turnkey probe --ca-file`.
    pub root_file: PathBuf,
    /// Where turnkey reaches the ACME API (the proxy).
    acme: SocketAddr,
    up: Arc<AtomicBool>,
    /// Connections through the proxy, cut when it goes down.
    live: Arc<Mutex<Vec<TcpStream>>>,
    log: Arc<Mutex<Vec<String>>>,
}

/// A loopback TCP port nobody listens on right now.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

fn log_lines(child: &mut Child, log: Arc<Mutex<Vec<String>>>, tag: &'static str) {
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if std::env::var_os("TURNKEY_TEST_LOG").is_some() {
                eprintln!("[{tag}] {line}");
            }
            log.lock().unwrap().push(line);
        }
    });
}

impl Pebble {
    /// Starts pebble validating TLS-ALPN-01 on `tls_port` (turnkey's TLS
    /// port) and HTTP-01 on `http_port`, its certificates valid for
    /// `validity_secs` (0 = pebble's default).
    pub async fn start(name: &str, tls_port: u16, http_port: u16, validity_secs: u64) -> Pebble {
        require("pebble", "pebble");
        require("pebble-challtestsrv", "pebble");
        let dir = test_dir(&format!("{name}-pebble"));
        let pki: TestPki = test_pki("pebble");
        let (cert, key) = pki.write(&dir);
        let https_ca = dir.join("pebble-https-ca.pem");
        std::fs::write(&https_ca, &pki.ca_pem).unwrap();

        let dns_port = free_udp_port();
        let mut dns = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_tcp_port())])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pebble-challtestsrv");
        let dns_log = Arc::new(Mutex::new(Vec::new()));
        log_lines(&mut dns, dns_log, "challtestsrv");

        let (api, mgmt) = (free_tcp_port(), free_tcp_port());
        let mut config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{api}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": cert,
            "privateKey": key,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if validity_secs > 0 {
            config["pebble"]["certificateValidityPeriod"] = validity_secs.into();
        }
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let mut pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pebble");
        let log = Arc::new(Mutex::new(Vec::new()));
        log_lines(&mut pebble, log.clone(), "pebble");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("ACME directory available"))
        {
            assert!(Instant::now() < deadline, "pebble did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let root_pem = https_get(&pki, mgmt, "/roots/0").await;
        let root_der = rustls::pki_types::pem::PemObject::from_pem_slice(root_pem.as_bytes())
            .expect("pebble's root is PEM");
        let root_file = dir.join("pebble-root.pem");
        std::fs::write(&root_file, &root_pem).unwrap();

        let up = Arc::new(AtomicBool::new(true));
        let live = Arc::new(Mutex::new(Vec::new()));
        let acme = proxy(api, up.clone(), live.clone());
        Pebble {
            pebble,
            dns,
            dir,
            https_ca,
            root_pem,
            root_der,
            root_file,
            acme,
            up,
            live,
            log,
        }
    }

    /// The directory URL turnkey is given.
    pub fn directory(&self) -> String {
        format!("https://localhost:{}/dir", self.acme.port())
    }

    /// The `[tls]` ACME keys for `domains`, caching in `cache`.
    pub fn acme_keys(&self, domains: &[&str], cache: &std::path::Path) -> String {
        format!(
            "acme_domains = {domains:?}\nacme_email = \"ops@turnkey.test\"\nacme_directory = \"{}\"\nacme_ca_file = \"{}\"\nacme_cache_dir = \"{}\"\n",
            self.directory(),
            self.https_ca.display(),
            cache.display()
        )
    }

    /// Certificates pebble issued so far.
    pub fn issued(&self) -> usize {
        self.count("Issued certificate serial")
    }

    /// Orders pebble was asked for so far.
    pub fn orders(&self) -> usize {
        self.count("POST /order-plz")
    }

    fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Takes the ACME API down (every connection refused and live ones
    /// cut) or brings it back.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for s in self.live.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// A TLS client trusting pebble's root alone.
    pub fn connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(Arc::new(client_config(Some(&self.root_der), alpn)))
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.set_up(false);
        for c in [&mut self.pebble, &mut self.dns] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// GET over HTTPS from pebble's management port: the body.
async fn https_get(pki: &TestPki, port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to pebble's management port");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = pki
        .connector(&[b"http/1.1"])
        .connect(name, tcp)
        .await
        .expect("TLS to pebble");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut all = String::new();
    let _ = s.read_to_string(&mut all).await;
    let body = all.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    assert!(body.contains("BEGIN CERTIFICATE"), "pebble {path}: {all}");
    body.to_string()
}

/// A TCP proxy to pebble's API on loopback: forwards while `up`, refuses
/// (accepts and closes) while down.
fn proxy(to: u16, up: Arc<AtomicBool>, live: Arc<Mutex<Vec<TcpStream>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            if !up.load(Ordering::SeqCst) {
                continue;
            }
            let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            {
                let mut l = live.lock().unwrap();
                l.push(client.try_clone().unwrap());
                l.push(server.try_clone().unwrap());
            }
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

/// A TLS handshake with `sni` that trusts pebble's root alone: the
/// certificate served, or the handshake error.
pub async fn handshake(
    pebble: &Pebble,
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        pebble.connector(alpn).connect(name, tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())
}

pub fn leaf(s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// Waits until a handshake (with `sni`) trusting pebble's root alone
/// succeeds and presents a leaf other than `not`: that leaf.
pub async fn wait_for_pebble_cert(
    pebble: &Pebble,
    addr: SocketAddr,
    sni: &str,
    not: Option<&CertificateDer<'static>>,
    within: Duration,
) -> CertificateDer<'static> {
    let deadline = Instant::now() + within;
    loop {
        let last = match handshake(pebble, addr, sni, &[]).await {
            Ok(s) if Some(&leaf(&s)) != not => return leaf(&s),
            Ok(_) => "the old certificate".to_string(),
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "no new certificate from pebble's CA within {within:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
