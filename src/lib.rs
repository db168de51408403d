//! turnkey: a STUN/TURN relay, WebSocket signaling and a demo video-chat
//! page in one binary.

pub mod config;
pub mod turn;
