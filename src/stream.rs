//! TURN over TCP and TLS (RFC 8656 §3.2), and the shared port.
//!
//! Each connection is a tokio task. It may start with a PROXY protocol v2
//! header (only from configured balancers), then TLS when the listener is
//! a TLS one; then it is told apart by ALPN (`h2`/`http/1.1` → HTTP,
//! `stun.turn` → TURN, `acme-tls/1` → closed after the handshake, RFC 8737)
//! or, without ALPN, by its first byte: a STUN header
//! (0x00–0x03) is TURN, anything else HTTP (a TURN client cannot start with
//! ChannelData, and HTTP methods start with letters). So one port can serve
//! the page, WSS signaling and `turns:` at once.
//!
//! TURN connections are cut into messages here (`turn::wire::
//! stream_frame_len`: STUN by its length field, ChannelData padded to 4
//! bytes) and fed to their shard's core like datagrams; the
//! allocation lives as long as the connection. Limits keep a flood cheap:
//! a TLS handshake deadline, a deadline for getting an allocation, an idle
//! timeout, caps on connections without an allocation per source IP and
//! in total, and a bounded queue of answers per connection (a client that
//! stops reading is cut off).

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::{Occupancy, Slot};
use crate::config::TcpHttp;
use crate::counter::inc;
use crate::proxy_protocol::{self, Proxied};
use crate::public::Gate;
use crate::relay::{ShardHandle, StreamEvent, StreamLink};
use crate::turn::allocation::{FiveTuple, Transport};
use crate::turn::wire::{kind_of_first_byte, stream_frame_len, Kind};

/// Answers queued towards one connection before it counts as not reading.
const OUT_QUEUE: usize = 256;

#[derive(Debug, Clone)]
pub struct StreamLimits {
    pub handshake_timeout: Duration,
    pub unauth_timeout: Duration,
    pub idle_timeout: Duration,
    pub unauth_per_ip: usize,
    pub unauth_total: usize,
    pub proxy_from: Vec<IpNet>,
    /// What plain HTTP on the TURN TCP port gets.
    pub tcp_http: TcpHttp,
}

/// Counters for the stream listeners.
#[derive(Default)]
pub struct StreamStats {
    pub accepted: AtomicU64,
    pub refused_over_limit: AtomicU64,
    pub handshake_failures: AtomicU64,
    /// TLS-ALPN-01 validation handshakes (`acme-tls/1`), closed unrouted.
    pub acme_challenges: AtomicU64,
    pub timed_out: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub open_turn: AtomicU64,
    pub open_http: AtomicU64,
}

pub struct Streams {
    shards: Vec<ShardHandle>,
    /// Swapped by reload; each connection takes a snapshot when it opens.
    limits: Arc<ArcSwap<StreamLimits>>,
    http: axum::Router,
    /// What `turn.tcp_http = "redirect"` answers on the TURN TCP port.
    redirect: axum::Router,
    /// HTTP connections' caps and timeouts, shared with `http.listen`.
    gate: Arc<Gate>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Connections without an allocation, counted per listener kind (TURN
    /// TCP [0], TLS [1]): a flood of one never starves the other, so
    /// HTTPS and WSS on 443 keep working while 3478/tcp is flooded.
    unauth: [Arc<Occupancy>; 2],
    stats: Arc<StreamStats>,
    /// Every connection task, so stop can wait for them.
    tasks: TaskTracker,
    /// Cancelled on stop: listeners and connections end.
    stop: CancellationToken,
}

/// What the stream listeners are built from (see `app.rs`).
pub struct StreamParts {
    pub shards: Vec<ShardHandle>,
    pub limits: Arc<ArcSwap<StreamLimits>>,
    /// The public HTTP app, and what the TURN TCP port redirects with.
    pub http: axum::Router,
    pub redirect: axum::Router,
    pub gate: Arc<Gate>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub stats: Arc<StreamStats>,
    pub tasks: TaskTracker,
    pub stop: CancellationToken,
}

impl Streams {
    pub fn new(p: StreamParts) -> Arc<Streams> {
        Arc::new(Streams {
            shards: p.shards,
            limits: p.limits,
            http: p.http,
            redirect: p.redirect,
            gate: p.gate,
            tls: p.tls.map(tokio_rustls::TlsAcceptor::from),
            unauth: [Occupancy::new(), Occupancy::new()],
            stats: p.stats,
            tasks: p.tasks,
            stop: p.stop,
        })
    }

