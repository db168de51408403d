//! The relay built from configuration: where relay sockets bind and what
//! they advertise per address family, how many shards, and one sans-IO
//! core per shard over the shared allocation table. The composition root
//! (`app.rs`) asks for a relay and gets one; how it is put together lives
//! here, beside the shell that runs it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Relay, ShardSpec};
use crate::config::{Config, TurnConfig};
use crate::ice::unix_now;
use crate::lifecycle::Lifecycle;
use crate::turn::server::{Clock, CoreConfig, Rules, Server, Shared};
use crate::turn::stats::TurnStats;
use crate::usage::UsageBook;
use crate::webhooks::Webhooks;

/// Where relays bind and what they advertise, per family (IPv4 [0], IPv6 [1]).
pub struct RelayFamilies {
    pub bind: [Option<IpAddr>; 2],
    pub advertised: [Option<IpAddr>; 2],
    /// Whether the advertised address is the bind address's own (no
    /// external IP configured, or the same one).
    on_host: [bool; 2],
}

impl RelayFamilies {
    pub fn from_config(t: &TurnConfig) -> Self {
        let first = |v6: bool| {
            t.listen
                .iter()
                .find(|a| a.is_ipv6() == v6)
                .map(SocketAddr::ip)
        };
        let bind_v4 = t.relay_ip.or(first(false));
        let adv_v4 = bind_v4.map(|b| match t.external_ip {
            Some(ip) => ip,
            None if !b.is_unspecified() => b,
            None => default_route_ip().unwrap_or_else(|| {
                tracing::warn!("no default route; advertising 127.0.0.1 as the relay address (set turn.external_ip)");
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            }),
        });
        let bind_v6 = t.relay_ip_v6.or(first(true));
        let adv_v6 = bind_v6.and_then(|b| {
            let adv = t.external_ip_v6.or((!b.is_unspecified()).then_some(b));
            if adv.is_none() {
                tracing::warn!("IPv6 relays need turn.external_ip_v6 (or a concrete turn.relay_ip_v6); IPv6 allocations get 440");
            }
            adv
        });
        RelayFamilies {
            bind: [bind_v4, bind_v6.filter(|_| adv_v6.is_some())],
            advertised: [adv_v4, adv_v6],
            on_host: [
                t.external_ip.is_none() || t.external_ip == bind_v4,
                t.external_ip_v6.is_none() || t.external_ip_v6 == bind_v6,
            ],
        }
    }

    /// The advertised relay addresses that are this host's own (no
    /// `external_ip` of a NAT in front): relay to relay between them is
    /// handed over in memory, which is what the kernel would do with it
    /// anyway. Behind a NAT such a datagram goes to the advertised address
    /// for real, so a wrong `external_ip` shows (in calls, `turnkey
    /// probe` and `/selftest`) instead of being papered over.
    pub fn handover_addrs(&self) -> [Option<IpAddr>; 2] {
        [0, 1].map(|i| self.advertised[i].filter(|_| self.on_host[i]))
    }

    /// Our own relay addresses, which the peer policy always allows (on
    /// relay ports): the advertised ones, which is what clients of this
    /// server see as each other's relayed addresses. A bind address behind
    /// 1:1 NAT is not one; it stays subject to the policy.
    pub fn relay_ips(&self) -> Vec<IpAddr> {
        self.advertised.iter().flatten().copied().collect()
    }

    /// The address the ready line and `iceServers` name first.
    pub fn advertised_ip(&self) -> IpAddr {
        self.advertised
            .iter()
            .flatten()
            .copied()
            .next()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }
}

/// A started relay, each shard's counters (for `/metrics`) and the usage
/// book its shards fill (for `/metrics` and the admin API).
pub struct Built {
    pub relay: Relay,
    pub stats: Vec<Arc<TurnStats>>,
    pub shards: usize,
    pub usage: Arc<UsageBook>,
}

