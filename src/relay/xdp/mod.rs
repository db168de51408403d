//! The opt-in kernel fast path (`turn.xdp`): ChannelData relayed by an
//! XDP program (`bpf/turnkey_xdp.c`) in the driver, as a cache of what the
//! TURN core has already decided.
//!
//! - `maps.rs`: the program's maps as Rust types, and the `bpf(2)` calls.
//! - `cache.rs`: which channel bindings belong in the fast path, decided
//!   from the core's events and the sweep's byte counts (plain data).
//! - `shard.rs`: a shard's side: writes its allocations' entries from the
//!   cache's orders, folds the entries' counters back into the core.
//! - this file: loading the embedded object and attaching it (aya); the
//!   attachment is a `bpf_link` owned by the process, so the program
//!   goes when turnkey does, even on SIGKILL.
//!
//! Built with the `xdp` cargo feature (on by default); without it, or when
//! the kernel or driver refuses, `turn.xdp` logs why and the user-space
//! path relays everything, as with `turn.xdp = "off"`.

pub mod cache;
pub mod maps;
#[cfg(feature = "xdp")]
pub mod shard;

#[cfg(feature = "xdp")]
pub use loader::*;

use std::net::IpAddr;
#[cfg(not(feature = "xdp"))]
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::TurnConfig;
pub use crate::config::XdpMode;
use crate::turn::stats::TurnStats;

/// The attached program, kept by the relay for as long as it runs.
#[cfg(feature = "xdp")]
pub type FastPath = Loaded;

#[cfg(not(feature = "xdp"))]
pub struct FastPath;

#[cfg(not(feature = "xdp"))]
impl FastPath {
    pub fn set_listen(&self, _: &[SocketAddr]) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(not(feature = "xdp"))]
pub mod shard {
    //! Without the `xdp` feature there is no fast path to follow.
    pub struct XdpShard;
    impl XdpShard {
        pub fn on_event(&mut self, _: &mut crate::turn::events::Event) {}
        pub fn sweep(&mut self, _: std::time::Instant, _: &mut crate::turn::server::Server) {}
    }
}

/// The fast path `turn.xdp` asks for, loaded and attached to
/// `turn.xdp_interface`, and one writer per shard (`stats` has one entry
/// per shard). `None` and no writers when it is off; when it is on but
/// cannot be had, a warning says why and the user-space path relays all.
pub fn start(
    t: &TurnConfig,
    own: Vec<IpAddr>,
    relay_bind: [Option<IpAddr>; 2],
    stats: &[Arc<TurnStats>],
) -> (Option<FastPath>, Vec<Option<shard::XdpShard>>) {
    let none = || stats.iter().map(|_| None).collect();
    if t.xdp == XdpMode::Off {
        return (None, none());
    }
    #[cfg(not(feature = "xdp"))]
    {
        let _ = (own, relay_bind);
        tracing::warn!(
            "turn.xdp = {:?}, but this build has no xdp feature: relaying in user space",
            t.xdp
        );
        (None, none())
    }
    #[cfg(feature = "xdp")]
    {
        let attached = Loaded::load().and_then(|mut l| {
            l.attach(&t.xdp_interface, t.xdp)?;
            Ok(l)
        });
        match attached {
            Ok(l) => {
                warn_if_not_forwarding(&t.xdp_interface);
                tracing::info!(interface = %t.xdp_interface, mode = ?t.xdp, "XDP fast path attached");
                let writers = stats
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        Some(shard::XdpShard::new(
                            l.maps.clone(),
                            own.clone(),
                            relay_bind,
                            s.clone(),
                            i == 0,
                        ))
                    })
                    .collect();
                (Some(l), writers)
            }
            Err(e) => {
                tracing::warn!("turn.xdp: {e}; relaying in user space");
                (None, none())
            }
        }
    }
}

/// The program's route lookups answer only where forwarding is on.
#[cfg(feature = "xdp")]
fn warn_if_not_forwarding(interface: &str) {
    for family in ["ipv4", "ipv6"] {
        let path = format!("/proc/sys/net/{family}/conf/{interface}/forwarding");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
            tracing::warn!(
                "net.{family}.conf.{interface}.forwarding is 0: the XDP fast path passes every \
                 {family} packet to user space until it is 1 (counted as forwarding_off)"
            );
        }
    }
}

#[cfg(feature = "xdp")]
mod loader {
    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
    use std::sync::{Arc, Mutex};

    use aya::programs::{Xdp, XdpFlags};
    use aya::Ebpf;

    use super::maps::{AddrPort, EntryCount, MapFd, Reason, MAX_BINDINGS};
    use super::XdpMode;