    /// A place under the unauthenticated caps of the listener kind, held
    /// until the connection gets an allocation (or ends).
    fn admit(&self, ip: IpAddr, tls: bool, limits: &StreamLimits) -> Option<Slot> {
        self.unauth[usize::from(tls)]
            .take(ip, limits.unauth_per_ip, limits.unauth_total)
            .ok()
    }

    /// Accepts connections until stop; each connection is a task of
    /// `tasks` that ends at stop too.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: bool) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = self.stop.cancelled() => return,
            };
            let Ok((tcp, peer)) = accepted else {
                // EMFILE and friends: back off briefly instead of spinning.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let local = tcp.local_addr().unwrap_or(peer);
            let _ = tcp.set_nodelay(true);
            let me = self.clone();
            self.tasks.spawn(async move {
                let stop = me.stop.clone();
                tokio::select! {
                    () = me.connection(tcp, peer, local, tls) => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    }

    async fn connection(
        self: Arc<Self>,
        mut tcp: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        tls: bool,
    ) {
        let limits = self.limits.load_full();
        let mut client = peer;
        if limits.proxy_from.iter().any(|n| n.contains(&peer.ip())) {
            match timeout(limits.handshake_timeout, read_proxy_header(&mut tcp)).await {
                Ok(Ok(Proxied::Client(addr))) => client = addr,
                Ok(Ok(_)) => {}
                _ => {
                    inc(&self.stats.protocol_errors);
                    return;
                }
            }
        }
        let Some(slot) = self.admit(client.ip(), tls, &limits).map(Some) else {
            inc(&self.stats.refused_over_limit);
            return;
        };
        inc(&self.stats.accepted);
        if tls {
            let Some(acceptor) = self.tls.clone() else {
                return;
            };
            let stream = match timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_string(),
                    };
                    tracing::debug!(%client, "TLS handshake failed: {why}");
                    inc(&self.stats.handshake_failures);
                    return;
                }
            };
            let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            if alpn.as_deref() == Some(crate::tls::ALPN_ACME) {
                // RFC 8737 §3: the ACME server only looks at the
                // certificate; nothing is routed, and the slot it held under
                // the pre-authentication caps frees as it ends.
                inc(&self.stats.acme_challenges);
                let mut stream = stream;
                let _ = timeout(limits.handshake_timeout, stream.shutdown()).await;
                return;
            }
            let ft = FiveTuple {
                client,
                server: local,
                transport: Transport::Tls,
            };
            self.route(stream, ft, alpn.as_deref(), slot, &limits).await;
        } else {
            let ft = FiveTuple {
                client,
                server: local,
                transport: Transport::Tcp,
            };
            self.route(tcp, ft, None, slot, &limits).await;
        }
    }

    async fn route<S>(
        &self,
        mut stream: S,
        ft: FiveTuple,
        alpn: Option<&[u8]>,
        mut slot: Option<Slot>,
        limits: &StreamLimits,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let is_turn = match alpn {
            Some(crate::tls::ALPN_TURN) => true,
            Some(_) => false,
            None => {
                let mut first = [0u8; 1];
                match timeout(limits.unauth_timeout, stream.read(&mut first)).await {
                    Ok(Ok(1)) => {
                        // A TURN client's first message is STUN: there is no
                        // channel to send ChannelData on yet. (HTTP methods
                        // start with capital letters, which RFC 7983 would
                        // read as ChannelData.)
                        let turn = kind_of_first_byte(first[0]) == Kind::Stun;
                        let prefixed = Prefixed {
                            prefix: first.to_vec(),
                            inner: stream,
                        };
                        return if turn {
                            self.turn(prefixed, ft, slot, limits).await
                        } else {
                            drop(slot.take());
                            self.http(prefixed, ft, limits).await
                        };
                    }
                    Ok(_) => return,
                    Err(_) => {
                        inc(&self.stats.timed_out);
                        return;
                    }
                }
            }
        };
        let prefixed = Prefixed {
            prefix: Vec::new(),
            inner: stream,
        };
        if is_turn {
            self.turn(prefixed, ft, slot, limits).await
        } else {
            drop(slot.take());
            self.http(prefixed, ft, limits).await
        }
    }