impl Relay {
    /// The shards `turn.threads` asks for (0: one per two cores), each a
    /// core over the shared allocation table, started on the listeners of
    /// `turn.listen`; they stop with `life`, tell its drain when an
    /// allocation ends, and count usage in one book (`usage.max_labels`).
    pub fn from_config(
        cfg: &Config,
        families: &RelayFamilies,
        rules: Arc<ArcSwap<Rules>>,
        shared: Arc<Shared>,
        life: &Lifecycle,
    ) -> io::Result<Built> {
        let t = &cfg.turn;
        let cluster = crate::usage::cluster::Cluster::start(cfg, life);
        // Fed the allocation events through the book (`relay/events.rs`).
        let webhooks = Webhooks::new(&cfg.webhooks);
        webhooks.start(life);
        let usage = Arc::new(
            UsageBook::new(cfg.usage.max_labels, unix_now(), cluster)
                .with_webhooks(webhooks.clone()),
        );
        // By default one shard per two cores: the kernel's UDP work (most
        // of a relay's CPU) runs beside them, and a shard that is kept
        // busy batches more and sleeps less. On the 2-core bench machine
        // one shard relays uclient's burst for 0.63x the CPU of two, and
        // more packets/s at 300k offered (bench/RESULTS.md, issue 13).
        let shards = match t.threads {
            0 => default_shards(std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n,
        };
        let clock = Clock {
            mono0: Instant::now(),
            unix0: unix_now(),
        };
        let nonce_key: [u8; 32] = rand::rng().random();
        let mut specs = Vec::new();
        let stats: Vec<Arc<TurnStats>> = (0..shards).map(|_| Arc::default()).collect();
        let (fast, writers) = super::xdp::start(t, families.relay_ips(), families.bind, &stats);
        for ((index, shard_stats), xdp) in stats.iter().cloned().enumerate().zip(writers) {
            let core = Server::new(
                CoreConfig {
                    relay_v4: families.advertised[0],
                    relay_v6: families.advertised[1],
                    nonce_key,
                    nonce_lifetime: t.nonce_lifetime(),
                    shards,
                },
                clock,
                rules.clone(),
                shared.clone(),
                shard_stats.clone(),
                SmallRng::from_os_rng(),
            );
            specs.push(ShardSpec {
                index,
                listen: t.listen.clone(),
                relay_bind: families.bind,
                relay_handover: families.handover_addrs(),
                core,
                stats: shard_stats,
                usage: usage.clone(),
                xdp,
            });
        }
        let mut relay = Relay::start(specs, life.drain.clone())?;
        if let Some(fast) = fast {
            relay.keep_fast_path(fast)?;
        }
        life.spawn(relay.stop_when(life.child()));
        warn_if_ephemeral(t);
        Ok(Built {
            relay,
            stats,
            shards,
            usage,
        })
    }
}

/// Relay shards for `turn.threads = 0`: one per two cores, at least one.
fn default_shards(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// The host's own outgoing connections may take relay ports when the two
/// ranges overlap: said once, at start.
fn warn_if_ephemeral(t: &TurnConfig) {
    if let Some((lo, hi)) = ephemeral_ports() {
        if lo <= t.relay_port_max && t.relay_port_min <= hi {
            tracing::warn!(
                "the relay ports {}-{} overlap the kernel's ephemeral ports {lo}-{hi} \
                 (net.ipv4.ip_local_port_range): the host's own connections may hold relay \
                 ports; choose a range above {hi} or reserve it (net.ipv4.ip_local_reserved_ports)",
                t.relay_port_min,
                t.relay_port_max
            );
        }
    }
}

/// Linux's range for the host's own outgoing ports, if it can be read.
fn ephemeral_ports() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|n| n.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

/// The address of the interface that routes to the internet, found by a
/// UDP connect (which sends nothing).
fn default_route_ip() -> Option<IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::{default_shards, RelayFamilies};

    #[test]
    fn relay_handover_only_where_the_advertised_address_is_the_hosts() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().ok();
        let mut t = crate::config::TurnConfig {
            listen: vec!["192.0.2.10:3478".parse().unwrap()],
            ..Default::default()
        };
        let f = RelayFamilies::from_config(&t);
        assert_eq!(f.handover_addrs()[0], ip("192.0.2.10"));
        // Behind a NAT: datagrams go to the advertised address for real.
        t.external_ip = ip("198.51.100.7");
        let f = RelayFamilies::from_config(&t);
        assert_eq!(f.advertised[0], ip("198.51.100.7"));
        assert_eq!(f.handover_addrs()[0], None);
        t.external_ip = ip("192.0.2.10");
        assert_eq!(
            RelayFamilies::from_config(&t).handover_addrs()[0],
            ip("192.0.2.10")
        );
    }

    #[test]
    fn default_shards_are_one_per_two_cores_and_never_zero() {
        assert_eq!(
            [1, 2, 3, 4, 8].map(default_shards),
            [1, 1, 1, 2, 4],
            "cores 1, 2, 3, 4, 8"
        );
    }
}
