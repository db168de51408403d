//! The axum shell around the registry: `GET /ws` upgrades, and each
//! connection gets a reader loop (this task) and a writer task fed by a
//! bounded queue. All decisions live in `protocol`, `rooms` and `timers`;
//! this file only moves frames and fires timers.
//!
//! Why a separate writer: a peer that stops reading eventually blocks the
//! socket write, and that must never stall the reader loop (heartbeats,
//! kicks) or, worse, whoever is sending to that peer. Senders only
//! `try_send` into the queue; a full queue marks the peer as a slow
//! consumer and it is dropped.
//!
//! Message size: the transport accepts frames up to
//! [`protocol::transport_limit`], a
//! bit above `max_message_bytes`, so a message slightly over the cap gets a
//! polite `too-large` error and the connection lives on. Beyond the
//! transport limit the WebSocket library refuses the frame before reading
//! it, the connection is closed without a JSON answer (browsers report
//! 1006) and the room sees `peer-left`.
//!
//! Goodbyes: a client that closes its socket (a close frame) has left. A
//! socket that fails, ends without a close frame or goes silent past the
//! pong timeout was *lost*: a joined peer is then kept for a `resume`
//! (`peers.rs`), and its room-mates hear nothing unless the window passes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::budget::Gcra;
use crate::caller::Caller;
use crate::counter::inc;

use super::peers::{Kick, Outgoing, PeerHandle, Wire, OUTGOING_QUEUE};
use super::protocol::{self, ClientMessage, ErrorCode, ParseError, ServerMessage};
use super::rooms::{Delivery, RoomError};
use super::sessions::{Newcomer, ResumeRefused, Resumed};
use super::timers::{self, Beat, Heartbeat};
use super::{PeerId, RoomName, SignalConfig, Signaling};

/// Per-connection read and write buffers. axum's default is 128 KiB each,
/// which is 256 MiB for 1000 idle peers; signaling messages are small, and
/// the read buffer still grows on demand for a large message.
const SOCKET_BUFFER: usize = 4 * 1024;
/// How long a server-initiated close may take to flush before we give up.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// `GET /ws` and nothing else; the caller merges it into the app router.
pub fn router(sig: Arc<Signaling>) -> Router {
    Router::new().route("/ws", get(upgrade)).with_state(sig)
}

async fn upgrade(
    State(sig): State<Arc<Signaling>>,
    caller: Caller,
    ws: WebSocketUpgrade,
) -> Response {
    let entry = match sig.enter(&caller) {
        Ok(e) => e,
        Err(refused) => return refused.into_response(),
    };
    let cfg = sig.config();
    let host = caller
        .host
        .as_deref()
        .and_then(crate::ice::host_of)
        .map(str::to_string);
    let limit = protocol::transport_limit(cfg.max_message_bytes);
    ws.read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| serve(sig, socket, host, cfg, entry))
}

/// Why a connection's reader loop ended.
enum End {
    /// The client closed the socket; nothing more can be sent.
    Gone,
    /// The socket failed, ended without a close frame, or went silent:
    /// the peer may come back with its resume token.
    Lost,
    /// Heartbeat timeout or slow consumer: drop without ceremony.
    Dropped,
    /// We close: send a close frame, then stop.
    Close(u16, &'static str),
}

/// One connection's state as seen by its reader loop. Dropping it takes the
/// peer out of its room (announcing `peer-left`) — also when the task is
/// cancelled, so no path leaves a ghost member behind — or, for a lost
/// socket, parks it for a resume.
struct Conn {
    sig: Arc<Signaling>,
    id: PeerId,
    host: Option<String>,
    cfg: SignalConfig,
    tx: mpsc::Sender<Outgoing>,
    kick: Arc<Kick>,
    heartbeat: Heartbeat,
    refresh_at: Option<Instant>,
    /// Set while the socket is in no room: it must join before then.
    join_by: Option<Instant>,
    /// What this socket may send: messages, bytes.
    budget: [Gcra; 2],
    entry: super::Entry,
    /// No message read yet: only now may the socket `resume`.
    fresh: bool,
    /// The client sent a close frame.
    said_goodbye: bool,
    /// The reader loop ended with [`End::Lost`].
    lost: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.lost {
            self.sig.lose(self.id, &self.kick);
        } else {
            self.sig.unregister(self.id, &self.kick);
        }
        tracing::debug!(peer = %self.id, lost = self.lost, "signaling connection closed");
    }
}

