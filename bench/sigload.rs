//! turnkey-sigload: an open-loop load client for WebRTC signaling servers.
//!
//! Connects `--peers` WebSocket peers in rooms of two, then sends `--rate`
//! signals a second in all, each to the sender's room-mate, on a fixed
//! schedule whatever comes back. Each signal carries its send time; the
//! receiver takes the difference (one machine, one clock). Prints one JSON
//! line: connect time, sent, received, lost, latency percentiles and, with
//! `--server-pid`, the server's CPU ticks over the send phase and its RSS
//! per idle peer.
//!
//! Two protocols, so servers can be compared under the very same schedule:
//! - `turnkey` (`/ws`): connect to `--url`, send `join`, read `joined`;
//!   with `--url2` the second peer of each pair uses another node.
//! - `matchbox` (matchbox_server): connect to `--url` + `/<room>?next=2`,
//!   read `IdAssigned`; the server pairs the two peers of a room, and
//!   signals are `{"Signal":{"receiver":…,"data":…}}`.
//!
//! The receive path reads only the send time out of each frame (a scan for
//! `"t":`, the same for both protocols), so the client's own cost per
//! message is small and equal whichever server it measures.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

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
    /// turnkey: `ws://HOST:PORT/ws` of the node the first peer of each pair
    /// uses; matchbox: `ws://HOST:PORT`, the room path is appended.
    #[arg(long)]
    url: String,
    /// Another node for the second peer of each pair (turnkey only).
    #[arg(long)]
    url2: Option<String>,
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
    /// The server's process: sample its CPU ticks over the send phase and
    /// its RSS before connecting and with every peer joined but idle.
    #[arg(long)]
    server_pid: Option<u32>,
    /// How long every peer sits joined and idle before sending starts.
    #[arg(long, default_value_t = 1000)]
    idle_ms: u64,
    /// Most time to wait for the last signals after the send phase.
    #[arg(long, default_value_t = 2000)]
    drain_ms: u64,
}

/// One connected, joined peer: how to send as it, and its id.
struct Peer {
    tx: mpsc::UnboundedSender<String>,
    id: String,
}

/// The send time in a received signal, found without parsing the frame:
/// the first `"t":` followed by digits.
fn sent_at(text: &str) -> Option<u64> {
    let at = text.find("\"t\":")? + 4;
    let digits = text.get(at..)?.trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits.get(..end)?.parse().ok()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type Sink = futures_util::stream::SplitSink<Ws, Message>;
type Stream = futures_util::stream::SplitStream<Ws>;

/// Connects peer `i` and returns its id, with its socket's two halves.
async fn connect(a: &Args, i: usize) -> Result<(String, Sink, Stream)> {
    let url = match (a.protocol, &a.url2, i % 2) {
        (Protocol::Turnkey, Some(u2), 1) => u2.clone(),
        (Protocol::Turnkey, _, _) => a.url.clone(),
        (Protocol::Matchbox, _, _) => format!("{}/load{}?next=2", a.url, i / 2),
    };
    let (ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .with_context(|| format!("peer {i}: connect {url}"))?;
    let (mut sink, mut stream) = ws.split();
    if a.protocol == Protocol::Turnkey {
        sink.send(Message::text(
            serde_json::json!({"type": "join", "room": format!("load{}", i / 2)}).to_string(),
        ))
        .await?;
    }
    // turnkey: `joined` names this peer; matchbox: `IdAssigned` does.
    loop {
        let v: serde_json::Value = match stream.next().await {
            Some(Ok(Message::Text(t))) => serde_json::from_str(&t)?,
            Some(Ok(_)) => continue,
            other => bail!("peer {i}: no id: {other:?}"),
        };
        let id = match a.protocol {
            Protocol::Turnkey if v["type"] == "joined" => &v["id"],
            Protocol::Turnkey if v["type"] == "error" || v["type"] == "full" => {
                bail!("peer {i}: {v}")
            }
            Protocol::Matchbox if v.get("IdAssigned").is_some() => &v["IdAssigned"],
            _ => continue,
        };
        let id = id.as_str().unwrap_or_default().to_string();
        return Ok((id, sink, stream));
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<()> {
    let a = Args::parse();
    if a.peers < 2 || a.peers % 2 != 0 {
        bail!("--peers must be even and at least 2");
    }
    let t0 = Instant::now();
    let rss_empty = a.server_pid.and_then(rss_kib);
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let mut peers: Vec<Peer> = Vec::with_capacity(a.peers);
    let mut writers = Vec::new();
    let connect_started = Instant::now();
    for i in 0..a.peers {
        let (id, mut sink, mut stream) = connect(&a, i).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        writers.push(tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if sink.send(Message::text(m)).await.is_err() {
                    return;
                }
            }
        }));
        let lat = latencies.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                let Message::Text(t) = frame else { continue };
                if let Some(sent) = sent_at(&t) {
                    let now = t0.elapsed().as_micros() as u64;
                    if let Ok(mut l) = lat.lock() {
                        l.push(now.saturating_sub(sent));
                    }
                }
            }
        });
        peers.push(Peer { tx, id });
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let mates: Vec<String> = (0..a.peers).map(|i| peers[i ^ 1].id.clone()).collect();
    // Every peer joined and idle: the server's memory per peer.
    tokio::time::sleep(Duration::from_millis(a.idle_ms)).await;
    let rss_idle = a.server_pid.and_then(rss_kib);

    let pad = "x".repeat(a.size);
    let interval = Duration::from_secs_f64(1.0 / a.rate.max(1) as f64);
    let total = a.rate * a.secs;
    let ticks_before = a.server_pid.and_then(cpu_ticks);
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = start + interval.mul_f64(sent as f64);
        tokio::time::sleep_until(due).await;
        let i = (sent as usize) % a.peers;
        let data = serde_json::json!({"t": t0.elapsed().as_micros() as u64, "pad": pad});
        let msg = match a.protocol {
            Protocol::Turnkey => {
                serde_json::json!({"type": "signal", "to": mates[i], "data": data})
            }
            Protocol::Matchbox => {
                serde_json::json!({"Signal": {"receiver": mates[i], "data": data}})
            }
        };
        let _ = peers[i].tx.send(msg.to_string());
        sent += 1;
    }
    let drain_until = tokio::time::Instant::now() + Duration::from_millis(a.drain_ms);
    while tokio::time::Instant::now() < drain_until
        && latencies.lock().map(|l| l.len() as u64).unwrap_or(0) < sent
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ticks = match (ticks_before, a.server_pid.and_then(cpu_ticks)) {
        (Some(b), Some(e)) => Some(e.saturating_sub(b)),
        _ => None,
    };
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    let received = l.len() as u64;
    let per_peer = match (rss_empty, rss_idle) {
        (Some(e), Some(i)) => Some(i.saturating_sub(e) as f64 / a.peers as f64),
        _ => None,
    };
    println!(
        "{}",
        serde_json::json!({
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
    drop(peers);
    for w in writers {
        let _ = w.await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_send_time_in_either_protocol() {
        let turnkey = r#"{"type":"signal","from":"00000000000000ff","data":{"pad":"xx","t":1234}}"#;
        let matchbox = r#"{"Signal":{"sender":"6f1c","data":{"t": 99,"pad":"x"}}}"#;
        assert_eq!(sent_at(turnkey), Some(1234));
        assert_eq!(sent_at(matchbox), Some(99));
        assert_eq!(sent_at(r#"{"NewPeer":"6f1c"}"#), None);
        assert_eq!(sent_at(r#"{"t":"x"}"#), None);
    }
}
