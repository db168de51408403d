//! A relay port pool, one per address family, shared by every shard
//! (behind a lock on the control path, never touched per packet).
//!
//! Ports are handed out in random order (RFC 8656 §7.2 asks for
//! unpredictable relayed ports) and a freed port goes to the back of the
//! queue, so a peer still sending to an old allocation does not reach a
//! new one at once.

use std::collections::VecDeque;

use rand::seq::SliceRandom;

pub struct PortPool {
    base: u16,
    free: VecDeque<u16>,
    is_free: Vec<bool>,
}

impl PortPool {
    pub fn new(ports: impl IntoIterator<Item = u16>, rng: &mut impl rand::Rng) -> Self {
        let mut list: Vec<u16> = ports.into_iter().collect();
        list.shuffle(rng);
        let base = list.iter().copied().min().unwrap_or(0);
        let top = list.iter().copied().max().unwrap_or(0);
        let mut is_free = vec![false; usize::from(top - base) + 1];
        for p in &list {
            is_free[usize::from(p - base)] = true;
        }
        PortPool {
            base,
            free: list.into(),
            is_free,
        }
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn contains_free(&self, port: u16) -> bool {
        port.checked_sub(self.base)
            .and_then(|i| self.is_free.get(usize::from(i)))
            .copied()
            .unwrap_or(false)
    }

    fn mark(&mut self, port: u16, free: bool) {
        if let Some(slot) = port
            .checked_sub(self.base)
            .and_then(|i| self.is_free.get_mut(usize::from(i)))
        {
            *slot = free;
        }
    }

    /// Takes the next free port (an even one when asked; with `pair`, an
    /// even one whose odd neighbour is free too, which is taken as well).
    pub fn take(&mut self, even: bool, pair: bool) -> Option<u16> {
        let pos = if even || pair {
            self.free.iter().position(|&p| {
                p % 2 == 0 && (!pair || (p < u16::MAX && self.contains_free(p + 1)))
            })?
        } else if self.free.is_empty() {
            return None;
        } else {
            0
        };
        let port = self.free.remove(pos)?;
        self.mark(port, false);
        if pair {
            self.take_specific(port + 1);
        }
        Some(port)
    }

    /// Removes a given port from the free list (a reserved port, or the odd
    /// half of an even/odd pair).
    pub fn take_specific(&mut self, port: u16) -> bool {
        if !self.contains_free(port) {
            return false;
        }
        if let Some(pos) = self.free.iter().position(|&p| p == port) {
            self.free.remove(pos);
        }
        self.mark(port, false);
        true
    }

    pub fn give_back(&mut self, port: u16) {
        if port
            .checked_sub(self.base)
            .is_some_and(|i| usize::from(i) < self.is_free.len())
            && !self.contains_free(port)
        {
            self.mark(port, true);
            self.free.push_back(port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(r: std::ops::RangeInclusive<u16>) -> PortPool {
        PortPool::new(r, &mut rand::rng())
    }

    #[test]
    fn takes_every_port_once() {
        let mut p = pool(50000..=50009);
        let mut got: Vec<u16> = std::iter::from_fn(|| p.take(false, false)).collect();
        got.sort();
        assert_eq!(got, (50000..=50009).collect::<Vec<_>>());
        assert_eq!(p.take(false, false), None);
        p.give_back(50003);
        p.give_back(50003);
        assert_eq!(p.free_count(), 1);
        assert_eq!(p.take(false, false), Some(50003));
    }

    #[test]
    fn even_and_pairs() {
        let mut p = pool(50000..=50003);
        let a = p.take(false, true).unwrap();
        assert_eq!(a % 2, 0);
        assert!(!p.contains_free(a + 1));
        let b = p.take(true, false).unwrap();
        assert_eq!(b % 2, 0);
        assert_eq!(p.take(true, false), None);
        assert_eq!(p.free_count(), 1);
    }

    #[test]
    fn foreign_ports_are_ignored() {
        let mut p = pool(50000..=50001);
        p.give_back(1);
        p.give_back(60000);
        assert_eq!(p.free_count(), 2);
        assert!(!p.take_specific(7));
    }
}
