//! STUN/TURN: the sans-IO protocol core and its UDP shell.

pub mod allocation;
pub mod auth;
pub mod control;
pub mod policy;
pub mod ports;
pub mod reply;
pub mod server;
pub mod stats;
pub mod wire;
