//! The probe's sockets: the HTTP(S) fetch of `/api/ice-servers`, UDP, TCP
//! and TLS connections to the TURN server, and the clock. Every decision
//! (what to send, what an answer means, what to advise) is in `client.rs`,
//! `ice.rs` and `diagnose.rs`; this file only moves bytes and keeps time.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout, timeout_at, Instant};

use super::client::{self, Answer, Client, ClientError, Frame, Progress, Request, StreamFramer};
use super::diagnose::{ApiFailure, Cause, CertProblem};

/// How long one request may go unanswered (UDP retransmits within it).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a TCP connect or a TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the first echo through the relay may take.
pub const RELAY_TIMEOUT: Duration = Duration::from_secs(3);
/// The whole `/api/ice-servers` fetch.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Round trips measured through the relay.
pub const PINGS: usize = 5;
/// RFC 8489 §6.2.1's initial retransmission timeout.
const INITIAL_RTO: Duration = Duration::from_millis(500);
const MAX_API_BODY: usize = 1 << 20;

/// Where Debian, Fedora/RHEL and Alpine keep the system's CA bundle.
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("--ca-file {path}: {err}")]
    CaFile { path: String, err: String },
    #[error("--ca-file {0}: no certificate in the file")]
    Empty(String),
}

/// The CAs to verify TLS servers with: `ca_file` alone when given, else
/// the system's bundle (none found: TLS checks report an unknown issuer).
pub fn roots(ca_file: Option<&Path>) -> Result<Arc<RootCertStore>, RootsError> {
    let mut store = RootCertStore::empty();
    let read = |p: &Path| -> Result<Vec<CertificateDer<'static>>, String> {
        CertificateDer::pem_file_iter(p)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| e.to_string())
    };
    match ca_file {
        Some(p) => {
            let shown = p.display().to_string();
            let certs = read(p).map_err(|err| RootsError::CaFile {
                path: shown.clone(),
                err,
            })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(RootsError::Empty(shown));
            }
        }
        None => {
            if let Some(certs) = SYSTEM_BUNDLES.iter().find_map(|b| read(Path::new(b)).ok()) {
                store.add_parsable_certificates(certs);
            }
        }
    }
    Ok(Arc::new(store))
}

fn connector(roots: &Arc<RootCertStore>, alpn: &[u8]) -> Result<tokio_rustls::TlsConnector, Cause> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Cause::Tls(e.to_string()))?
    .with_root_certificates(roots.clone())
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// What a failed TLS handshake was about.
fn tls_cause(e: &io::Error) -> Cause {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(c)) => Cause::Certificate(match c {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                CertProblem::WrongName
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                CertProblem::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                CertProblem::NotYetValid
            }
            CertificateError::UnknownIssuer => CertProblem::UnknownIssuer,
            other => CertProblem::Other(format!("{other:?}")),
        }),
        Some(other) => Cause::Tls(other.to_string()),
        None if e.kind() == io::ErrorKind::UnexpectedEof => Cause::Closed,
        None => io_cause(e),
    }
}

fn io_cause(e: &io::Error) -> Cause {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Cause::Refused,
        // What Linux answers when a local netfilter rule drops the packet.
        io::ErrorKind::PermissionDenied => Cause::LocalFirewall,
        io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof => Cause::Closed,
        _ => Cause::Io(e.to_string()),
    }
}

/// The addresses of `host`, IPv4 first (turnkey listens on IPv4 by default).
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Cause> {
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Cause::Resolve(e.to_string()))?
        .collect();
    addrs.sort_by_key(SocketAddr::is_ipv6);
    addrs.dedup();
    if addrs.is_empty() {
        return Err(Cause::Resolve("no address".into()));
    }
    Ok(addrs)
}

/// A TCP connection to the first address that takes it; the first
/// address's failure when none does.
async fn connect_tcp(addrs: &[SocketAddr]) -> Result<TcpStream, Cause> {
    let mut first = None;
    for a in addrs {
        let cause = match timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => io_cause(&e),
            Err(_) => Cause::Timeout(CONNECT_TIMEOUT),
        };
        first.get_or_insert(cause);
    }
    Err(first.unwrap_or(Cause::Resolve("no address".into())))
}

