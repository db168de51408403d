//! The Lua scripts the backend runs in Redis, one `.lua` file each beside
//! this one (each file's header says what it does, its KEYS and ARGV).
//!
//! Why scripts: a room's members are written only by them, so each step
//! (a join's capacity check and insert, a leave and its announcement) is
//! atomic across nodes. `lib.lua` holds the functions several scripts
//! share; it is prepended to those scripts' text.

use std::sync::LazyLock;

use redis::Script;

macro_rules! with_lib {
    ($file:literal) => {
        concat!(include_str!("lib.lua"), include_str!($file))
    };
}

pub(super) static JOIN: LazyLock<Script> = LazyLock::new(|| Script::new(with_lib!("join.lua")));

pub(super) static LEAVE: LazyLock<Script> = LazyLock::new(|| Script::new(with_lib!("leave.lua")));

pub(super) static ROUTE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("route.lua")));

pub(super) static BROADCAST: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_lib!("broadcast.lua")));

pub(super) static CLAIM: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("claim.lua")));

pub(super) static REFRESH: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_lib!("refresh.lua")));
