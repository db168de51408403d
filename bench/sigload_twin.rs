//! turnkey-sigload-twin: the same signaling load as `turnkey-sigload`, from
//! a client of another design, so a server's figures do not hang on one
//! client's habits (issue 27).
//!
//! The load is sigload's: `--peers` peers in rooms of two, `--rate`
//! signals a second in all for `--secs` seconds, signal `n` sent by peer
//! `n % peers` to its room-mate at `start + n / rate`, open loop, each
//! carrying its send time; the same flags and the same JSON line out.
//!
//! What differs is everything on the client's side of the wire:
//! - **WebSocket library**: tokio-websockets, not tungstenite.
//! - **Runtime**: tokio's multi-threaded runtime with its default worker
//!   count (one per core), where sigload pins one worker.
//! - **Tasks**: one task per connection owning the whole socket (reads,
//!   writes and its own send timer in one `select!`); sigload has a reader
//!   and a writer task per connection and one sender loop for all.
//! - **Schedule**: each connection sleeps until its own next due time;
//!   sigload's single loop walks the whole schedule and hands each signal
//!   to the sender's writer through a queue.
//! - **Receive path**: every frame is parsed in full into a
//!   `serde_json::Value` and the send time read from `data.ts`; sigload
//!   scans the text for `"t":`.
//! - **Bookkeeping**: each connection keeps its own latencies, collected
//!   when it ends; sigload pushes into one shared vector under a lock.
//! - **Connects**: up to `--connect-parallel` at once; sigload connects
//!   one after another.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_websockets::{ClientBuilder, MaybeTlsStream, Message, WebSocketStream};

#[path = "measure.rs"]
mod measure;
use measure::{cpu_ticks, percentile, rss_kib};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Turnkey,
    Matchbox,
}

