//! turnkey: a STUN/TURN relay, WebSocket signaling and a demo video-chat
//! page in one binary.

pub mod app;
pub mod config;
pub mod http;
pub mod metrics;
pub mod probe;
pub mod proxy_protocol;
pub mod relay;
pub mod signal;
pub mod stream;
pub mod tls;
pub mod turn;
