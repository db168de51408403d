//! turnkey-sigload: an open-loop load client for `/ws` signaling.
//!
//! Connects `--peers` WebSocket peers in rooms of two (with `--url2`, the
//! second of each pair on another node), then sends `--rate` signals a
//! second in all, each to the sender's room-mate, on a fixed schedule
//! whatever comes back. Each signal carries its send time; the receiver
//! takes the difference (one machine, one clock). Prints one JSON line:
//! connect time, sent, received, lost, and latency percentiles.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// `ws://HOST:PORT/ws` of the node the first peer of each pair uses.
    #[arg(long)]
    url: String,
    /// Another node for the second peer of each pair (cross-node rooms).
    #[arg(long)]
    url2: Option<String>,
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
}

/// One connected, joined peer: how to send as it, and its room-mate.
struct Peer {
    tx: mpsc::UnboundedSender<String>,
    mate: String,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<()> {
    let a = Args::parse();
    if a.peers < 2 || a.peers % 2 != 0 {
        bail!("--peers must be even and at least 2");
    }
    let t0 = Instant::now();
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let mut peers: Vec<Peer> = Vec::with_capacity(a.peers);
    let mut ids = Vec::with_capacity(a.peers);
    let mut writers = Vec::new();
    let connect_started = Instant::now();
    for i in 0..a.peers {
        let url = match (&a.url2, i % 2) {
            (Some(u2), 1) => u2.clone(),
            _ => a.url.clone(),
        };
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .with_context(|| format!("peer {i}: connect {url}"))?;
        let (mut sink, mut stream) = ws.split();
        sink.send(Message::text(
            serde_json::json!({"type": "join", "room": format!("load{}", i / 2)}).to_string(),
        ))
        .await?;
        // The `joined` answer names this peer; the mate's id comes from
        // `peers` (second of the pair) or `peer-joined` (first).
        let joined: serde_json::Value = loop {
            match stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t)?;
                    if v["type"] == "joined" {
                        break v;
                    }
                    if v["type"] == "error" || v["type"] == "full" {
                        bail!("peer {i}: {v}");
                    }
                }
                Some(Ok(_)) => continue,
                other => bail!("peer {i}: no joined: {other:?}"),
            }
        };
        ids.push(joined["id"].as_str().unwrap_or_default().to_string());
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
                if let Message::Text(t) = frame {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else {
                        continue;
                    };
                    if v["type"] == "signal" {
                        if let Some(sent) = v["data"]["t"].as_u64() {
                            let now = t0.elapsed().as_micros() as u64;
                            if let Ok(mut l) = lat.lock() {
                                l.push(now.saturating_sub(sent));
                            }
                        }
                    }
                }
            }
        });
        peers.push(Peer {
            tx,
            mate: String::new(),
        });
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    for i in 0..a.peers {
        let mate = if i % 2 == 0 { i + 1 } else { i - 1 };
        peers[i].mate = ids[mate].clone();
    }
    // Let the last joins settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let pad = "x".repeat(a.size);
    let interval = Duration::from_secs_f64(1.0 / a.rate.max(1) as f64);
    let total = a.rate * a.secs;
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = start + interval.mul_f64(sent as f64);
        tokio::time::sleep_until(due).await;
        let p = &peers[(sent as usize) % a.peers];
        let msg = serde_json::json!({
            "type": "signal",
            "to": p.mate,
            "data": {"t": t0.elapsed().as_micros() as u64, "pad": pad},
        });
        let _ = p.tx.send(msg.to_string());
        sent += 1;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    let received = l.len() as u64;
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
        })
    );
    drop(peers);
    for w in writers {
        let _ = w.await;
    }
    Ok(())
}
