//! Budgets that keep one client from taking the relay: the address
//! quotas and rate limits count by, and rate limiters for bandwidth and
//! for requests that carry no valid credential. Plain data, time passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The address quotas and rate limits count a client by: its IPv4
/// address, or the /64 of its IPv6 address (one subscriber's prefix, which
/// it can spread over at will). IPv4-mapped IPv6 counts as the IPv4.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// A rate limit as the generic cell rate algorithm: one instant of state,
/// no fractions lost however small the steps. `rate` units per second,
/// with up to `burst` units at once after a quiet spell.
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    /// The theoretical arrival time: when the budget is next fully used.
    tat: Option<Instant>,
}

/// The shape of a [`Gcra`] budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rate {
    /// Units per second; 0 means unlimited.
    pub per_sec: u64,
    /// Units that may go at once.
    pub burst: u64,
}

impl Rate {
    pub const UNLIMITED: Rate = Rate {
        per_sec: 0,
        burst: 0,
    };

    fn cost(&self, units: u64) -> Duration {
        let ns = u128::from(units) * 1_000_000_000 / u128::from(self.per_sec.max(1));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

impl Gcra {
    pub const fn new() -> Self {
        Gcra { tat: None }
    }

    /// Whether `units` fit the budget now; if they do, they are spent.
    #[inline]
    pub fn take(&mut self, rate: Rate, now: Instant, units: u64) -> bool {
        if rate.per_sec == 0 {
            return true;
        }
        let tat = self.tat.map_or(now, |t| t.max(now));
        // Allowed while the debt stays within the burst.
        let tolerance = rate.cost(rate.burst.max(units));
        let next = tat + rate.cost(units);
        if next.saturating_duration_since(now) > tolerance {
            return false;
        }
        self.tat = Some(next);
        true
    }

    /// Whether the budget is whole again (the state can be forgotten).
    pub fn is_idle(&self, now: Instant) -> bool {
        self.tat.is_none_or(|t| t <= now)
    }
}

impl Default for Gcra {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-address request budgets, for requests that prove nothing about the
/// sender (Binding, and requests without valid credentials). Bounded: an
/// address whose budget is whole is forgotten at the next sweep, and past
/// `max_tracked` addresses the newcomers share one budget, so a spoofed
/// flood from many sources costs memory only up to the bound.
pub struct PerAddress {
    budgets: HashMap<IpAddr, Gcra>,
    overflow: Gcra,
    max_tracked: usize,
}

impl PerAddress {
    pub fn new(max_tracked: usize) -> Self {
        PerAddress {
            budgets: HashMap::new(),
            overflow: Gcra::new(),
            max_tracked,
        }
    }

    /// Whether one more request from `ip` fits its budget.
    pub fn allow(&mut self, ip: IpAddr, rate: Rate, now: Instant) -> bool {
        self.allow_units(ip, rate, now, 1)
    }

    /// Whether `units` more from `ip` fit its budget (a rate below one a
    /// second is `units` a time at `per_sec` units).
    pub fn allow_units(&mut self, ip: IpAddr, rate: Rate, now: Instant, units: u64) -> bool {
        if rate.per_sec == 0 {
            return true;
        }
        let key = client_key(ip);
        if let Some(g) = self.budgets.get_mut(&key) {
            return g.take(rate, now, units);
        }
        if self.budgets.len() >= self.max_tracked {
            return self.overflow.take(rate, now, units);
        }
        let mut g = Gcra::new();
        let ok = g.take(rate, now, units);
        self.budgets.insert(key, g);
        ok
    }

    /// Forgets addresses whose budget is whole again.
    pub fn sweep(&mut self, now: Instant) {
        self.budgets.retain(|_, g| !g.is_idle(now));
    }

    pub fn tracked(&self) -> usize {
        self.budgets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_per_64_and_mapped_as_ipv4() {
        let k = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2:bbbb::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:192.0.2.1"), k("192.0.2.1"));
        assert_eq!(k("192.0.2.1"), "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn gcra_delivers_the_rate_over_time_and_the_burst_at_once() {
        let rate = Rate {
            per_sec: 125_000,
            burst: 65_536,
        };
        let mut g = Gcra::new();
        let t0 = Instant::now();
        // A sender offering 3× the rate for 10 s in 1200-byte packets.
        let mut passed = 0u64;
        let step = Duration::from_micros(3200); // 375 kB/s offered
        for i in 0..3125u32 {
            if g.take(rate, t0 + step * i, 1200) {
                passed += 1200;
            }
        }
        let expected = 125_000.0 * 10.0;
        let got = passed as f64;
        assert!(
            (got - expected).abs() / expected < 0.07,
            "{got} bytes in 10 s"
        );
        // A quiet spell restores the burst, not more.
        let later = t0 + Duration::from_secs(60);
        let burst: u64 = (0..100).filter(|_| g.take(rate, later, 1200)).count() as u64 * 1200;
        assert!((64_800..=66_000).contains(&burst), "{burst}");
    }

    #[test]
    fn unlimited_always_passes() {
        let mut g = Gcra::new();
        let now = Instant::now();
        assert!((0..10_000).all(|_| g.take(Rate::UNLIMITED, now, 65_535)));
    }

    #[test]
    fn per_address_budgets_are_separate_bounded_and_forgotten() {
        let rate = Rate {
            per_sec: 10,
            burst: 20,
        };
        let mut p = PerAddress::new(2);
        let now = Instant::now();
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let passed = (0..1000).filter(|_| p.allow(a, rate, now)).count();
        assert_eq!(passed, 20);
        assert!(p.allow(b, rate, now), "another address has its own budget");
        // Past the bound, newcomers share one budget.
        let shared = (0..100)
            .filter(|i| p.allow(IpAddr::from([203, 0, 113, *i as u8]), rate, now))
            .count();
        assert_eq!(shared, 20);
        assert_eq!(p.tracked(), 2);
        // Budgets whole again are forgotten.
        p.sweep(now + Duration::from_secs(10));
        assert_eq!(p.tracked(), 0);
    }
}
