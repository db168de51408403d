//! Budgets that keep one client from taking more than its share, for
//! every listener: the key addresses are counted by ([`client_key`]: IPv4,
//! or the /64 of IPv6), rates as token buckets ([`Gcra`], [`Rate`],
//! [`PerAddress`]), and places held at once ([`Occupancy`], whose
//! [`Slot`] frees itself when dropped, as mini-redis's drop guards do).
//!
//! One module for all of them: the TURN core's request and bandwidth
//! budgets, the public HTTP gate, TURN TCP/TLS admission, the signaling
//! sockets and the mint budget count the same way, with one rule for a
//! poisoned lock (the count is plain data that a panic elsewhere cannot
//! leave half-written, so it is used as it is: no listener refuses every
//! client after one panic). Plain data, time passed in; no I/O.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
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

    /// Spends `units` that were already used elsewhere (relayed by the
    /// kernel fast path): the budget may go into debt, which the next
    /// `take`s then wait out, so the rate over time stays the budget's.
    pub fn charge(&mut self, rate: Rate, now: Instant, units: u64) {
        if rate.per_sec == 0 || units == 0 {
            return;
        }
        let tat = self.tat.map_or(now, |t| t.max(now));
        self.tat = Some(tat + rate.cost(units));
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

/// Places held at once, per client address key and in total: open
/// connections, sockets, connections without an allocation.
#[derive(Debug, Default)]
pub struct Occupancy {
    per_key: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
}

/// Why a place was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("too many from this address")]
    Address,
    #[error("too many in all")]
    Total,
}

/// One held place; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<Occupancy>,
    key: IpAddr,
}

impl Occupancy {
    pub fn new() -> Arc<Occupancy> {
        Arc::new(Occupancy::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // The one poisoning rule: see the module doc.
        self.per_key.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for `ip` if its key holds fewer than `per_key` and all hold
    /// fewer than `total` (`usize::MAX`: no cap).
    pub fn take(self: &Arc<Self>, ip: IpAddr, per_key: usize, total: usize) -> Result<Slot, Full> {
        let key = client_key(ip);
        let mut m = self.lock();
        let held = m.get(&key).copied().unwrap_or(0);
        if held >= per_key {
            return Err(Full::Address);
        }
        if self.total.load(Ordering::Relaxed) >= total {
            return Err(Full::Total);
        }
        m.insert(key, held + 1);
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            owner: self.clone(),
            key,
        })
    }

    /// Places held by `ip`'s key.
    pub fn held_by(&self, ip: IpAddr) -> usize {
        self.lock().get(&client_key(ip)).copied().unwrap_or(0)
    }

    /// Places held in all.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.owner.lock();
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
        self.owner.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_caps_per_key_and_in_total_and_slots_free_themselves() {
        let o = Occupancy::new();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let a_too: IpAddr = "2001:db8:1:2::99".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let s1 = o.take(a, 2, 3).unwrap();
        let s2 = o.take(a_too, 2, 3).unwrap();
        assert_eq!(o.take(a, 2, 3).unwrap_err(), Full::Address, "one /64");
        let s3 = o.take(b, 2, 3).unwrap();
        assert_eq!(o.take(b, 2, 3).unwrap_err(), Full::Total);
        assert_eq!((o.held_by(a), o.total()), (2, 3));
        drop(s1);
        assert_eq!((o.held_by(a), o.total()), (1, 2));
        drop((s2, s3));
        assert_eq!(o.total(), 0);
        assert!(o.lock().is_empty(), "no key outlives its last slot");
    }

    #[test]
    fn occupancy_survives_a_panic_while_its_lock_is_held() {
        let o = Occupancy::new();
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        let held = o.take(ip, 4, 4).unwrap();
        let o2 = o.clone();
        let _ = std::thread::spawn(move || {
            let _guard = o2.lock();
            panic!("poison the lock");
        })
        .join();
        assert!(o.per_key.is_poisoned());
        let again = o.take(ip, 4, 4).expect("still admits after a panic");
        drop((held, again));
        assert_eq!(o.total(), 0);
    }

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
