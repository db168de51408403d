//! turnkey: a STUN/TURN relay, WebSocket signaling and a demo video-chat
//! page in one binary.

pub mod access;
pub mod acme;
pub mod admin;
pub mod app;
pub mod budget;
pub mod caller;
pub mod config;
pub mod control;
pub mod counter;
pub mod http;
pub mod ice;
pub mod lifecycle;
pub mod metrics;
pub mod probe;
pub mod proxy_protocol;
pub mod public;
pub mod relay;
pub mod reload;
pub mod revocation;
pub mod signal;
pub mod stream;
pub mod tls;
pub mod turn;
pub mod usage;
pub mod usage_budgets;
pub mod webhooks;
