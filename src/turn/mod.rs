//! STUN/TURN: the sans-IO protocol core. It touches no socket and reads no
//! clock; the shells (`relay.rs` for UDP, `stream.rs` for TCP/TLS) feed it.

pub mod allocation;
pub mod auth;
pub mod events;
pub mod policy;
pub mod ports;
pub mod reply;
pub mod requests;
pub mod revoked;
pub mod server;
pub mod stats;
pub mod wire;
pub mod world;