async fn serve(
    sig: Arc<Signaling>,
    socket: WebSocket,
    host: Option<String>,
    cfg: SignalConfig,
    entry: super::Entry,
) {
    let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
    let kick = Arc::new(Kick::default());
    let id = sig.register(PeerHandle {
        tx: tx.clone(),
        kick: kick.clone(),
        wire: Wire::Json,
    });
    tracing::debug!(peer = %id, host = host.as_deref(), "signaling connection opened");
    let shutdown = sig.stop.clone();
    let now = Instant::now();
    let mut conn = Conn {
        sig,
        id,
        host,
        cfg,
        tx,
        kick,
        heartbeat: Heartbeat::new(now.into_std(), cfg.ping_interval, cfg.pong_timeout),
        refresh_at: None,
        join_by: Some(now + cfg.join_timeout),
        budget: [Gcra::new(); 2],
        entry,
        fresh: true,
        said_goodbye: false,
        lost: false,
    };

    let (sink, stream) = socket.split();
    let writer = tokio::spawn(write_loop(sink, rx));
    let end = conn.read_loop(stream, shutdown).await;
    if let End::Close(code, reason) = end {
        let _ = conn.tx.try_send(Outgoing::Close(code, reason));
    }
    conn.lost = matches!(end, End::Lost);
    // Unregister first so the room hears `peer-left` without waiting for
    // the close handshake; this also drops the last queue senders, so the
    // writer ends after flushing what is queued.
    drop(conn);
    match end {
        End::Close(..) => {
            let abort = writer.abort_handle();
            if tokio::time::timeout(CLOSE_GRACE, writer).await.is_err() {
                abort.abort();
            }
        }
        End::Gone | End::Lost | End::Dropped => writer.abort(),
    }
}