async fn tls_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: S,
    host: &str,
    roots: &Arc<RootCertStore>,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<S>, Cause> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| Cause::Tls(format!("`{host}` is not a valid TLS server name: {e}")))?;
    match timeout(CONNECT_TIMEOUT, connector(roots, alpn)?.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(tls_cause(&e)),
        Err(_) => Err(Cause::Timeout(CONNECT_TIMEOUT)),
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// GET `base`/api/ice-servers: the body and the time it took.
pub async fn fetch_ice_servers(
    base: &str,
    token: Option<&str>,
    roots: &Arc<RootCertStore>,
) -> Result<(Vec<u8>, Duration), ApiFailure> {
    let started = Instant::now();
    match timeout(API_TIMEOUT, fetch(base, token, roots)).await {
        Ok(r) => r.map(|b| (b, started.elapsed())),
        Err(_) => Err(ApiFailure::Network(Cause::Timeout(API_TIMEOUT))),
    }
}

async fn fetch(
    base: &str,
    token: Option<&str>,
    roots: &Arc<RootCertStore>,
) -> Result<Vec<u8>, ApiFailure> {
    let uri: hyper::Uri = base
        .parse()
        .map_err(|e| ApiFailure::BadUrl(format!("{e}")))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(ApiFailure::BadUrl(
                "the URL must start with http:// or https://".into(),
            ))
        }
    };
    let (Some(authority), Some(host)) = (uri.authority(), uri.host()) else {
        return Err(ApiFailure::BadUrl("the URL has no host".into()));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path = format!("{}/api/ice-servers", uri.path().trim_end_matches('/'));
    let addrs = resolve(host, port).await.map_err(ApiFailure::Network)?;
    let tcp = connect_tcp(&addrs).await.map_err(ApiFailure::Network)?;
    let io: Box<dyn Io> = if tls {
        Box::new(
            tls_handshake(tcp, host, roots, crate::tls::ALPN_HTTP1)
                .await
                .map_err(ApiFailure::Network)?,
        )
    } else {
        Box::new(tcp)
    };
    let http = |e: hyper::Error| ApiFailure::Http(e.to_string());
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(http)?;
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::get(path.as_str())
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::ACCEPT, "application/json");
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Empty::new())
        .map_err(|e| ApiFailure::BadUrl(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status().as_u16();
    if status != 200 {
        conn.abort();
        return Err(ApiFailure::Status(status));
    }
    let body = Limited::new(resp.into_body(), MAX_API_BODY)
        .collect()
        .await
        .map_err(|e| ApiFailure::Http(e.to_string()))?
        .to_bytes();
    conn.abort();
    Ok(body.to_vec())
}

/// A connection to a TURN server over one transport.
pub struct Conn {
    kind: ConnKind,
    pub remote: SocketAddr,
}

enum ConnKind {
    Udp(UdpSocket),
    Stream(Box<dyn Io>, StreamFramer),
}

impl Conn {
    /// A connected UDP socket towards the first address.
    pub async fn udp(addrs: &[SocketAddr]) -> Result<Conn, Cause> {
        let remote = *addrs.first().ok_or(Cause::Resolve("no address".into()))?;
        let local: SocketAddr = if remote.is_ipv6() {
            "[::]:0".parse()
        } else {
            "0.0.0.0:0".parse()
        }
        .map_err(|_| Cause::Io("local address".into()))?;
        let s = UdpSocket::bind(local).await.map_err(|e| io_cause(&e))?;
        s.connect(remote).await.map_err(|e| io_cause(&e))?;
        Ok(Conn {
            kind: ConnKind::Udp(s),
            remote,
        })
    }

    pub async fn tcp(addrs: &[SocketAddr]) -> Result<Conn, Cause> {
        let s = connect_tcp(addrs).await?;
        let remote = s.peer_addr().map_err(|e| io_cause(&e))?;
        Ok(Conn {
            kind: ConnKind::Stream(Box::new(s), StreamFramer::default()),
            remote,
        })
    }

    /// The TLS handshake on a TCP connection (`Conn::tcp`), verifying the
    /// certificate against `host`; ALPN `stun.turn` (RFC 7443).
    pub async fn start_tls(self, host: &str, roots: &Arc<RootCertStore>) -> Result<Conn, Cause> {
        let ConnKind::Stream(io, _) = self.kind else {
            return Err(Cause::Tls("TLS over UDP".into()));
        };
        let s = tls_handshake(io, host, roots, crate::tls::ALPN_TURN).await?;
        Ok(Conn {
            kind: ConnKind::Stream(Box::new(s), StreamFramer::default()),
            remote: self.remote,
        })
    }

    fn is_stream(&self) -> bool {
        matches!(self.kind, ConnKind::Stream(..))
    }

    async fn send(&mut self, b: &[u8]) -> Result<(), Cause> {
        match &mut self.kind {
            ConnKind::Udp(s) => s.send(b).await.map(|_| ()),
            ConnKind::Stream(s, _) => s.write_all(b).await,
        }
        .map_err(|e| io_cause(&e))
    }

    /// The next frame from the server, or `Timeout` at `until`.
    async fn recv(&mut self, until: Instant) -> Result<Frame, Cause> {
        let mut buf = vec![0u8; 65536];
        loop {
            match &mut self.kind {
                ConnKind::Udp(s) => {
                    let n = match timeout_at(until, s.recv(&mut buf)).await {
                        Err(_) => return Err(Cause::Timeout(Duration::ZERO)),
                        Ok(r) => r.map_err(|e| io_cause(&e))?,
                    };
                    if let Some(f) = buf.get(..n).and_then(client::datagram_frame) {
                        return Ok(f);
                    }
                }
                ConnKind::Stream(s, framer) => {
                    if let Some(f) = framer
                        .next_frame()
                        .map_err(|e| Cause::Protocol(e.to_string()))?
                    {
                        return Ok(f);
                    }
                    let n = match timeout_at(until, s.read(&mut buf)).await {
                        Err(_) => return Err(Cause::Timeout(Duration::ZERO)),
                        Ok(r) => r.map_err(|e| io_cause(&e))?,
                    };
                    if n == 0 {
                        return Err(Cause::Closed);
                    }
                    framer.push(buf.get(..n).unwrap_or_default());
                }
            }
        }
    }

    /// One request to its answer; over UDP retransmitted (RFC 8489 §6.2.1)
    /// within `ANSWER_TIMEOUT`.
    pub async fn transact(&mut self, c: &mut Client, req: Request) -> Result<Answer, Cause> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let first = c.start(req).map_err(client_cause)?.to_vec();
        self.send(&first).await?;
        let mut rto = INITIAL_RTO;
        let mut resend_at = Instant::now() + rto;
        loop {
            let until = if self.is_stream() {
                deadline
            } else {
                resend_at.min(deadline)
            };
            match self.recv(until).await {
                Ok(Frame::Stun(raw)) => match c.handle(&raw).map_err(client_cause)? {
                    Progress::Ignored => {}
                    Progress::Done(a) => return Ok(a),
                    Progress::Resend => {
                        let again = c.in_flight().unwrap_or_default().to_vec();
                        self.send(&again).await?;
                        rto = INITIAL_RTO;
                        resend_at = Instant::now() + rto;
                    }
                },
                Ok(Frame::Channel(..)) => {}
                Err(Cause::Timeout(_)) if Instant::now() < deadline => {
                    let again = c.in_flight().unwrap_or_default().to_vec();
                    self.send(&again).await?;
                    rto *= 2;
                    resend_at = Instant::now() + rto;
                }
                Err(Cause::Timeout(_)) => return Err(Cause::Timeout(ANSWER_TIMEOUT)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Pings through the relay on `channel` (bound to our own relayed
    /// address, so each ping leaves the relay and comes back in): up to
    /// `PINGS` round-trip times. A ping unanswered for an RTO is replaced by
    /// a new one; none answered within `RELAY_TIMEOUT` is a timeout.
    pub async fn round_trips(
        &mut self,
        channel: u16,
        probe_id: u64,
    ) -> Result<Vec<Duration>, Cause> {
        let stream = self.is_stream();
        let deadline = Instant::now() + RELAY_TIMEOUT;
        let mut sent: Vec<Instant> = Vec::new();
        let mut rtts = Vec::new();
        while rtts.len() < PINGS && Instant::now() < deadline {
            let seq = u32::try_from(sent.len()).unwrap_or(u32::MAX);
            let payload = client::ping_payload(probe_id, seq);
            self.send(&client::channel_data(channel, &payload, stream))
                .await?;
            sent.push(Instant::now());
            let wait_until = (Instant::now() + INITIAL_RTO).min(deadline);
            loop {
                match self.recv(wait_until).await {
                    Ok(Frame::Channel(n, data)) if n == channel => {
                        let echoed = (0..sent.len()).find(|s| {
                            client::ping_payload(probe_id, u32::try_from(*s).unwrap_or(u32::MAX))
                                == data.as_slice()
                        });
                        if let Some(s) = echoed.and_then(|s| sent.get(s)) {
                            rtts.push(s.elapsed());
                            if echoed == Some(sent.len() - 1) {
                                break;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(Cause::Timeout(_)) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        if rtts.is_empty() {
            return Err(Cause::Timeout(RELAY_TIMEOUT));
        }
        Ok(rtts)
    }
}

fn client_cause(e: ClientError) -> Cause {
    match e {
        ClientError::Rejected {
            code,
            reason,
            authenticated,
            ..
        } => Cause::Rejected {
            code,
            reason,
            authenticated,
        },
        other => Cause::Protocol(other.to_string()),
    }
}
