//! A `/ws` signaling client for end-to-end tests: JSON messages in and out
//! over tokio-tungstenite, every wait with a deadline.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Deadline for any single expected message.
pub const WAIT: Duration = Duration::from_secs(5);

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

/// The next JSON message, within `d` (pings and pongs skipped).
pub async fn recv_within(ws: &mut Ws, d: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = frame {
            return serde_json::from_str(&t).expect("json");
        }
    }
}

pub async fn recv(ws: &mut Ws) -> Value {
    recv_within(ws, WAIT).await
}

/// Joins `room`; the `joined` message.
pub async fn join(ws: &mut Ws, room: &str) -> Value {
    send(ws, json!({"type": "join", "room": room})).await;
    let m = recv(ws).await;
    assert_eq!(m["type"], "joined", "{m}");
    m
}