    /// HTTP on this connection: always on the TLS port (HTTPS and WSS);
    /// on the TURN TCP port as `turn.tcp_http` says.
    async fn http<S>(&self, stream: S, ft: FiveTuple, limits: &StreamLimits)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let app = match (ft.transport, limits.tcp_http) {
            (Transport::Tls, _) | (_, TcpHttp::Serve) => self.http.clone(),
            (_, TcpHttp::Redirect) => self.redirect.clone(),
            (_, TcpHttp::Off) => return,
        };
        let Some(ticket) = self.gate.admit(ft.client.ip()) else {
            return;
        };
        self.stats.open_http.fetch_add(1, Ordering::Relaxed);
        self.gate.serve(stream, ft.client, app, ticket).await;
        self.stats.open_http.fetch_sub(1, Ordering::Relaxed);
    }

    fn shard_for(&self, ft: &FiveTuple) -> Option<&ShardHandle> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ft.hash(&mut h);
        let n = self.shards.len();
        (n > 0).then(|| &self.shards[(h.finish() as usize) % n])
    }

    async fn turn<S>(&self, stream: S, ft: FiveTuple, mut slot: Option<Slot>, limits: &StreamLimits)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(shard) = self.shard_for(&ft).cloned() else {
            return;
        };
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUT_QUEUE);
        let link = Arc::new(StreamLink::default());
        if !shard
            .send(StreamEvent::Open {
                ft,
                tx,
                link: link.clone(),
            })
            .await
        {
            return;
        }
        self.stats.open_turn.fetch_add(1, Ordering::Relaxed);
        let (mut rd, mut wr) = tokio::io::split(stream);
        let writer = async move {
            while let Some(m) = rx.recv().await {
                if wr.write_all(&m).await.is_err() {
                    break;
                }
            }
            // The reader ended, or the shard dropped our queue.
            let _ = wr.shutdown().await;
        };
        let stats = &self.stats;
        let reader = async {
            // Until the shard says this connection holds an allocation, the
            // whole connection has `unauth_timeout` from its start. After
            // that the read deadline is the idle timeout, re-armed by every
            // read; the allocation's own lifetime ends the connection (the
            // shard drops its queue). The shard's word arrives while a read
            // is pending, so the deadline is a timer of its own, never one
            // computed before the read started.
            let mut authed = false;
            let deadline = tokio::time::sleep(limits.unauth_timeout);
            tokio::pin!(deadline);
            let mut buf = BytesMut::with_capacity(4096);
            loop {
                tokio::select! {
                    read = rd.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {
                            if authed {
                                deadline.as_mut().reset(Instant::now() + limits.idle_timeout);
                            }
                        }
                    },
                    _ = link.authed_now.notified(), if !authed => {
                        authed = true;
                        drop(slot.take());
                        deadline.as_mut().reset(Instant::now() + limits.idle_timeout);
                        continue;
                    }
                    _ = &mut deadline => {
                        inc(&stats.timed_out);
                        return;
                    }
                }
                loop {
                    match stream_frame_len(&buf) {
                        Ok(Some(len)) => {
                            let msg = buf.split_to(len).freeze();
                            if !shard.send(StreamEvent::Data { ft, msg }).await {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            inc(&stats.protocol_errors);
                            return;
                        }
                    }
                }
                if buf.capacity() - buf.len() < 2048 {
                    buf.reserve(16 * 1024);
                }
            }
        };
        tokio::select! {
            _ = reader => {}
            _ = writer => {}
            // Cut off for not reading: stop at once, even if a write is
            // stuck on a full socket.
            _ = link.cut.notified() => {}
        }
        shard.send(StreamEvent::Closed { ft }).await;
        self.stats.open_turn.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn read_proxy_header(tcp: &mut TcpStream) -> std::io::Result<Proxied> {
    let mut fixed = [0u8; proxy_protocol::HEADER_LEN];
    tcp.read_exact(&mut fixed).await?;
    let bad =
        |e: proxy_protocol::ProxyError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let total = proxy_protocol::total_len(&fixed).map_err(bad)?;
    let mut h = fixed.to_vec();
    h.resize(total, 0);
    tcp.read_exact(&mut h[proxy_protocol::HEADER_LEN..]).await?;
    proxy_protocol::parse(&h).map_err(bad)
}

/// A stream with bytes already read put back in front.
struct Prefixed<S> {
    prefix: Vec<u8>,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