#[derive(Parser)]
struct Args {
    /// turnkey: `ws://HOST:PORT/ws`; matchbox: `ws://HOST:PORT`, the room
    /// path is appended.
    #[arg(long)]
    url: String,
    #[arg(long, value_enum, default_value = "turnkey")]
    protocol: Protocol,
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Signals a second, in all.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Bytes of padding in each signal's data.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// The server's process: its CPU ticks over the send phase and its RSS
    /// before connecting and with every peer joined but idle.
    #[arg(long)]
    server_pid: Option<u32>,
    /// How long every peer sits joined and idle before sending starts.
    #[arg(long, default_value_t = 1000)]
    idle_ms: u64,
    /// Most time to wait for the last signals after the send phase.
    #[arg(long, default_value_t = 2000)]
    drain_ms: u64,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    connect_parallel: usize,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a connection needs to start sending: its room-mate's id and the
/// schedule's origin.
struct Go {
    mate: String,
    start: tokio::time::Instant,
}

/// Shared by every connection: the clock signals carry, the load's shape
/// and the counters the main task watches.
struct Load {
    t0: Instant,
    peers: usize,
    total: u64,
    interval: Duration,
    pad: String,
    protocol: Protocol,
    sent: AtomicU64,
    received: AtomicU64,
}

impl Load {
    fn micros(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// Signal `n`'s frame to `mate`, built as a JSON value.
    fn signal(&self, mate: &str) -> String {
        let data = json!({"ts": self.micros(), "pad": self.pad});
        let msg = match self.protocol {
            Protocol::Turnkey => json!({"type": "signal", "to": mate, "data": data}),
            Protocol::Matchbox => json!({"Signal": {"receiver": mate, "data": data}}),
        };
        msg.to_string()
    }

    /// The send time of a received signal, from the frame parsed in full;
    /// `None` for anything else (peer-joined, NewPeer, …).
    fn sent_at(&self, frame: &Value) -> Option<u64> {
        let data = match self.protocol {
            Protocol::Turnkey if frame["type"] == "signal" => &frame["data"],
            Protocol::Matchbox => &frame.get("Signal")?["data"],
            _ => return None,
        };
        data["ts"].as_u64()
    }
}

/// Opens connection `i` and reads its id: turnkey's `joined` after a
/// `join`, matchbox's `IdAssigned`.
async fn connect(a: &Args, i: usize) -> Result<(String, Ws)> {
    let room = format!("twin{}", i / 2);
    let url = match a.protocol {
        Protocol::Turnkey => a.url.clone(),
        Protocol::Matchbox => format!("{}/{room}?next=2", a.url),
    };
    let (mut ws, _) = ClientBuilder::new()
        .uri(&url)
        .with_context(|| format!("bad url {url}"))?
        .connect()
        .await
        .with_context(|| format!("peer {i}: connect {url}"))?;
    if a.protocol == Protocol::Turnkey {
        let join = json!({"type": "join", "room": room}).to_string();
        ws.send(Message::text(join)).await?;
    }
    while let Some(frame) = ws.next().await {
        let frame = frame?;
        let Some(text) = frame.as_text() else {
            continue;
        };
        let v: Value = serde_json::from_str(text)?;
        let id = match a.protocol {
            Protocol::Turnkey if v["type"] == "joined" => &v["id"],
            Protocol::Turnkey if v["type"] == "error" || v["type"] == "full" => {
                bail!("peer {i}: {v}")
            }
            Protocol::Matchbox if v.get("IdAssigned").is_some() => &v["IdAssigned"],
            _ => continue,
        };
        let id = id.as_str().context("id is not a string")?.to_string();
        return Ok((id, ws));
    }
    bail!("peer {i}: closed before its id")
}

/// One connection's life after its id: wait for `go`, then send on its
/// own share of the schedule and time what arrives, until `stop`. Returns
/// its latencies in µs.
async fn run(
    i: usize,
    mut ws: Ws,
    load: Arc<Load>,
    go: oneshot::Receiver<Go>,
    mut stop: watch::Receiver<bool>,
) -> Vec<u64> {
    let mut latencies = Vec::new();
    let on_frame = |frame: Message, latencies: &mut Vec<u64>| {
        let Some(text) = frame.as_text() else { return };
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        if let Some(sent) = load.sent_at(&v) {
            latencies.push(load.micros().saturating_sub(sent));
            load.received.fetch_add(1, Ordering::Relaxed);
        }
    };
    // Until `go`, only read (matchbox announces the room-mate, turnkey its
    // arrival).
    tokio::pin!(go);
    let Go { mate, start } = loop {
        tokio::select! {
            g = &mut go => match g {
                Ok(g) => break g,
                Err(_) => return latencies,
            },
            frame = ws.next() => match frame {
                Some(Ok(f)) => on_frame(f, &mut latencies),
                _ => return latencies,
            },
        }
    };
    // Signals i, i + peers, i + 2·peers, … are this connection's.
    let mut next = i as u64;
    let due = |n: u64| start + load.interval.mul_f64(n as f64);
    let timer = tokio::time::sleep_until(due(next));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            () = &mut timer, if next < load.total => {
                if ws.send(Message::text(load.signal(&mate))).await.is_err() {
                    break;
                }
                load.sent.fetch_add(1, Ordering::Relaxed);
                next += load.peers as u64;
                timer.as_mut().reset(due(next));
            }
            frame = ws.next() => match frame {
                Some(Ok(f)) => on_frame(f, &mut latencies),
                _ => break,
            },
            _ = stop.changed() => break,
        }
    }
    let _ = ws.close().await;
    latencies
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Arc::new(Args::parse());
    if a.peers < 2 || a.peers % 2 != 0 {
        bail!("--peers must be even and at least 2");
    }
    let load = Arc::new(Load {
        t0: Instant::now(),
        peers: a.peers,
        total: a.rate * a.secs,
        interval: Duration::from_secs_f64(1.0 / a.rate.max(1) as f64),
        pad: "x".repeat(a.size),
        protocol: a.protocol,
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
    });
    let rss_empty = a.server_pid.and_then(rss_kib);
    let (stop_tx, stop_rx) = watch::channel(false);

