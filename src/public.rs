//! HTTP on the public listeners (`http.listen`, the TLS port, and the TURN
//! TCP port when it serves HTTP), with the limits that keep a flood cheap:
//! open connections per client address (IPv6 per /64) and in total, a
//! deadline for a request's headers (slowloris), and an idle timeout for a
//! connection that says nothing (also once upgraded to a WebSocket, whose
//! pings keep a live one busy). Each request carries the client address
//! as axum's `ConnectInfo`, for the access rules and per-address budgets.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::ConnectInfo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::budget::{Occupancy, Slot};
use crate::counter::inc;

/// The public listeners' limits; swapped by reload, read per connection.
#[derive(Debug, Clone)]
pub struct PublicLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub per_ip: usize,
    pub total: usize,
    /// Reverse proxies whose `X-Forwarded-For` / `X-Forwarded-Host` are
    /// believed; from anyone else those headers are dropped.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Counters for the public listeners.
#[derive(Default)]
pub struct PublicStats {
    pub open: AtomicU64,
    pub refused_over_limit: AtomicU64,
    pub header_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
}

/// Open HTTP connections, per client address key and in total, across all
/// public listeners.
pub struct Gate {
    places: Arc<Occupancy>,
    limits: Arc<ArcSwap<PublicLimits>>,
    pub stats: Arc<PublicStats>,
}

/// A connection's place under the caps, given back when dropped.
pub struct Ticket {
    _slot: Slot,
    stats: Arc<PublicStats>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gate {
    pub fn new(limits: Arc<ArcSwap<PublicLimits>>, stats: Arc<PublicStats>) -> Arc<Gate> {
        Arc::new(Gate {
            places: Occupancy::new(),
            limits,
            stats,
        })
    }

    /// A place for a connection from `ip`, if the caps allow one.
    pub fn admit(&self, ip: IpAddr) -> Option<Ticket> {
        let limits = self.limits.load();
        let Ok(slot) = self.places.take(ip, limits.per_ip, limits.total) else {
            inc(&self.stats.refused_over_limit);
            return None;
        };
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        Some(Ticket {
            _slot: slot,
            stats: self.stats.clone(),
        })
    }

    /// Serves HTTP (and upgrades) on one admitted connection.
    pub async fn serve<S>(&self, io: S, client: SocketAddr, app: axum::Router, _ticket: Ticket)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
        let limits = self.limits.load_full();
        let io = Idle::new(io, limits.idle_timeout, self.stats.clone());
        let trusted = limits
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&client.ip()));
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let client = forwarded(req.headers_mut(), client, trusted);
                req.extensions_mut().insert(ConnectInfo(client));
                app.clone().oneshot(req)
            });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let served = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .await;
        if let Err(e) = served {
            if e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
            {
                inc(&self.stats.header_timeouts);
            }
        }
    }
}

/// The client a request is from, and the `Host` it asked for: behind a
/// trusted reverse proxy, what its `X-Forwarded-For` (the address the proxy
/// saw, the last one it appended) and `X-Forwarded-Host` say; from anyone
/// else, the connection's own address, and the forwarding headers are
/// removed so no handler can be fooled by them.
fn forwarded(headers: &mut axum::http::HeaderMap, peer: SocketAddr, trusted: bool) -> SocketAddr {
    use axum::http::header::{HeaderName, HOST};
    let xff = HeaderName::from_static("x-forwarded-for");
    let xfh = HeaderName::from_static("x-forwarded-host");
    if !trusted {
        headers.remove(&xff);
        headers.remove(&xfh);
        return peer;
    }
    if let Some(host) = headers.remove(&xfh) {
        headers.insert(HOST, host);
    }
    headers
        .get(&xff)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|ip| ip.trim().parse::<IpAddr>().ok())
        .map_or(peer, |ip| SocketAddr::new(ip, 0))
}

/// Accepts on a plain HTTP listener until stop; each connection is a task
/// of `tasks` that ends at stop too.
pub async fn serve_listener(
    gate: Arc<Gate>,
    listener: TcpListener,
    app: axum::Router,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        let Ok((tcp, client)) = accepted else {
            // EMFILE and friends: back off briefly instead of spinning.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Some(ticket) = gate.admit(client.ip()) else {
            continue;
        };
        // Signaling messages are small; Nagle would hold them back.
        let _ = tcp.set_nodelay(true);
        let (gate, app, stop) = (gate.clone(), app.clone(), stop.clone());
        tasks.spawn(async move {
            tokio::select! {
                () = gate.serve(tcp, client, app, ticket) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// A stream that fails with `TimedOut` once nothing has been read or
/// written for `limit`.
struct Idle<S> {
    inner: S,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
    stats: Arc<PublicStats>,
}

impl<S> Idle<S> {
    fn new(inner: S, limit: Duration, stats: Arc<PublicStats>) -> Self {
        Idle {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
            stats,
        }
    }

    fn touch(&mut self) {
        let next = Instant::now() + self.limit;
        // Resetting a timer costs a little; once a second is plenty.
        if next.saturating_duration_since(self.deadline.deadline()) > Duration::from_secs(1) {
            self.deadline.as_mut().reset(next);
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.deadline.as_mut().poll(cx).is_ready() {
            inc(&self.stats.idle_timeouts);
            return true;
        }
        false
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "idle connection")
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, b) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
