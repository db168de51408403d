//! TURN over a byte stream (TCP or TLS) for tests, plus a test CA and TLS
//! client config made with rcgen.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stun::attributes::*;
use stun::error_code::ErrorCodeAttribute;
use stun::message::*;
use stun::textattrs::TextAttribute;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use turn::proto::channum::ChannelNumber;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::PROTO_UDP;
use turnkey::turn::wire;

use super::raw::{build_message, Auth};

/// A certificate authority and a leaf for `localhost` and 127.0.0.1.
pub struct TestPki {
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn test_pki(cn: &str) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "turnkey test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = params
        .signed_by(&key, &Issuer::from_params(&ca_params, &ca_key))
        .unwrap();
    TestPki {
        ca_der: ca.der().clone(),
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A test PKI whose leaf (`cn`) is written to a fresh directory, and the
/// `[tls]` config section that serves it on a free loopback port.
pub fn tls_setup(name: &str, cn: &str) -> (TestPki, std::path::PathBuf, String) {
    let pki = test_pki(cn);
    let dir = super::test_dir(&format!("{name}-pki"));
    let (cert, key) = pki.write(&dir);
    let section = format!(
        "\n[tls]\nlisten = [\"127.0.0.1:0\"]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    (pki, dir, section)
}

/// Makes `home`'s NSS database (where Chromium looks, with HOME=`home`)
/// trust `ca_pem` to identify TLS servers.
pub fn trust_ca_in_nss(home: &Path, ca_pem: &str) {
    let nssdb = home.join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).expect("create nssdb dir");
    let pem_path = home.join("turnkey-test-ca.pem");
    std::fs::write(&pem_path, ca_pem).expect("write CA PEM");
    let db = format!("sql:{}", nssdb.display());
    let pem_arg = pem_path.to_string_lossy().to_string();
    for args in [
        vec!["-N", "-d", &db, "--empty-password"],
        vec![
            "-A",
            "-d",
            &db,
            "-n",
            "turnkey-test-ca",
            "-t",
            "C,,",
            "-i",
            &pem_arg,
        ],
    ] {
        let out = std::process::Command::new("certutil")
            .args(&args)
            .output()
            .expect("run certutil");
        assert!(
            out.status.success(),
            "certutil {args:?}: {}",
            super::printed(&out)
        );
    }
}

impl TestPki {
    pub fn write(&self, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let c = dir.join("cert.pem");
        let k = dir.join("key.pem");
        // Write to temp names and rename, so a reader never sees half a file.
        std::fs::write(dir.join("cert.tmp"), &self.cert_pem).unwrap();
        std::fs::write(dir.join("key.tmp"), &self.key_pem).unwrap();
        std::fs::rename(dir.join("key.tmp"), &k).unwrap();
        std::fs::rename(dir.join("cert.tmp"), &c).unwrap();
        (c, k)
    }

    pub fn connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(Arc::new(client_config(Some(&self.ca_der), alpn)))
    }
}

/// A TLS client config that trusts `ca` alone (nothing when `None`) and
/// offers `alpn`.
pub fn client_config(
    ca: Option<&rustls::pki_types::CertificateDer<'static>>,
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        roots.add(ca.clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg
}

/// Joins `room` over a WebSocket opened on `stream` at `url`: the
/// `joined` message.
pub async fn ws_join<S>(stream: S, url: &str, room: &str) -> serde_json::Value
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Ws;
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("WebSocket upgrade");
    ws.send(Ws::text(format!(r#"{{"type":"join","room":"{room}"}}"#)))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("joined in time")
        {
            Some(Ok(Ws::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("no joined: {other:?}"),
        }
    }
}

pub async fn tls_connect(
    pki: &TestPki,
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("tcp connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    pki.connector(alpn)
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// `GET /healthz` over HTTPS (ALPN http/1.1) on `addr`: the whole answer.
pub async fn https_healthz(pki: &TestPki, addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut https = tls_connect(pki, addr, &[b"http/1.1"]).await;
    https
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write the request");
    let mut body = String::new();
    https
        .read_to_string(&mut body)
        .await
        .expect("read the answer");
    body
}

/// A TURN client speaking over one stream.
pub struct StreamTurn<S> {
    pub s: S,
    buf: Vec<u8>,
    pub user: String,
    pub pass: String,
    realm: String,
    nonce: Option<String>,
}

fn code(m: &Message) -> Option<u16> {
    let mut e = ErrorCodeAttribute::default();
    e.get_from(m).ok().map(|_| e.code.0)
}

/// A message read from the stream: STUN or ChannelData (channel, data).
pub enum Frame {
    Stun(Message),
    Channel(u16, Vec<u8>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> StreamTurn<S> {
    pub fn new(s: S, user: &str, pass: &str) -> Self {
        StreamTurn {
            s,
            buf: Vec::new(),
            user: user.into(),
            pass: pass.into(),
            realm: "turnkey".into(),
            nonce: None,
        }
    }

    pub async fn read_frame(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // A stream the server broke the framing of ends the read.
            if let Some(total) = wire::stream_frame_len(&self.buf).ok()? {
                let f: Vec<u8> = self.buf.drain(..total).collect();
                let channel = f.first().map(|&b| wire::kind_of_first_byte(b));
                if channel == Some(wire::Kind::ChannelData) {
                    let (n, d) = wire::parse_channel_data(&f).ok()?;
                    return Some(Frame::Channel(n, d.to_vec()));
                }
                let mut m = Message::new();
                m.raw = f;
                m.decode().ok()?;
                return Some(Frame::Stun(m));
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.s.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn transact(
        &mut self,
        method: Method,
        attrs: &dyn Fn() -> Vec<Box<dyn Setter>>,
    ) -> Message {
        let creds = self.nonce.as_deref().map(|nonce| Auth {
            user: &self.user,
            pass: &self.pass,
            realm: &self.realm,
            nonce,
        });
        let (raw, tid) = build_message(method, CLASS_REQUEST, attrs(), creds);
        self.s.write_all(&raw).await.expect("write request");
        loop {
            match self
                .read_frame(Duration::from_secs(5))
                .await
                .expect("an answer (the connection closed or stayed silent for 5 s)")
            {
                Frame::Stun(r) if r.transaction_id == tid => return r,
                _ => continue,
            }
        }
    }

    pub async fn request(
        &mut self,
        method: Method,
        attrs: impl Fn() -> Vec<Box<dyn Setter>>,
    ) -> Result<Message, u16> {
        for _ in 0..3 {
            let r = self.transact(method, &attrs).await;
            match code(&r) {
                None => return Ok(r),
                Some(401) | Some(438) if self.nonce.is_none() || code(&r) == Some(438) => {
                    self.nonce = Some(TextAttribute::get_from_as(&r, ATTR_NONCE).unwrap().text);
                    self.realm = TextAttribute::get_from_as(&r, ATTR_REALM).unwrap().text;
                }
                Some(c) => return Err(c),
            }
        }
        Err(0)
    }

    pub async fn allocate(&mut self) -> Result<SocketAddr, u16> {
        let m = self
            .request(METHOD_ALLOCATE, || {
                vec![Box::new(RequestedTransport {
                    protocol: PROTO_UDP,
                })]
            })
            .await?;
        let mut r = RelayedAddress::default();
        r.get_from(&m).unwrap();
        Ok(SocketAddr::new(r.ip, r.port))
    }

    /// Sends a Binding request; true when its answer arrives, false when
    /// the connection closed first.
    pub async fn read_frame_after_binding(&mut self) -> bool {
        let (raw, tid) = build_message(METHOD_BINDING, CLASS_REQUEST, Vec::new(), None);
        if self.s.write_all(&raw).await.is_err() {
            return false;
        }
        loop {
            match self.read_frame(Duration::from_secs(3)).await {
                Some(Frame::Stun(r)) if r.transaction_id == tid => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    }

    /// Refresh with a requested lifetime; the granted lifetime.
    pub async fn refresh(&mut self, secs: u64) -> Result<Duration, u16> {
        let m = self
            .request(METHOD_REFRESH, || {
                vec![Box::new(Lifetime(Duration::from_secs(secs)))]
            })
            .await?;
        let mut l = Lifetime::default();
        l.get_from(&m).unwrap();
        Ok(l.0)
    }

    pub async fn bind_channel(&mut self, number: u16, peer: SocketAddr) -> Result<Message, u16> {
        self.request(METHOD_CHANNEL_BIND, || {
            vec![
                Box::new(ChannelNumber(number)),
                Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                }),
            ]
        })
        .await
    }

    /// ChannelData, padded to 4 bytes as streams require.
    pub async fn channel_data(&mut self, number: u16, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&number.to_be_bytes());
        b.extend_from_slice(&(data.len() as u16).to_be_bytes());
        b.extend_from_slice(data);
        while b.len() % 4 != 0 {
            b.push(0);
        }
        self.s.write_all(&b).await.expect("write channel data");
    }

    /// The next ChannelData payload.
    pub async fn recv_channel(&mut self, within: Duration) -> Option<(u16, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await? {
                Frame::Channel(n, d) => return Some((n, d)),
                Frame::Stun(_) => continue,
            }
        }
    }
}

/// A UDP client with an allocation and a channel towards `peer`.
pub fn udp_side(tk: &super::Turnkey) -> (super::raw::Raw, SocketAddr) {
    let mut b = super::raw::Raw::new(tk.turn, "bob", "builder-of-things");
    let rb = b.allocate().expect("bob allocates over UDP");
    (b, rb)
}

/// Exchanges ChannelData between a stream client (channel 0x4001 to the
/// UDP client's relay) and the UDP client (channel 0x4002 back).
pub async fn relay_both_ways<S>(
    a: &mut StreamTurn<S>,
    ra: SocketAddr,
    b: &mut super::raw::Raw,
    rb: SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    a.bind_channel(0x4001, rb)
        .await
        .expect("stream client binds");
    b.bind_channel(0x4002, ra).expect("udp client binds");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        a.channel_data(0x4001, b"over the stream").await;
        if let Some((_, Some(0x4002), d)) = b.recv_data(Duration::from_millis(200)) {
            assert_eq!(d, b"over the stream");
            break;
        }
        assert!(Instant::now() < deadline, "stream → udp never arrived");
    }
    loop {
        b.channel_data(0x4002, b"back to the stream (odd)");
        if let Some((n, d)) = a.recv_channel(Duration::from_millis(200)).await {
            assert_eq!(
                (n, d.as_slice()),
                (0x4001, &b"back to the stream (odd)"[..])
            );
            break;
        }
        assert!(Instant::now() < deadline, "udp → stream never arrived");
    }
}