impl Conn {
    async fn read_loop(
        &mut self,
        mut stream: SplitStream<WebSocket>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> End {
        // The kick, shutdown and timer futures live across iterations: made
        // anew per message, each `Notified` took a lock on drop (4 % of
        // the server's samples in issue 13's profile).
        let kick = self.kick.clone();
        let kicked = kick.notify.notified();
        let closing = shutdown.cancelled();
        tokio::pin!(kicked, closing);
        let timer = tokio::time::sleep_until(self.next_wakeup());
        tokio::pin!(timer);
        let mut fired = false;
        loop {
            // Each message moves the heartbeat deadline later; a timer left
            // early only wakes once for nothing, so it is re-armed when due
            // sooner or after it fired, not per message.
            let next = self.next_wakeup();
            if fired || next < timer.deadline() {
                timer.as_mut().reset(next);
                fired = false;
            }
            tokio::select! {
                frame = stream.next() => {
                    let frame = match frame {
                        Some(Ok(frame)) => frame,
                        Some(Err(e)) => {
                            tracing::debug!(peer = %self.id, error = %e, "signaling socket failed");
                            return if network_failure(e) { self.ended() } else { End::Gone };
                        }
                        None => return self.ended(),
                    };
                    self.heartbeat.heard(Instant::now().into_std());
                    match frame {
                        Message::Text(text) => self.on_text(&text).await,
                        Message::Binary(_) => self.reply(ParseError::Binary.reply()),
                        // Pings are answered by the library, and a close is
                        // acknowledged on the next read, which then ends.
                        Message::Ping(_) | Message::Pong(_) => {}
                        Message::Close(_) => self.said_goodbye = true,
                    }
                }
                () = &mut timer => {
                    fired = true;
                    if let Some(end) = self.on_timer() {
                        return end;
                    }
                }
                () = &mut kicked => {
                    tracing::info!(peer = %self.id, "dropping a signaling peer that stopped reading");
                    return End::Dropped;
                }
                () = &mut closing => return End::Close(1001, "server shutting down"),
            }
        }
    }

    fn ended(&self) -> End {
        if self.said_goodbye {
            End::Gone
        } else {
            End::Lost
        }
    }

    fn next_wakeup(&self) -> Instant {
        let beat = Instant::from_std(self.heartbeat.next_deadline());
        [self.refresh_at, self.join_by]
            .into_iter()
            .flatten()
            .fold(beat, Instant::min)
    }

    fn on_timer(&mut self) -> Option<End> {
        let now = Instant::now();
        if self.join_by.is_some_and(|at| at <= now) {
            inc(&self.sig.stats.join_timeouts_total);
            return Some(End::Close(1008, "join a room first"));
        }
        if self.refresh_at.is_some_and(|at| at <= now) {
            self.refresh_ice(now);
        }
        match self.heartbeat.poll(now.into_std()) {
            Beat::Nothing => None,
            Beat::Ping => {
                self.sig.push(&self.tx, &self.kick, Outgoing::Ping);
                None
            }
            Beat::Dead => {
                inc(&self.sig.stats.heartbeat_drops_total);
                tracing::debug!(peer = %self.id, "signaling peer silent past the pong timeout");
                Some(End::Lost)
            }
        }
    }

    async fn on_text(&mut self, text: &str) {
        // A sender over its budget loses its own messages, nothing else:
        // its room-mates' queues never see the flood.
        let now = Instant::now().into_std();
        let (messages, bytes) = self.cfg.send_rates();
        if !self.budget[0].take(messages, now, 1)
            || !self.budget[1].take(bytes, now, text.len() as u64)
        {
            inc(&self.sig.stats.rate_limited_total);
            return self.reply(ServerMessage::error(
                ErrorCode::RateLimited,
                "too many messages or bytes; slow down",
            ));
        }
        let msg = match protocol::parse_client(text, self.cfg.max_message_bytes) {
            Ok(msg) => msg,
            Err(e) => return self.reply(e.reply()),
        };
        let id = self.id;
        let fresh = std::mem::replace(&mut self.fresh, false);
        let outcome = match msg {
            ClientMessage::Resume { token } => self.resume(fresh, &token).await,
            ClientMessage::Join { room } => self.join(room).await,
            ClientMessage::Signal { to, data } => self.sig.route(id, to, data).await,
            ClientMessage::Leave => {
                let left = self.sig.leave(id).await;
                if left.is_ok() {
                    self.refresh_at = None;
                    self.join_by = Some(Instant::now() + self.cfg.join_timeout);
                }
                left
            }
        };
        match outcome {
            Ok(deliveries) => self.sig.deliver(deliveries),
            Err(e) => self.reply(e.reply()),
        }
    }

    async fn join(&mut self, room: RoomName) -> Result<Vec<Delivery>, RoomError> {
        let (out, ttl) = self
            .sig
            .join_as(self.id, &self.entry, self.host.as_deref(), room)
            .await?;
        self.refresh_at = timers::refresh_after(ttl).map(|after| Instant::now() + after);
        self.join_by = None;
        let mut out = out;
        self.sig.grant_resume(self.id, &mut out);
        Ok(out)
    }

    /// Takes over a lost session; `resumed` and what it missed are queued
    /// by the registry of peers, so there is nothing to deliver here.
    async fn resume(&mut self, fresh: bool, token: &str) -> Result<Vec<Delivery>, RoomError> {
        let taken = if fresh {
            let who = Newcomer {
                conn: self.id,
                kick: &self.kick,
                host: self.host.as_deref(),
                admission: &self.entry.admission,
            };
            self.sig.resume(who, token).await
        } else {
            Err(ResumeRefused)
        };
        match taken {
            Ok(Resumed { id, ttl }) => {
                tracing::debug!(peer = %id, "signaling session resumed");
                self.id = id;
                self.refresh_at = timers::refresh_after(ttl).map(|after| Instant::now() + after);
                self.join_by = None;
            }
            Err(e) => self.reply(ServerMessage::error(
                ErrorCode::ResumeRefused,
                e.to_string(),
            )),
        }
        Ok(Vec::new())
    }

    fn refresh_ice(&mut self, now: Instant) {
        let (servers, ttl) = (self.sig.ice)(self.host.as_deref(), &self.entry.admission);
        self.refresh_at = timers::refresh_after(ttl).map(|after| now + after);
        self.reply(ServerMessage::IceServers {
            ice_servers: servers,
            ttl: ttl.as_secs(),
        });
    }

    fn reply(&self, msg: ServerMessage) {
        self.sig.deliver(vec![Delivery {
            to: vec![self.id],
            msg,
        }]);
    }
}

/// Whether a read failed because the network did (a reset, an end
/// without a close frame), not because the client broke the protocol (a
/// frame over the size limit, bad framing): only the former may resume.
fn network_failure(e: axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
    match e.into_inner().downcast::<Error>() {
        Ok(e) => matches!(
            *e,
            Error::Io(_) | Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)
        ),
        Err(_) => false,
    }
}

/// Drains the queue into the socket, flushing whenever the queue runs dry
/// so bursts go out in one write.
async fn write_loop(mut sink: SplitSink<WebSocket, Message>, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let frame = match out {
            Outgoing::Text(text) => Message::Text(text),
            Outgoing::Replay(missed) => {
                for text in missed {
                    if sink.feed(Message::Text(text)).await.is_err() {
                        return;
                    }
                }
                if rx.is_empty() && sink.flush().await.is_err() {
                    return;
                }
                continue;
            }
            // Never queued for a `/ws` peer (its handle says `Wire::Json`).
            Outgoing::Message(_) => continue,
            Outgoing::Ping => Message::Ping(Default::default()),
            Outgoing::Close(code, reason) => {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    })))
                    .await;
                return;
            }
        };
        if sink.feed(frame).await.is_err() {
            return;
        }
        if rx.is_empty() && sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.flush().await;
}
