//! Per-connection deadlines as plain data: when to ping, when a silent peer
//! is dead, and when to refresh its ICE credentials.
//!
//! Time comes in as an argument, so the rules are unit-tested without a
//! clock; the shell only sleeps until [`Heartbeat::next_deadline`] and asks
//! [`Heartbeat::poll`] what to do.

use std::time::{Duration, Instant};

/// Shortest interval honoured, so a zero from configuration cannot turn the
/// connection loop into a busy loop.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// What the connection should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    Nothing,
    /// Send a WebSocket Ping.
    Ping,
    /// The peer sent nothing for the whole timeout: drop it.
    Dead,
}

/// Liveness of one peer. Any frame from the peer (a pong, a message, even
/// an error-provoking one) counts as a sign of life; we do not require the
/// pong to match a particular ping, because any traffic proves the path
/// works. For the same reason only a peer silent for a whole interval is
/// pinged: a busy one proves itself, and pinging all peers on a clock
/// costs a write, a pong and two wake-ups per peer and interval, in
/// bursts when many peers connected at once (issue 13: it was part of the
/// signaling tail at 8,000 peers).
#[derive(Debug, Clone)]
pub struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    last_heard: Instant,
    next_ping: Instant,
}

impl Heartbeat {
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Self {
        let interval = interval.max(MIN_INTERVAL);
        let timeout = timeout.max(MIN_INTERVAL);
        Self {
            interval,
            timeout,
            last_heard: now,
            next_ping: now + interval,
        }
    }

    /// The peer sent something: the next ping waits for another interval
    /// of silence.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
        self.next_ping = self.next_ping.max(now + self.interval);
    }

    /// What is due at `now`. A ping is sent at most once per interval even
    /// if the caller polls more often.
    pub fn poll(&mut self, now: Instant) -> Beat {
        if now >= self.last_heard + self.timeout {
            Beat::Dead
        } else if now >= self.next_ping {
            self.next_ping = now + self.interval;
            Beat::Ping
        } else {
            Beat::Nothing
        }
    }

    /// When [`Self::poll`] will next have something to do.
    pub fn next_deadline(&self) -> Instant {
        self.next_ping.min(self.last_heard + self.timeout)
    }
}

/// When to send fresh credentials to a peer that got some with `ttl`: at
/// 80 % of the lifetime, leaving the client time to apply them (an ICE
/// restart or `setConfiguration`) before the old ones expire. `None` for a
/// zero ttl, which means the servers carry no expiring credential.
pub fn refresh_after(ttl: Duration) -> Option<Duration> {
    if ttl.is_zero() {
        return None;
    }
    Some((ttl * 4 / 5).max(MIN_INTERVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pings_only_after_an_interval_of_silence() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, 200 * MS, 500 * MS);
        assert_eq!(hb.next_deadline(), t0 + 200 * MS);
        assert_eq!(hb.poll(t0 + 199 * MS), Beat::Nothing);
        assert_eq!(hb.poll(t0 + 200 * MS), Beat::Ping);
        assert_eq!(hb.poll(t0 + 201 * MS), Beat::Nothing);
        // The pong (or any message) puts the next ping an interval later.
        hb.heard(t0 + 250 * MS);
        assert_eq!(hb.next_deadline(), t0 + 450 * MS);
        assert_eq!(hb.poll(t0 + 400 * MS), Beat::Nothing);
        // A peer that keeps talking is never pinged.
        for k in 1..10 {
            hb.heard(t0 + (250 + 150 * k) * MS);
            assert_eq!(hb.poll(t0 + (300 + 150 * k) * MS), Beat::Nothing);
        }
        // Silent again: pinged an interval after it was last heard.
        assert_eq!(hb.poll(t0 + 1799 * MS), Beat::Nothing);
        assert_eq!(hb.poll(t0 + 1800 * MS), Beat::Ping);
        assert_eq!(hb.poll(t0 + 2000 * MS), Beat::Ping);
    }

    #[test]
    fn a_silent_peer_is_dead_after_the_timeout() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, 200 * MS, 450 * MS);
        assert_eq!(hb.poll(t0 + 200 * MS), Beat::Ping);
        assert_eq!(hb.poll(t0 + 400 * MS), Beat::Ping);
        assert_eq!(hb.next_deadline(), t0 + 450 * MS);
        assert_eq!(hb.poll(t0 + 449 * MS), Beat::Nothing);
        assert_eq!(hb.poll(t0 + 450 * MS), Beat::Dead);
    }

    #[test]
    fn zero_intervals_are_clamped() {
        let t0 = Instant::now();
        let hb = Heartbeat::new(t0, Duration::ZERO, Duration::ZERO);
        assert_eq!(hb.next_deadline(), t0 + MIN_INTERVAL);
    }

    #[test]
    fn refresh_comes_at_eighty_percent_of_the_ttl() {
        assert_eq!(
            refresh_after(Duration::from_secs(600)),
            Some(Duration::from_secs(480))
        );
        assert_eq!(refresh_after(Duration::from_secs(1)), Some(800 * MS));
        assert_eq!(refresh_after(MS), Some(MIN_INTERVAL));
        assert_eq!(refresh_after(Duration::ZERO), None);
    }
}