    /// The object `bpf/build.sh` made, aligned so its ELF headers can be
    /// read in place.
    #[repr(C, align(32))]
    struct Aligned<B: ?Sized>(B);
    static OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!("../../../bpf/turnkey_xdp.o"));

    const PROGRAM: &str = "turnkey_xdp";

    #[derive(Debug, thiserror::Error)]
    pub enum XdpError {
        #[error("loading the XDP program: {0}")]
        Load(String),
        #[error("attaching to {interface} ({mode:?}): {reason}")]
        Attach {
            interface: String,
            mode: XdpMode,
            reason: String,
        },
        #[error("XDP map: {0}")]
        Map(#[from] io::Error),
    }

    /// The maps every shard writes (each its own allocations' entries)
    /// and the metrics read.
    pub struct Maps {
        pub clients: MapFd,
        pub peers: MapFd,
        pub counts: MapFd,
        pub reasons: MapFd,
        pub listen: MapFd,
        /// Possible CPUs: the length of a per-CPU value.
        pub cpus: usize,
        /// Counter slots free for new bindings.
        slots: Mutex<Vec<u32>>,
    }

    impl Maps {
        /// A free counter slot (zeroed when it was freed), if any is left.
        pub fn take_slot(&self) -> Option<u32> {
            self.slots.lock().unwrap_or_else(|p| p.into_inner()).pop()
        }

        /// Gives a slot back once nothing refers to it and its counters
        /// have been read: zeroed here for the next binding.
        pub fn free_slot(&self, slot: u32) {
            for e in [2 * slot, 2 * slot + 1] {
                let _ = self.counts.zero_per_cpu::<EntryCount>(e, self.cpus);
            }
            self.slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(slot);
        }

        /// Packets and bytes of one entry, summed over the CPUs.
        pub fn count(&self, entry: u32) -> io::Result<EntryCount> {
            let per_cpu = self.counts.per_cpu::<EntryCount>(entry, self.cpus)?;
            Ok(per_cpu
                .iter()
                .fold(EntryCount::default(), |a, c| EntryCount {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                }))
        }

        /// Packets per reason since the program was loaded.
        pub fn reasons(&self) -> Vec<(Reason, u64)> {
            Reason::ALL
                .iter()
                .map(|&r| {
                    let n = self
                        .reasons
                        .per_cpu::<u64>(r as u32, self.cpus)
                        .map_or(0, |v| v.iter().sum());
                    (r, n)
                })
                .collect()
        }

        /// The listen addresses ChannelData arrives on (a wildcard one
        /// matches any address of its family).
        pub fn set_listen(&self, addrs: &[SocketAddr]) -> io::Result<()> {
            for a in addrs {
                self.listen.put(&AddrPort::of(*a), &1u32)?;
            }
            Ok(())
        }
    }

    /// The loaded program; attached once `attach` succeeds, detached when
    /// dropped (or when the process ends, however it ends).
    pub struct Loaded {
        pub(super) ebpf: Ebpf,
        pub maps: Arc<Maps>,
    }

    impl Loaded {
        pub fn load() -> Result<Loaded, XdpError> {
            let mut ebpf = Ebpf::load(&OBJECT.0).map_err(|e| XdpError::Load(chain(&e)))?;
            let fd = |ebpf: &Ebpf, name: &str| -> Result<MapFd, XdpError> {
                let map = ebpf
                    .map(name)
                    .ok_or_else(|| XdpError::Load(format!("no map {name}")))?;
                let data = match map {
                    aya::maps::Map::HashMap(d) | aya::maps::Map::PerCpuArray(d) => d,
                    _ => return Err(XdpError::Load(format!("map {name} of an unexpected type"))),
                };
                Ok(MapFd::new(data.fd().as_fd().try_clone_to_owned()?))
            };
            let maps = Maps {
                clients: fd(&ebpf, "clients")?,
                peers: fd(&ebpf, "peers")?,
                counts: fd(&ebpf, "counts")?,
                reasons: fd(&ebpf, "reasons")?,
                listen: fd(&ebpf, "listen")?,
                cpus: aya::util::nr_cpus().map_err(|(_, e)| XdpError::Map(e))?,
                slots: Mutex::new((0..MAX_BINDINGS).rev().collect()),
            };
            let prog: &mut Xdp = ebpf
                .program_mut(PROGRAM)
                .ok_or_else(|| XdpError::Load(format!("no program {PROGRAM}")))?
                .try_into()
                .map_err(|e| XdpError::Load(chain(&e)))?;
            prog.load().map_err(|e| XdpError::Load(chain(&e)))?;
            Ok(Loaded {
                ebpf,
                maps: Arc::new(maps),
            })
        }

        /// Attaches to `interface`; the link lives as long as `self`.
        pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), XdpError> {
            let flags = match mode {
                XdpMode::Generic => XdpFlags::SKB_MODE,
                _ => XdpFlags::DRV_MODE,
            };
            let err = |reason: String| XdpError::Attach {
                interface: interface.to_string(),
                mode,
                reason,
            };
            let prog = self.program().map_err(err)?;
            prog.attach(interface, flags).map_err(|e| err(chain(&e)))?;
            Ok(())
        }

        fn program(&mut self) -> Result<&mut Xdp, String> {
            self.ebpf
                .program_mut(PROGRAM)
                .ok_or_else(|| format!("no program {PROGRAM}"))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| chain(&e))
        }

        /// The listen addresses ChannelData comes to.
        pub fn set_listen(&self, addrs: &[SocketAddr]) -> io::Result<()> {
            self.maps.set_listen(addrs)
        }

        /// The program, for test runs.
        pub fn program_fd(&mut self) -> Result<RawFd, String> {
            let prog = self.program()?;
            let fd: BorrowedFd<'_> = prog.fd().map_err(|e| chain(&e))?.as_fd();
            Ok(fd.as_raw_fd())
        }
    }

    /// An error and its causes on one line (the verifier's log included).
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cause = c.source();
        }
        s
    }
}
#[cfg(all(test, feature = "xdp"))]
mod program_tests;