    // Connect everyone, a bounded number at a time; each connection hands
    // back its id and waits for its `Go`.
    let connect_started = Instant::now();
    let gate = Arc::new(Semaphore::new(a.connect_parallel.max(1)));
    let mut joined = Vec::with_capacity(a.peers);
    for i in 0..a.peers {
        let (a, load, gate, stop) = (a.clone(), load.clone(), gate.clone(), stop_rx.clone());
        let (id_tx, id_rx) = oneshot::channel::<Result<String>>();
        let (go_tx, go_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let (id, ws) = match connect(&a, i).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = id_tx.send(Err(e));
                    return Vec::new();
                }
            };
            drop(permit);
            let _ = id_tx.send(Ok(id));
            run(i, ws, load, go_rx, stop).await
        });
        joined.push((id_rx, go_tx, task));
    }
    let mut ids = Vec::with_capacity(a.peers);
    for (id_rx, _, _) in &mut joined {
        ids.push(id_rx.await.context("a connection task ended")??);
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(a.idle_ms)).await;
    let rss_idle = a.server_pid.and_then(rss_kib);

    let ticks_before = a.server_pid.and_then(cpu_ticks);
    // The schedule starts a little later, so every connection has its
    // `Go` before its first due time.
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(a.peers);
    for (i, (_, go_tx, task)) in joined.into_iter().enumerate() {
        let _ = go_tx.send(Go {
            mate: ids[i ^ 1].clone(),
            start,
        });
        tasks.push(task);
    }
    let send_end = start + load.interval.mul_f64(load.total as f64);
    tokio::time::sleep_until(send_end).await;
    let drain_until = tokio::time::Instant::now() + Duration::from_millis(a.drain_ms);
    while tokio::time::Instant::now() < drain_until
        && (load.sent.load(Ordering::Relaxed) < load.total
            || load.received.load(Ordering::Relaxed) < load.sent.load(Ordering::Relaxed))
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ticks = match (ticks_before, a.server_pid.and_then(cpu_ticks)) {
        (Some(b), Some(e)) => Some(e.saturating_sub(b)),
        _ => None,
    };
    let _ = stop_tx.send(true);
    let mut l = Vec::with_capacity(load.total as usize);
    for t in tasks {
        l.extend(t.await.unwrap_or_default());
    }
    l.sort_unstable();
    let sent = load.sent.load(Ordering::Relaxed);
    let received = l.len() as u64;
    let per_peer = match (rss_empty, rss_idle) {
        (Some(e), Some(i)) => Some(i.saturating_sub(e) as f64 / a.peers as f64),
        _ => None,
    };
    println!(
        "{}",
        json!({
            "client": "twin",
            "peers": a.peers,
            "connect_secs": connect_secs,
            "sent": sent,
            "received": received,
            "lost": sent.saturating_sub(received),
            "p50_ms": percentile(&l, 0.50),
            "p99_ms": percentile(&l, 0.99),
            "p999_ms": percentile(&l, 0.999),
            "max_ms": percentile(&l, 1.0),
            "server_cpu_ticks": ticks,
            "ticks_per_10k": ticks.map(|t| t as f64 * 10_000.0 / received.max(1) as f64),
            "rss_empty_kib": rss_empty,
            "rss_idle_kib": rss_idle,
            "rss_per_peer_kib": per_peer,
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(protocol: Protocol) -> Load {
        Load {
            t0: Instant::now(),
            peers: 2,
            total: 2,
            interval: Duration::from_millis(1),
            pad: "xx".into(),
            protocol,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    #[test]
    fn reads_the_send_time_of_signals_only() {
        let t = load(Protocol::Turnkey);
        let frame = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert_eq!(
            t.sent_at(&frame(
                r#"{"type":"signal","from":"00000000000000ff","data":{"pad":"xx","ts":1234}}"#
            )),
            Some(1234)
        );
        assert_eq!(
            t.sent_at(&frame(r#"{"type":"peer-joined","id":"00000000000000ff"}"#)),
            None
        );
        let m = load(Protocol::Matchbox);
        assert_eq!(
            m.sent_at(&frame(r#"{"Signal":{"sender":"6f1c","data":{"ts":99}}}"#)),
            Some(99)
        );
        assert_eq!(m.sent_at(&frame(r#"{"NewPeer":"6f1c"}"#)), None);
    }

    #[test]
    fn builds_each_protocols_signal() {
        let t: Value = serde_json::from_str(&load(Protocol::Turnkey).signal("ab")).unwrap();
        assert_eq!(
            (&t["type"], &t["to"], &t["data"]["pad"]),
            (&json!("signal"), &json!("ab"), &json!("xx"))
        );
        let m: Value = serde_json::from_str(&load(Protocol::Matchbox).signal("ab")).unwrap();
        assert_eq!(m["Signal"]["receiver"], "ab");
        assert!(m["Signal"]["data"]["ts"].is_u64());
    }
}
